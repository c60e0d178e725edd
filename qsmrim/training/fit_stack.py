"""Fit several members together: one stacked step trains many members' networks (no Ray, no MLflow).

The members' image backbones run as one network with grouped convolutions and their heads as one module with
batched layers (:class:`qsmrim.models.MemberStack`). Each member keeps everything that makes it a member of its
own: initialisation, training rows (its fold's), batch order, augmentation and DeepSMOTE draws (its own
generators, as in :func:`~qsmrim.training.fit.fit_member`), dropout masks (drawn from its own global-generator
state, swapped in around its draws) and its Adam moments and step count
(:class:`~qsmrim.training.stack_adam.StackAdam`). A stacked fit therefore gives the members that
``fit_member`` gives, up to floating-point summation order, in about one
member's launch count: the batch-64 step that leaves a large GPU idle does every member's work.

:func:`fit_members` stacks the seeds of one fold (equal training sets: every step moves every member).
:func:`fit_stack` stacks any (fold, seed) members, e.g. a model's whole 5-fold x 3-seed grid in one process:
while every member has a full batch the step is stacked; near the end of an epoch, members whose fold is
smaller sit out the stacked steps (their weights, moments and batch-norm statistics untouched), and each
member's last short batch runs through views of its own block of the stacked weights.
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
    cohort_config,
    epoch_seed,
    finish_member,
    fit_standardisation,
    fold_rows,
    history_rows,
    history_tensor,
    make_autocast,
    member_generators,
    prepare_device,
    resolve_device,
    seeded_model,
    to_device_async,
    write_checkpoint,
)
from qsmrim.training.member import Member
from qsmrim.training.stack_adam import StackAdam

__all__ = ["fit_members", "fit_stack", "stacking_pays", "StackEpochCallback", "stack_checkpoint_name"]

log = logging.getLogger(__name__)

#: Layout of a stack checkpoint; 2: stacked heads and one list of Adam moments (2026-11-27).
_CHECKPOINT_FORMAT = 2

StackEpochCallback = Callable[[int, dict[Any, dict[str, Any]]], None]
"""Called after every epoch (after its checkpoint is written) with (epoch from 1, {member: metrics}); the keys
are seeds for :func:`fit_members` and (fold, seed) pairs for :func:`fit_stack`. Every member's metrics
carry ``checkpoint``, the stack checkpoint written at this epoch or ``""``."""


def stacking_pays(cfg: TrainConfig) -> bool:
    """Whether stacking members is faster than fitting them one after another on the device ``cfg`` trains on.

    On a GPU one stacked step does several members' work in one member's launches. On a CPU there are no launches
    to save, and grouped 3-D convolutions run about twice as long as the members' own convolutions one after
    another (3 members, batch 32, ``base_channels=4``: 0.26 s against 0.13 s per step, bench/RESULTS.md), so
    callers fit the members in turn there: the same members, up to floating-point summation order
    (``cfg.stack_on_cpu`` stacks anyway).
    """
    return cfg.stack_on_cpu or resolve_device(cfg.device).type == "cuda"


def stack_checkpoint_name(members: Sequence[int] | Sequence[tuple[int, int]]) -> str:
    """File name of a stack's checkpoint: from its seeds (one fold) or its (fold, seed) pairs; another set of
    members never resumes it."""
    pairs = [tuple(m) for m in members if not isinstance(m, int)]
    if not pairs or len({f for f, _ in pairs}) == 1:
        seeds = [s for _, s in pairs] if pairs else list(members)
        return "stack_checkpoint_seeds-" + "-".join(str(s) for s in seeds) + ".pt"
    return "stack_checkpoint_" + "-".join(f"f{f}s{s}" for f, s in pairs) + ".pt"


class _MemberRNG:
    """Each member's own state of torch's global generators (dropout draws), swapped in around its draws."""

    def __init__(self, members: Sequence[tuple[int, int]], epoch: int, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.states = []
        for fold, seed in members:
            torch.manual_seed(epoch_seed(seed, fold, epoch))
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
    seeds = [int(s) for s in seeds]
    each = (lambda e, rows: on_epoch(e, {s: r for (_, s), r in rows.items()})) if on_epoch is not None else None
    return fit_stack(cfg, data, splits, [(fold, s) for s in seeds], out_dirs=out_dirs, checkpoint_dir=checkpoint_dir,
                     on_epoch=each, resume=resume)  # fmt: skip


def fit_stack(
    cfg: TrainConfig,
    data: LesionDataset,
    splits: list[dict[str, list[str]]],
    members: Sequence[tuple[int, int]],
    *,
    out_dirs: Sequence[str | Path] | None = None,
    checkpoint_dir: str | Path | None = None,
    on_epoch: StackEpochCallback | None = None,
    resume: bool = True,
) -> list[Member]:
    """Train the (fold, seed) ``members`` of ``cfg.model`` as one stack; return them in the given order.

    Members may come from different folds (see the module doc); otherwise as :func:`fit_members`.
    """
    from qsmrim.models import MemberStack, is_stackable

    members = [(int(f), int(s)) for f, s in members]
    if not members or len(set(members)) != len(members):
        raise ValueError(f"members must be distinct (fold, seed) pairs and at least one, not {members}")
    if not is_stackable(cfg.model):
        raise ValueError(f"model {cfg.model!r} cannot be trained stacked; use fit_member per seed")
    if out_dirs is not None and len(out_dirs) != len(members):
        raise ValueError(f"out_dirs must name one folder per member ({len(members)}), not {len(out_dirs)}")
    t0 = time.perf_counter()
    cfg = cohort_config(cfg, data)
    folds = sorted({f for f, _ in members})
    rows = {f: fold_rows(cfg, data, splits, f) for f in folds}
    models = [seeded_model(cfg, s) for _, s in members]
    stds = {f: fit_standardisation(cfg, data, rows[f], models[0].uses_radiomics) for f in folds}
    device = resolve_device(cfg.device)
    stack = MemberStack(models)
    stack.memory_format = prepare_device(cfg, device)
    stack = stack.to(device, memory_format=stack.memory_format)
    del models
    ckpt = Path(checkpoint_dir) / stack_checkpoint_name(members) if checkpoint_dir is not None else None
    histories, steps = _train_stack(cfg, stack, data, rows, stds, members, device, ckpt, on_epoch, resume)
    trained = stack.unstack()
    del stack
    share = (time.perf_counter() - t0) / len(members)
    out = []
    for g, ((fold, seed), model) in enumerate(zip(members, trained, strict=True)):
        for m in model.modules():  # batch norms count this member's steps, not the stack's
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(steps[g])
        model.eval()
        member = Member(cfg.model, dict(cfg.model_kwargs), fold, seed, {}, stds[fold], data.feature_names,
                        history=histories[g], model=model.cpu() if device.type != "cpu" else model)  # fmt: skip
        member.metrics["stack_size"] = len(members)
        out.append(finish_member(cfg, member, data, rows[fold], fit_seconds=share,
                                 out_dir=out_dirs[g] if out_dirs is not None else None))  # fmt: skip
    if out_dirs is not None and ckpt is not None:  # every member is saved: drop the resume point
        ckpt.unlink(missing_ok=True)
    return out


def _epoch_lr(cfg: TrainConfig, epochs_done: int) -> float:
    """MultiStepLR's learning rate after ``epochs_done`` scheduler steps."""
    return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestone_epochs() if m <= epochs_done)


