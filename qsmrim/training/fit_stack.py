"""Fit the seeds of one fold together: one stacked step trains every seed's member (no Ray, no MLflow).

Members of one fold fit the same rows (:func:`qsmrim.training.fit.fold_rows`), so their image backbones
can run as one network with grouped convolutions (:class:`qsmrim.models.MemberStack`). Each member keeps
everything that makes it a seed of its own: initialisation, batch order, augmentation and DeepSMOTE draws
(its own generators, as in :func:`~qsmrim.training.fit.fit_member`), dropout (its own global-generator
state, swapped in around its head) and its Adam moments (Adam acts element-wise, so one Adam over the
stacked weights is G Adams). A stacked fit therefore gives the members that ``fit_member`` gives, up to
floating-point summation order, in about one member's launch count: the batch-64 step that leaves a large
GPU idle does G members' work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qsmrim.training.augment import AugmentationDraw, TrainAugmentation
from qsmrim.training.config import TrainConfig
from qsmrim.training.dataset import LesionDataset
from qsmrim.training.fit import (
    batch_anchors,
    epoch_seed,
    finish_member,
    fit_standardisation,
    fold_rows,
    make_autocast,
    make_optimizer,
    member_generators,
    prepare_device,
    resolve_device,
    seeded_model,
)
from qsmrim.training.member import Member

__all__ = ["fit_members", "StackEpochCallback", "stack_checkpoint_name"]

log = logging.getLogger(__name__)

StackEpochCallback = Callable[[int, dict[int, dict[str, Any]]], None]
"""Called after every epoch (after its checkpoint is written) with (epoch from 1, {seed: metrics}); every
member's metrics carry ``checkpoint``, the stack checkpoint written at this epoch or ``""``."""


def stack_checkpoint_name(seeds: Sequence[int]) -> str:
    """File name of the checkpoint of a stack of ``seeds`` (a different set of seeds never resumes it)."""
    return "stack_checkpoint_seeds-" + "-".join(str(s) for s in seeds) + ".pt"


class _MemberRNG:
    """Each member's own state of torch's global generators (dropout draws), swapped in around its head."""

    def __init__(self, seeds: Sequence[int], fold: int, epoch: int, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.states = []
        for s in seeds:
            torch.manual_seed(epoch_seed(s, fold, epoch))
            self.states.append(self._get())

    def _get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None)

    @contextmanager
    def use(self, g: int) -> Iterator[None]:
        cpu, dev = self.states[g]
        torch.set_rng_state(cpu)
        if dev is not None:
            torch.cuda.set_rng_state(dev, self.cuda)
        try:
            yield
        finally:
            self.states[g] = self._get()


