"""Parity on the device: CUDA-graphed against eager stacked fits, and stacked fits against ``fit_member``.

Same data, same seeds; ``training.cuda_graphs`` on and off, then each seed alone (``fit_member``). Prints the
largest differences of the members' epoch losses, test probabilities and weights. cuDNN may pick other
algorithms under capture and the stacked step sums in another order, so the figures are float-summation
sized, not zero; a broken stacked path on the GPU shows as differences of order 1e-1.

    python bench/graph_parity.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--lesions", type=int, default=800)
    p.add_argument("--base-channels", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import numpy as np

    from bench.train import _dataset
    from qsmrim.training import TrainConfig, fit_member, make_splits
    from qsmrim.training.fit_stack import fit_members

    data = _dataset(args.lesions, 40)
    splits = make_splits(data.rim_counts(), 5, 0)
    runs = {}
    for graphs in (False, True):
        cfg = TrainConfig(model="qsmrimnet", model_kwargs={"base_channels": args.base_channels}, epochs=args.epochs,
                          device=args.device, cuda_graphs=graphs, inner_val_fraction=0.2)  # fmt: skip
        runs[graphs] = fit_members(cfg, data, splits, 0, [0, 1, 2])
    runs["members"] = [fit_member(cfg, data, splits, 0, s) for s in (0, 1, 2)]

    def diff(left, right) -> dict:
        out = {"loss": 0.0, "prob": 0.0, "weight": 0.0}
        for a, b in zip(left, right, strict=True):
            out["loss"] = max(out["loss"], max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a.history, b.history, strict=True)))
            out["prob"] = max(out["prob"], float(np.abs(a.predictions["prob"].to_numpy() - b.predictions["prob"].to_numpy()).max()))
            for v, w in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
                if v.is_floating_point():
                    out["weight"] = max(out["weight"], float((v - w).abs().max()))
        return out

    out = diff(runs[False], runs[True])
    out["stacked_vs_fit_member"] = diff(runs[False], runs["members"])
    out["loss_first_member"] = [h["train_loss"] for h in runs[True][0].history]
    print("graphs vs eager (and stacked vs fit_member), max abs diff:", json.dumps(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
