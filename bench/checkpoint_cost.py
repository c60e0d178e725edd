"""What a grid trial's resume checkpoint costs at paper width: write, hand to Ray Train, Ray's copy to storage.

A stacked trial's checkpoint holds its members' weights and both Adam moments (``fit_stack``): about 0.42 GB
per member at ``base_channels=64``. Each checkpoint is written once (atomically) and reported to Ray Train,
which copies it into the run's storage; this times the write (``write_checkpoint``, as ``fit_stack`` calls it),
the report hand-off (a hard link, as ``qsmrim.grid.ray_grid`` does, or a copy) and one storage copy, and
projects them over a 40-epoch trial for a checkpoint every epoch and every 10. Needs only torch.

    python bench/checkpoint_cost.py --members 3 15 --json bench/results/checkpoint_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def measure(n_members: int, base: int, repeats: int, where: Path) -> dict:

    from qsmrim.models import MemberStack, build_model
    from qsmrim.training.fit import write_checkpoint
    from qsmrim.training.stack_adam import StackAdam

    stack = MemberStack([build_model("qsmrimnet", base_channels=base) for _ in range(n_members)])
    opt = StackAdam(stack, lr=1e-4)
    state = {"stack": stack.state_dict(), "optimizer": opt.state_dict()}
    size = sum(t.numel() * t.element_size() for t in [*state["stack"].values(), *opt.exp_avg, *opt.exp_avg_sq])
    rows = []
    for _ in range(repeats):
        d = Path(tempfile.mkdtemp(dir=where, prefix="ckpt-bench-"))
        try:
            t = time.perf_counter()
            write_checkpoint(d / "stack.pt", state)
            write = time.perf_counter() - t
            t = time.perf_counter()
            os.link(d / "stack.pt", d / "linked.pt")
            link = time.perf_counter() - t
            t = time.perf_counter()
            shutil.copy2(d / "stack.pt", d / "copied.pt")
            copy = time.perf_counter() - t
            rows.append({"write_s": write, "link_s": link, "copy_s": copy})
        finally:
            shutil.rmtree(d, ignore_errors=True)
    best = {k: min(r[k] for r in rows) for k in rows[0]}
    per_ckpt_now = best["write_s"] + best["link_s"] + best["copy_s"]  # write, link for the report, Ray's copy
    per_ckpt_before = best["write_s"] + 2 * best["copy_s"]  # write, copy for the report, Ray's copy
    return {"members": n_members, "gb": size / 1e9, "runs": rows, "best": best,
            "per_checkpoint_s": per_ckpt_now, "per_checkpoint_before_s": per_ckpt_before,
            "trial_40_epochs_every_1_before_s": 40 * per_ckpt_before, "trial_40_epochs_every_10_s": 4 * per_ckpt_now}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, nargs="+", default=[3, 15])
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="filesystem to write on")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    out = {"machine": platform.node(), "torch": torch.__version__, "dir": str(args.dir), "results": []}
    for g in args.members:
        row = measure(g, args.base_channels, args.repeats, args.dir)
        out["results"].append(row)
        b = row["best"]
        print(f"{g} members, {row['gb']:.2f} GB: write {b['write_s']:.2f} s, link {b['link_s'] * 1e3:.2f} ms, "
              f"copy {b['copy_s']:.2f} s; 40-epoch trial: every epoch (before) {row['trial_40_epochs_every_1_before_s']:.0f} s, "
              f"every 10 (now) {row['trial_40_epochs_every_10_s']:.0f} s", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