def fit_members(
    cfg: TrainConfig,
    data: LesionDataset,
    splits: list[dict[str, list[str]]],
    fold: int,
    seeds: Sequence[int],
    *,
    out_dirs: Sequence[str | Path] | None = None,
    checkpoint_dir: str | Path | None = None,
    on_epoch: StackEpochCallback | None = None,
    resume: bool = True,
) -> list[Member]:
    """Train one member of ``cfg.model`` per seed on ``splits[fold]``, stacked; return them in seed order.

    ``cfg.model`` must be stackable (:func:`qsmrim.models.is_stackable`: the QSMRim-Net family). With
    ``out_dirs`` (one per seed) each member is saved like :func:`~qsmrim.training.fit.fit_member` saves
    it; with ``checkpoint_dir`` a stack checkpoint is written every ``cfg.checkpoint_every`` epochs and an
    interrupted fit of the same seeds resumes from it.
    """
    from qsmrim.models import MemberStack, is_stackable

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, not {seeds}")
    if not is_stackable(cfg.model):
        raise ValueError(f"model {cfg.model!r} cannot be trained stacked; use fit_member per seed")
    if out_dirs is not None and len(out_dirs) != len(seeds):
        raise ValueError(f"out_dirs must name one folder per seed ({len(seeds)}), not {len(out_dirs)}")
    t0 = time.perf_counter()
    rows = fold_rows(cfg, data, splits, fold)
    models = [seeded_model(cfg, s) for s in seeds]
    std = fit_standardisation(cfg, data, rows, models[0].uses_radiomics)
    device = resolve_device(cfg.device)
    stack = MemberStack(models)
    stack.memory_format = prepare_device(cfg, device)
    stack = stack.to(device, memory_format=stack.memory_format)
    del models
    histories = _train_stack(cfg, stack, data, std, rows.fit, seeds, fold, device, checkpoint_dir, on_epoch, resume)
    trained = stack.unstack()
    del stack
    share = (time.perf_counter() - t0) / len(seeds)
    members = []
    for g, (seed, model) in enumerate(zip(seeds, trained, strict=True)):
        model.eval()
        member = Member(cfg.model, dict(cfg.model_kwargs), fold, seed, {}, std, data.feature_names,
                        history=histories[g], model=model.cpu() if device.type != "cpu" else model)  # fmt: skip
        member.metrics["stack_size"] = len(seeds)
        members.append(finish_member(cfg, member, data, rows, fit_seconds=share,
                                     out_dir=out_dirs[g] if out_dirs is not None else None))  # fmt: skip
    if out_dirs is not None and checkpoint_dir is not None:  # every member is saved: drop the resume point
        (Path(checkpoint_dir) / stack_checkpoint_name(seeds)).unlink(missing_ok=True)
    return members


