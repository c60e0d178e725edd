"""Operations dispatched per stacked training step, by phase: the launch count that bounds a small step on a GPU.

A batch-64 step of the paper's network leaves a large GPU idle; its time is the host's time to launch its
kernels (``bench/RESULTS.md``). This counts the operations each phase of a :func:`fit_stack` step dispatches
(views, allocations and scalar reads left out), on the CPU, so the figure needs no GPU and does not depend on
the network's width. On CUDA each counted operation is about one kernel launch, except that a multi-tensor
(``_foreach``) operation is one launch per ~100 tensors, and that with ``training.cuda_graphs`` the backbone's
forward and backward are one graph replay.

    python bench/step_ops.py --members 3 15 --json bench/results/step_ops_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

_NOT_LAUNCHES = {
    "view", "_unsafe_view", "as_strided", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select",
    "detach", "alias", "unflatten", "reshape", "permute", "split", "chunk", "unbind", "_reshape_alias",
    "split_with_sizes", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "set_", "_local_scalar_dense", "is_same_size",
}  # fmt: skip


def count_step_ops(n_members: int, *, lesions: int, base: int, batch: int) -> dict:
    """Train one epoch of a stack of ``n_members`` (one fold's seeds for up to 3, else folds x seeds) and count."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.train import _dataset
    from qsmrim.models.stacked import MemberStack
    from qsmrim.models.stacked_head import StackedHead
    from qsmrim.training import TrainConfig, make_splits
    from qsmrim.training.augment import TrainAugmentation

    fs = importlib.import_module("qsmrim.training.fit_stack")
    counts: dict[str, list[int]] = collections.defaultdict(list)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__.rstrip("_") not in _NOT_LAUNCHES:
                self.n += 1
            return func(*args, **(kwargs or {}))

    @contextmanager
    def patched(owner, name, phase):
        orig = getattr(owner, name)

        def wrapper(*a, **k):  # nested modes: an operation counts in its phase and in the epoch around it
            mode = Count()
            try:
                with mode:
                    return orig(*a, **k)
            finally:
                counts[phase].append(mode.n)

        setattr(owner, name, wrapper)
        try:
            yield
        finally:
            setattr(owner, name, orig)

    data = _dataset(lesions, 40)
    splits = make_splits(data.rim_counts(), 5, 0)
    cfg = TrainConfig(model="qsmrimnet", model_kwargs={"base_channels": base}, epochs=1, device="cpu",
                      inner_val_fraction=0.2, batch_size=batch)  # fmt: skip
    members = [(0, s) for s in range(n_members)] if n_members <= 3 else [(f, s) for f in range(5) for s in range(3)][:n_members]
    phases = [(fs.StackAdam, "step", "optimizer"), (MemberStack, "image_block_features", "backbone forward"),
              (MemberStack, "member_image_features", "backbone forward"),
              (StackedHead, "draw", "head draws (dropout masks, DeepSMOTE weights)"),
              (StackedHead, "forward_train", "heads forward"), (StackedHead, "member_head_train", "heads forward"),
              (torch.Tensor, "backward", "backward"), (TrainAugmentation, "get_params", "augmentation draws"),
              (TrainAugmentation, "apply", "augmentation"), (fs, "_train_epoch", "epoch")]  # fmt: skip
    ctxs = [patched(o, n, p) for o, n, p in phases]
    for c in ctxs:
        c.__enter__()
    try:
        fs.fit_stack(cfg, data, splits, members)
    finally:
        for c in reversed(ctxs):
            c.__exit__(None, None, None)
    steps = len(counts["optimizer"])
    total = sum(counts.pop("epoch"))
    per_step = {p: sum(v) / steps for p, v in counts.items()}
    per_step["other (indexing, losses, batch-norm bookkeeping)"] = (total - sum(map(sum, counts.values()))) / steps
    per_step["total"] = total / steps
    return {"members": n_members, "steps": steps, "ops_per_step": per_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, nargs="+", default=[3, 15])
    p.add_argument("--lesions", type=int, default=600)
    p.add_argument("--base-channels", type=int, default=4, help="width does not change the count; narrow is fast")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    out = {"machine": platform.node(), "torch": torch.__version__, "results": []}
    for g in args.members:
        row = count_step_ops(g, lesions=args.lesions, base=args.base_channels, batch=args.batch)
        out["results"].append(row)
        print(f"{g} members, {row['steps']} steps:")
        for phase, n in row["ops_per_step"].items():
            print(f"  {phase:52s} {n:8.1f} ops/step")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