def _train_stack(cfg, stack, data, rows, stds, members, device, ckpt, on_epoch, resume):
    # Every row any member fits goes to the device once; each member indexes its own.
    union = np.unique(np.concatenate([r.fit for r in rows.values()]))
    fit_local = [torch.as_tensor(np.searchsorted(union, rows[f].fit)) for f, _ in members]
    patches = torch.as_tensor(np.ascontiguousarray(data.patches[union]), device=device)
    labels = torch.as_tensor(data.labels[union].astype(np.float32), device=device)
    rads = None  # [rows, G, features]: each member's standardised radiomics (its fold's standardisation)
    if stack.head.uses_radiomics:
        by_fold = {f: torch.as_tensor(std.transform(data.radiomics[union]), dtype=torch.float32, device=device)
                   for f, std in stds.items()}  # fmt: skip
        rads = torch.stack([by_fold[f] for f, _ in members], 1)
        del by_fold
    opt = StackAdam(stack, lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = TrainAugmentation(cfg.augmentation)
    gens = [member_generators(s, f, device) for f, s in members]
    autocast = make_autocast(cfg, device)
    histories: list[list[dict[str, float]]] = [[] for _ in members]
    start_epoch = 0
    state = torch.load(ckpt, map_location=device, weights_only=True) if ckpt is not None and resume and ckpt.exists() else None
    if state is not None and state.get("format") != _CHECKPOINT_FORMAT:
        log.warning("%s was written by another version of the stacked trainer (format %s, this one reads %d); "
                    "training members %s from the start", ckpt, state.get("format", 1), _CHECKPOINT_FORMAT, members)  # fmt: skip
        state = None
    if state is not None:  # our own local file, tensors only
        stack.load_state_dict(state["stack"])
        opt.load_state_dict(state["optimizer"])
        for (g_cpu, g_dev), s_cpu, s_dev in zip(gens, state["g_cpu"], state["g_dev"], strict=True):
            g_cpu.set_state(s_cpu)
            g_dev.set_state(s_dev.cpu())
        start_epoch = int(state["epoch"])
        histories = [history_rows(state["history_keys"], h) for h in state["history"]]
        log.info("members %s: resuming at epoch %d from %s", members, start_epoch + 1, ckpt)
    positive = (labels > 0.5).cpu()
    runners = _graphed_backbones(cfg, stack, patches, device) if start_epoch < cfg.epochs else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for epoch in range(start_epoch, cfg.epochs):
            opt.lr = _epoch_lr(cfg, epoch)
            rng = _MemberRNG(members, epoch, device)
            epoch_rows = _train_epoch(cfg, stack, opt, augment, patches, rads, labels, positive, fit_local, gens, rng,
                                      autocast, epoch, runners)  # fmt: skip
            for h, row in zip(histories, epoch_rows, strict=True):
                h.append(row)
            saved = ckpt is not None and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs)
            if saved:
                _save_checkpoint(ckpt, stack, opt, gens, epoch + 1, histories)
            if on_epoch is not None:
                on_epoch(epoch + 1, {m: {**h[-1], "checkpoint": str(ckpt) if saved else "", "epochs": cfg.epochs}
                                     for m, h in zip(members, histories, strict=True)})  # fmt: skip
    return histories, list(opt.steps)


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
    statistics are restored and their gradients dropped afterwards. A replay may hand out its static gradient
    buffers as ``.grad`` (pytorch/pytorch#181723), so every step runs one backward, steps and drops the
    gradients: never accumulate gradients over several backward passes here.
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


def _schedule(sizes: list[int], batch: int) -> list[tuple[list[int], list[int], int]]:
    """An epoch's steps as (members that step, each member's batch start, batch size), in each member's order.

    Full batches go stacked while every member has one; then the members with more full batches step on
    their own slots; then the short last batches (of at least 2 rows, as ``fit_member``), stacked when all
    members share one size, else one member at a time.
    """
    full = [n // batch for n in sizes]
    steps = [([g for g in range(len(sizes)) if k < full[g]], [k * batch] * len(sizes), batch) for k in range(max(full))]
    tails = [n - f * batch for n, f in zip(sizes, full, strict=True)]
    starts = [f * batch for f in full]
    if len(set(tails)) == 1 and tails[0] >= 2:
        steps.append((list(range(len(sizes))), starts, tails[0]))
    else:
        steps += [([g], starts, tails[g]) for g in range(len(sizes)) if tails[g] >= 2]
    return steps


def _train_epoch(cfg, stack, opt, augment, patches, rads, labels, positive, fit_local, gens, rng, autocast, epoch,
                 runners=None) -> list[dict[str, float]]:  # fmt: skip
    t = time.perf_counter()
    stack.train()
    size = stack.n_members
    device = patches.device
    dtype = autocast.fast_dtype if isinstance(autocast, torch.autocast) else torch.float32
    members = torch.arange(size, device=device)
    order_cpu = [rows[torch.randperm(len(rows), generator=g_cpu)] for rows, (g_cpu, _) in zip(fit_local, gens, strict=True)]
    order = [o.to(device) for o in order_cpu]
    order_np, positive_np = [o.numpy() for o in order_cpu], positive.numpy()

    def rim_rows(g: int, start: int, b: int) -> np.ndarray:  # member g's rim+ rows of its batch, found on the host
        return np.flatnonzero(positive_np[order_np[g][start : start + b]])

    loss_sum = torch.zeros(size, dtype=torch.float64, device=device)
    seen = [0] * size
    for active, starts, b in _schedule([len(o) for o in order_cpu], cfg.batch_size):
        idx = {g: order[g][starts[g] : starts[g] + b] for g in active}
        draws = {g: augment.get_params(b, gens[g][1], device) for g in active} if augment.cfg.enabled else {}
        idle = [g for g in range(size) if g not in active]
        saved = None
        if len(active) == 1 and size > 1 and b != cfg.batch_size:  # one member's short batch: its own block
            (g,) = active
            x = augment.apply(patches[idx[g]], draws[g]) if draws else patches[idx[g]]
            anchors = to_device_async(torch.from_numpy(rim_rows(g, starts[g], b)), device)
            rad = rads[idx[g], g] if rads is not None else torch.zeros(b, 0, device=device)
            with rng.use(g), autocast:
                logits, yb = stack.head.member_head_train(g, stack.member_image_features(g, x), rad, labels[idx[g]],
                                                          generator=gens[g][1], anchors=anchors)  # fmt: skip
            total = F.binary_cross_entropy_with_logits(logits.float(), yb.float())
            loss_sum[g] += total.detach().double() * b
        else:
            x = patches[torch.cat([idx[g] for g in active])]
            if draws:  # each member drew from its own generator; one pass augments them all
                x = augment.apply(x, AugmentationDraw.cat([draws[g] for g in active]))
            rows = torch.stack([idx[g] if g in idx else idx[active[0]] for g in range(size)], 1)  # [b, G]
            if idle:  # members without a batch at this step get zeros; their results are thrown away
                full = torch.zeros((size, b, *patches.shape[1:]), device=device, dtype=x.dtype)
                full[to_device_async(torch.as_tensor(active), device)] = x.view(len(active), b, *x.shape[1:])
                x = full.view(size * b, *x.shape[1:])
                saved = _batch_norm_blocks(stack, idle)
            head_draw = stack.head.draw(
                b, [rim_rows(g, starts[g], b) if g in idx else None for g in range(size)],
                [gens[g][1] for g in range(size)], rng.use, device, dtype)  # fmt: skip
            with autocast:
                image = stack.image_block_features(x.view(size, b, *x.shape[1:]), runners if b == cfg.batch_size else None)
                rad = rads[rows, members].view(b, -1) if rads is not None else None
                logits, yb = stack.head.forward_train(image, rad, labels[rows], head_draw)
            bce = F.binary_cross_entropy_with_logits(logits.float(), yb.float(), reduction="none")
            loss = (bce * head_draw.weights).sum(0)  # [G]: each member's batch loss (0 for those that sit out)
            loss_sum += loss.detach().double() * b
            total = loss.sum()
        for g in active:
            seen[g] += b
        opt.zero_grad()
        total.backward()
        opt.step(active if idle else None)
        if saved is not None:  # members that sat out keep their batch-norm statistics (restored after backward,
            _restore_batch_norm_blocks(stack, idle, saved)  # which still holds the buffers it saw)
    wall = time.perf_counter() - t
    losses = (loss_sum / torch.tensor([max(n, 1) for n in seen], dtype=torch.float64, device=device)).tolist()
    lr = _epoch_lr(cfg, epoch + 1)  # after the epoch's scheduler step, as fit_member records it
    return [{"epoch": float(epoch + 1), "train_loss": loss, "lr": lr, "epoch_seconds": wall,
             "samples_per_s": n / max(wall, 1e-9)} for loss, n in zip(losses, seen, strict=True)]  # fmt: skip


def _batch_norm_blocks(stack, members: list[int]) -> list[torch.Tensor]:
    g = stack.n_members
    idx = to_device_async(torch.as_tensor(members), next(stack.parameters()).device)
    return [b.unflatten(0, (g, -1)).index_select(0, idx).clone() for b in _running_stats(stack)]


def _restore_batch_norm_blocks(stack, members: list[int], saved: list[torch.Tensor]) -> None:
    g = stack.n_members
    idx = to_device_async(torch.as_tensor(members), next(stack.parameters()).device)
    with torch.no_grad():
        for b, s in zip(_running_stats(stack), saved, strict=True):
            b.unflatten(0, (g, -1)).index_copy_(0, idx, s)


def _running_stats(stack) -> list[torch.Tensor]:
    return [b for b in stack.buffers() if b.ndim > 0]


def _save_checkpoint(path: Path, stack, opt, gens, epoch: int, histories) -> None:
    keys = list(histories[0][0]) if histories and histories[0] else []
    write_checkpoint(path, {
        "format": _CHECKPOINT_FORMAT,
        "stack": stack.state_dict(),
        "optimizer": opt.state_dict(),
        "g_cpu": [g.get_state() for g, _ in gens],
        "g_dev": [g.get_state() for _, g in gens],
        "epoch": epoch,
        "history_keys": keys,
        "history": [history_tensor(h, keys) for h in histories],
    })  # fmt: skip