def _train_stack(cfg, stack, data, std, fit_rows, seeds, fold, device, checkpoint_dir, on_epoch,
                 resume) -> list[list[dict[str, float]]]:  # fmt: skip
    n_feat = len(data.feature_names) or 527
    patches = torch.as_tensor(np.ascontiguousarray(data.patches[fit_rows]), device=device)
    rad = (torch.as_tensor(std.transform(data.radiomics[fit_rows]), device=device) if std is not None
           else torch.zeros((len(fit_rows), n_feat), device=device))  # fmt: skip
    labels = torch.as_tensor(data.labels[fit_rows].astype(np.float32), device=device)
    opt, sched = make_optimizer(cfg, stack.parameters(), device)
    augment = TrainAugmentation(cfg.augmentation)
    gens = [member_generators(s, fold, device) for s in seeds]
    autocast = make_autocast(cfg, device)
    histories: list[list[dict[str, float]]] = [[] for _ in seeds]
    start_epoch = 0
    ckpt = Path(checkpoint_dir) / stack_checkpoint_name(seeds) if checkpoint_dir is not None else None
    if ckpt is not None and resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)  # our own local file, tensors only
        stack.load_state_dict(state["stack"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for (g_cpu, g_dev), s_cpu, s_dev in zip(gens, state["g_cpu"], state["g_dev"], strict=True):
            g_cpu.set_state(s_cpu)
            g_dev.set_state(s_dev.cpu())
        start_epoch = int(state["epoch"])
        keys = state["history_keys"]
        histories = [[dict(zip(keys, row, strict=True)) for row in h.tolist()] for h in state["history"]]
        log.info("fold=%d seeds=%s: resuming at epoch %d from %s", fold, seeds, start_epoch + 1, ckpt)
    n = len(fit_rows)
    runners = _graphed_backbones(cfg, stack, patches, device) if start_epoch < cfg.epochs else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for epoch in range(start_epoch, cfg.epochs):
            rng = _MemberRNG(seeds, fold, epoch, device)
            rows = _train_epoch(cfg, stack, opt, sched, augment, patches, rad, labels, gens, rng, autocast, n, epoch,
                                runners)  # fmt: skip
            for h, row in zip(histories, rows, strict=True):
                h.append(row)
            saved = ckpt is not None and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs)
            if saved:
                _save_checkpoint(ckpt, stack, opt, sched, gens, epoch + 1, histories)
            if on_epoch is not None:
                on_epoch(epoch + 1, {s: {**h[-1], "checkpoint": str(ckpt) if saved else ""}
                                     for s, h in zip(seeds, histories, strict=True)})  # fmt: skip
    return histories


class _Forward(torch.nn.Module):
    """A module that only calls ``net``: graphing it leaves ``net``'s own forward eager (for short batches)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _graphed_backbones(cfg: TrainConfig, stack, patches: torch.Tensor, device: torch.device) -> list | None:
    """CUDA-graphed forward+backward of each stacked backbone for a full batch, or None where graphs do not apply.

    Capture runs a few warm-up steps on a sample batch; they must not train: the backbones' batch-norm
    statistics are restored and their gradients dropped afterwards.
    """
    if not (cfg.cuda_graphs and device.type == "cuda" and not cfg.bf16) or len(patches) < cfg.batch_size:
        return None
    saved = [{k: v.clone() for k, v in net.state_dict().items()} for net in stack.backbones]
    runners = []
    for net in stack.backbones:
        first = next(m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
        sample = torch.randn(cfg.batch_size, first.in_channels, *patches.shape[2:], device=device)
        runners.append(torch.cuda.make_graphed_callables(_Forward(net), (sample.contiguous(memory_format=stack.memory_format),)))
    with torch.no_grad():
        for net, state in zip(stack.backbones, saved, strict=True):
            for k, v in net.state_dict().items():
                v.copy_(state[k])
    for p in stack.parameters():
        p.grad = None
    return runners


def _train_epoch(cfg, stack, opt, sched, augment, patches, rad, labels, gens, rng, autocast, n, epoch,
                 runners=None) -> list[dict[str, float]]:  # fmt: skip
    t = time.perf_counter()
    stack.train()
    size = stack.n_members
    perms_cpu = [torch.randperm(n, generator=g_cpu) for g_cpu, _ in gens]
    perms = [p.to(patches.device) for p in perms_cpu]
    positive = (labels > 0.5).cpu()
    loss_sum = torch.zeros(size, dtype=torch.float64, device=patches.device)
    seen = 0
    for i in range(0, n, cfg.batch_size):
        idx = [p[i : i + cfg.batch_size] for p in perms]
        b = len(idx[0])
        if b < 2:  # batch norm needs two samples
            continue
        x = patches[torch.cat(idx)]
        if augment.cfg.enabled:  # each member draws from its own generator; one pass augments them all
            x = augment.apply(x, AugmentationDraw.cat([augment.get_params(b, g_dev, x.device) for _, g_dev in gens]))
        with autocast:
            image = stack.image_features(x.view(size, b, *x.shape[1:]), runners if b == cfg.batch_size else None)
        total = None
        for g, (j, (_, g_dev)) in enumerate(zip(idx, gens, strict=True)):
            anchors = batch_anchors(positive, perms_cpu[g][i : i + cfg.batch_size], patches.device)
            with rng.use(g), autocast:
                logits, yb = stack.heads[g].head_train(image[g], rad[j], labels[j], generator=g_dev, anchors=anchors)
            loss = F.binary_cross_entropy_with_logits(logits.float(), yb.float())
            loss_sum[g] += loss.detach().double() * b
            total = loss if total is None else total + loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        seen += b
    sched.step()
    wall = time.perf_counter() - t
    losses = (loss_sum / max(seen, 1)).tolist()  # the epoch's one device sync
    lr = float(opt.param_groups[0]["lr"])
    return [{"epoch": float(epoch + 1), "train_loss": loss, "lr": lr, "epoch_seconds": wall,
             "samples_per_s": seen / max(wall, 1e-9)} for loss in losses]  # fmt: skip


def _save_checkpoint(path: Path, stack, opt, sched, gens, epoch: int, histories) -> None:
    keys = list(histories[0][0]) if histories and histories[0] else []
    state = {
        "stack": stack.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "g_cpu": [g.get_state() for g, _ in gens],
        "g_dev": [g.get_state() for _, g in gens],
        "epoch": epoch,
        "history_keys": keys,
        "history": [torch.tensor([[r[k] for k in keys] for r in h], dtype=torch.float64) for h in histories],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save(state, tmp)
    tmp.replace(path)
