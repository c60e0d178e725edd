"""Fit one ensemble member (one model, fold and seed) with plain PyTorch: no Ray, no MLflow.

The whole training set lives on the device (the paper-size cohort is ~0.3 GB of patches), batches are
drawn by index and augmented on the device, so no data loader stalls the GPU. Checkpoints every
``checkpoint_every`` epochs make a killed fit resume where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from qsmrim.atomic import atomic_path
from qsmrim.evaluation import f1_optimal_threshold
from qsmrim.training.augment import TrainAugmentation
from qsmrim.training.config import TrainConfig
from qsmrim.training.dataset import LesionDataset
from qsmrim.training.member import Member, Standardisation
from qsmrim.training.predict import predict_member
from qsmrim.training.splits import make_splits, subject_rim_counts

__all__ = ["fit_member", "finish_member", "cohort_config", "fold_rows", "FoldRows", "fit_standardisation", "seeded_model",
           "predict_member", "resolve_device", "inner_split", "EpochCallback"]

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]
"""Called after every epoch (and after its checkpoint is written) with (epoch number from 1, metrics); the
metrics carry ``checkpoint``: the checkpoint file written at this epoch, or ``""``, and ``epochs``: the epochs
the fit runs (``min_steps`` may raise them above the config's). Ray and MLflow report through it."""

CHECKPOINT_NAME = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(name)


def inner_split(rim_counts: dict[str, int], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split training scans into (fit, inner validation) with the same stratification as the folds: by subject,
    so the sessions of one subject are never on both sides."""
    if fraction <= 0:
        return sorted(rim_counts), []
    n_folds = max(2, round(1 / fraction))
    if len(subject_rim_counts(rim_counts)) < n_folds:
        return sorted(rim_counts), []
    split = make_splits(rim_counts, n_folds=n_folds, seed=seed)[0]
    return split["train"], split["test"]


def _threshold(labels: np.ndarray, probs: np.ndarray) -> float | None:
    if len(labels) == 0 or labels.min() == labels.max():
        return None
    return float(f1_optimal_threshold(labels, probs)[0])


def seeded_model(cfg: TrainConfig, seed: int):
    """The model of ``cfg`` initialised from ``seed`` (torch's global generator is left as it was)."""
    from qsmrim.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg.model, **cfg.model_kwargs)


@dataclass(frozen=True)
class FoldRows:
    """Rows of one fold: fitted, inner validation (honest threshold) and test (all, unlabelled too)."""

    fit: np.ndarray
    inner_val: np.ndarray
    test: np.ndarray


def fold_rows(cfg: TrainConfig, data: LesionDataset, splits: list[dict[str, list[str]]], fold: int) -> FoldRows:
    """The rows a member of ``fold`` fits, validates its honest threshold on, and predicts.

    The inner split depends on the fold only, not the seed: every seed of a fold fits the same subjects
    and differs in initialisation, shuffling, augmentation and dropout (the paper's seeds), so the seeds of
    a fold can be trained stacked (:func:`qsmrim.training.fit_stack.fit_members`).
    """
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold must be in 0..{len(splits) - 1}, not {fold}")
    split = splits[fold]
    counts = {s: c for s, c in data.rim_counts().items() if s in set(split["train"])}
    fit_subjects, val_subjects = inner_split(counts, cfg.inner_val_fraction, seed=1000 * fold)
    rows = FoldRows(data.rows_of(fit_subjects), data.rows_of(val_subjects), data.rows_of(split["test"], labelled=False))
    if len(rows.fit) < 2 or data.labels[rows.fit].max() < 1:
        raise ValueError(f"fold {fold}: the training subjects hold {len(rows.fit)} labelled lesion(s) and no rim+; "
                         "use more subjects or fewer folds")  # fmt: skip
    return rows


def cohort_config(cfg: TrainConfig, data: LesionDataset) -> TrainConfig:
    """``cfg`` with its epochs raised to ``cfg.min_steps`` for this cohort (:meth:`TrainConfig.for_cohort`)."""
    out = cfg.for_cohort(int((data.labels >= 0).sum()))
    if out.epochs != cfg.epochs:
        log.info("%s: %d epochs raised to %d to reach min_steps=%d on %d labelled lesions", cfg.model, cfg.epochs,
                 out.epochs, cfg.min_steps, int((data.labels >= 0).sum()))  # fmt: skip
    return out


def fit_standardisation(cfg: TrainConfig, data: LesionDataset, rows: FoldRows, uses_radiomics: bool) -> Standardisation | None:
    """Radiomics standardisation from the fitted rows only (``None`` for models without radiomics)."""
    if not uses_radiomics:
        return None
    if data.radiomics is None:
        raise ValueError(f"model {cfg.model!r} needs radiomic features; run `qsmrim features` first")
    return Standardisation.fit(data.radiomics[rows.fit])


def fit_member(
    cfg: TrainConfig,
    data: LesionDataset,
    splits: list[dict[str, list[str]]],
    fold: int,
    seed: int,
    *,
    out_dir: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
    resume: bool = True,
) -> Member:
    """Train ``cfg.model`` on the training subjects of ``splits[fold]`` with ``seed``; return the member.

    The test fold is only predicted, never trained on; radiomics are standardised with statistics of the
    fitted rows only. With ``out_dir`` the member is saved there and checkpoints resume an interrupted fit.
    """
    t0 = time.perf_counter()
    cfg = cohort_config(cfg, data)
    rows = fold_rows(cfg, data, splits, fold)
    from qsmrim.models import is_torch_model

    torch_model = seeded_model(cfg, seed) if is_torch_model(cfg.model) else None
    std = fit_standardisation(cfg, data, rows, torch_model is None or getattr(torch_model, "uses_radiomics", True))
    if torch_model is None:
        member = _fit_sklearn(cfg, data, std, rows.fit, seed, fold)
    else:
        member = _fit_torch(cfg, torch_model, data, std, rows.fit, seed, fold, out_dir, on_epoch, resume)
    member = finish_member(cfg, member, data, rows, fit_seconds=time.perf_counter() - t0, out_dir=out_dir)
    if out_dir is not None:  # the member is saved: its resume point (weights + Adam moments) is dead weight now
        (Path(out_dir) / CHECKPOINT_NAME).unlink(missing_ok=True)
    return member


def finish_member(cfg: TrainConfig, member: Member, data: LesionDataset, rows: FoldRows, *, fit_seconds: float,
                  out_dir: str | Path | None = None) -> Member:  # fmt: skip
    """Predict the test fold, choose the paper and honest thresholds, add the metrics, save to ``out_dir``."""
    torch_model = member.model_name != "aprl-rf"

    def _predict(r: np.ndarray) -> np.ndarray:
        return member.predict_proba(
            data.patches[r] if torch_model else None,
            data.radiomics[r] if data.radiomics is not None else None,
            device=resolve_device(cfg.device) if torch_model else "cpu",
            batch_size=cfg.eval_batch_size,
        )

    probs = _predict(rows.test)
    labels = data.labels[rows.test]
    member.predictions = pd.DataFrame({"subject": data.subjects[rows.test], "lesion": data.lesions[rows.test],
                                       "fold": member.fold, "seed": member.seed, "rim": labels, "prob": probs})  # fmt: skip
    labelled = labels >= 0
    thresholds = {"paper": _threshold(labels[labelled], probs[labelled])}
    if len(rows.inner_val):
        thresholds["honest"] = _threshold(data.labels[rows.inner_val], _predict(rows.inner_val))
    member.thresholds = {k: (v if v is not None else 0.5) for k, v in thresholds.items()}
    member.metrics.update(_member_metrics(labels[labelled], probs[labelled], member.thresholds))
    member.metrics.update({"n_fit": int(len(rows.fit)), "n_inner_val": int(len(rows.inner_val)),
                           "n_test": int(len(rows.test)), "fit_seconds": fit_seconds})  # fmt: skip
    if out_dir is not None:
        member.save(out_dir)
    return member


def _member_metrics(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    from qsmrim.evaluation import classification_metrics

    out: dict[str, float] = {}
    if len(labels) and labels.min() != labels.max():
        from sklearn.metrics import average_precision_score, roc_auc_score

        out["test_roc_auc"] = float(roc_auc_score(labels, probs))
        out["test_average_precision"] = float(average_precision_score(labels, probs))
    for name, thr in thresholds.items():
        m = classification_metrics(labels, probs >= thr)
        out.update({f"test_{name}_{k}": float(v) for k, v in m.items()})
    return out


def _fit_sklearn(cfg, data, std, fit_rows, seed, fold) -> Member:
    from qsmrim.models import build_model

    kwargs = {"feature_names": list(data.feature_names), "random_state": seed, **cfg.model_kwargs}
    est = build_model(cfg.model, **kwargs)
    est.fit(std.transform(data.radiomics[fit_rows]), data.labels[fit_rows].astype(int))
    return Member(cfg.model, dict(cfg.model_kwargs), fold, seed, {}, std, data.feature_names, model=est)


def make_optimizer(cfg: TrainConfig, params, device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with the paper's step decay (MultiStepLR at ``cfg.milestones`` of the epochs); fused on GPU."""
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestone_epochs(), gamma=cfg.gamma)


def member_generators(seed: int, fold: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """A member's own generators: CPU (batch order) and device (augmentation, DeepSMOTE draws)."""
    return (torch.Generator().manual_seed(seed * 7919 + fold),
            torch.Generator(device=device).manual_seed(seed * 104729 + fold))  # fmt: skip


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """Seed of torch's global generator (dropout) for one member's epoch, so a resumed fit repeats a clean one."""
    return seed * 1_000_003 + fold * 1009 + epoch


def prepare_device(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """Apply the GPU knobs of ``cfg`` (cuDNN autotuning) and return the memory format for 5-D tensors."""
    if device.type != "cuda":
        return torch.contiguous_format
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    return torch.channels_last_3d if cfg.channels_last else torch.contiguous_format


def make_autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on GPU when ``cfg.bf16``, else a no-op context."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()


def _fit_torch(cfg, model, data, std, fit_rows, seed, fold, out_dir, on_epoch, resume) -> Member:
    device = resolve_device(cfg.device)
    fmt = prepare_device(cfg, device)
    model = model.to(device, memory_format=fmt)
    patches = torch.as_tensor(np.ascontiguousarray(data.patches[fit_rows]), device=device)
    n_feat = len(data.feature_names) or 527
    rad = (torch.as_tensor(std.transform(data.radiomics[fit_rows]), device=device) if std is not None
           else torch.zeros((len(fit_rows), n_feat), device=device))  # fmt: skip
    labels = torch.as_tensor(data.labels[fit_rows].astype(np.float32), device=device)
    opt, sched = make_optimizer(cfg, model.parameters(), device)
    augment = TrainAugmentation(cfg.augmentation)
    g_cpu, g_dev = member_generators(seed, fold, device)
    autocast = make_autocast(cfg, device)
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if ckpt is not None and resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)  # our own local file, tensors only
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g_cpu.set_state(state["g_cpu"])
        g_dev.set_state(state["g_dev"].to("cpu") if device.type == "cpu" else state["g_dev"].cpu())
        start_epoch = int(state["epoch"])
        history = history_rows(state["history_keys"], state["history"])
        log.info("%s: resuming at epoch %d from %s", f"fold={fold} seed={seed}", start_epoch + 1, ckpt)
    n = len(fit_rows)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for epoch in range(start_epoch, cfg.epochs):
            # Layers such as dropout draw from torch's global generator: seed it per epoch (inside fork_rng,
            # so the caller's state is untouched) and a resumed fit repeats a clean one exactly.
            torch.manual_seed(epoch_seed(seed, fold, epoch))
            _train_epoch(cfg, model, opt, sched, augment, patches, rad, labels, g_cpu, g_dev, autocast, n, epoch, history, fmt)
            saved = ckpt is not None and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs)
            if saved:
                _save_checkpoint(ckpt, model, opt, sched, g_cpu, g_dev, epoch + 1, history)
            if on_epoch is not None:
                on_epoch(epoch + 1, {**history[-1], "checkpoint": str(ckpt) if saved else "", "epochs": cfg.epochs})
    model.eval()
    return Member(cfg.model, dict(cfg.model_kwargs), fold, seed, {}, std, data.feature_names, history=history,
                  model=model.cpu() if device.type != "cpu" else model)  # fmt: skip


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the GPU: pinned and non-blocking (a blocking
    host-to-device copy synchronises the stream, so the host could not run ahead of the GPU)."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def batch_anchors(positive: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows of a batch that are rim+, found on the CPU (``positive``: bool labels, ``idx``: the batch's rows):
    DeepSMOTE then needs no device-to-host sync to find them, and the step never waits for the GPU."""
    return to_device_async(torch.nonzero(positive[idx]).flatten(), device)


def _train_epoch(cfg, model, opt, sched, augment, patches, rad, labels, g_cpu, g_dev, autocast, n, epoch,
                 history, fmt=torch.contiguous_format) -> None:  # fmt: skip
    t = time.perf_counter()
    model.train()
    uses_patch = getattr(model, "uses_patch", True)
    perm_cpu = torch.randperm(n, generator=g_cpu)
    perm = perm_cpu.to(patches.device)
    positive = (labels > 0.5).cpu()
    total = torch.zeros((), dtype=torch.float64, device=patches.device)
    seen = 0
    for i in range(0, n, cfg.batch_size):
        idx = perm[i : i + cfg.batch_size]
        if len(idx) < 2:  # batch norm needs two samples
            continue
        anchors = batch_anchors(positive, perm_cpu[i : i + cfg.batch_size], patches.device)
        # A model that reads no image (APRL(NN)) gets its patches as they are: augmenting them cost 90% of its step.
        xb = (augment(patches[idx], generator=g_dev) if uses_patch else patches[idx]).contiguous(memory_format=fmt)
        with autocast:
            logits, yb = model.forward_train(xb, rad[idx], labels[idx], generator=g_dev, anchors=anchors)
        loss = F.binary_cross_entropy_with_logits(logits.float(), yb.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach().double() * len(idx)
        seen += len(idx)
    sched.step()
    wall = time.perf_counter() - t
    row = {"epoch": float(epoch + 1), "train_loss": float(total) / max(seen, 1), "lr": float(opt.param_groups[0]["lr"]),
           "epoch_seconds": wall, "samples_per_s": seen / max(wall, 1e-9)}  # fmt: skip
    history.append(row)


def history_tensor(history: list[dict[str, float]], keys: list[str]) -> torch.Tensor:
    """Epoch rows as a ``float64 [epochs, len(keys)]`` tensor (a checkpoint holds tensors only)."""
    return torch.tensor([[r[k] for k in keys] for r in history], dtype=torch.float64)


def history_rows(keys: list[str], table: torch.Tensor) -> list[dict[str, float]]:
    """Inverse of :func:`history_tensor`."""
    return [dict(zip(keys, row, strict=True)) for row in table.tolist()]


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` atomically (a crash mid-write leaves the previous checkpoint)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _save_checkpoint(path: Path, model, opt, sched, g_cpu, g_dev, epoch: int, history: list[dict[str, Any]]) -> None:
    keys = list(history[0]) if history else []
    write_checkpoint(path, {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "g_cpu": g_cpu.get_state(),
        "g_dev": g_dev.get_state(),
        "epoch": epoch,
        "history_keys": keys,
        "history": history_tensor(history, keys),
    })  # fmt: skip
