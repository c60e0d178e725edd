"""Cross-validate one model on a prepared run folder, without Ray: how fast and how well a recipe learns.

The run folder is one that ``bench/compare.py`` (or ``qsmrim grid``) prepared: patches, features and splits.
Every recipe knob is a ``--set`` of :class:`qsmrim.training.TrainConfig`; the model's size is ``--kw``. Prints
one JSON line: paper-protocol PR and pROC AUC of the fold ensembles, pooled AP and ROC AUC, wall time, each
member's last training loss (bench/RESULTS.md, "Models that learn").

    python bench/learning.py runs/compare60 --model qsmrimnet --kw base_channels=4 --set epochs=30 \\
        --set lr=3e-3 --set milestones=[0.8] --set batch_size=32
    python bench/learning.py runs/demo --model qsmrimnet --kw base_channels=4 --set min_steps=200 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/radiomics.py would shadow pyradiomics (`radiomics`) for scripts run from bench/: put the repo first.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a prepared run folder (prepared/, features/, splits.json)")
    p.add_argument("--model", default="qsmrimnet")
    p.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE", help="model size, e.g. base_channels=4")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig field, e.g. lr=3e-3, milestones=[0.8], augmentation={enabled: false}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--folds", type=int, nargs="+", help="only these folds (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)

    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score

    from qsmrim.config import ConfigError, parse_overrides, section_from_dict
    from qsmrim.evaluation import evaluate_predictions
    from qsmrim.experiment import load_run_data
    from qsmrim.training import TrainConfig, fit_member
    from qsmrim.training.ensemble import fold_ensemble_predictions

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    splits = json.loads((args.run / "splits.json").read_text())
    raw = {k.removeprefix("training."): v for k, v in parse_overrides(args.overrides).items()}
    raw.update(model=args.model, model_kwargs=parse_overrides(args.kw), n_folds=len(splits), seeds=args.seeds,
               device="cpu", checkpoint_every=10**6)  # fmt: skip
    try:
        cfg = section_from_dict(TrainConfig, raw, "training")
    except ConfigError as exc:
        p.error(str(exc))
    data = load_run_data(args.run, with_features=True)
    t = time.perf_counter()
    members = [fit_member(cfg, data, splits, f, s) for f in (args.folds or range(len(splits))) for s in args.seeds]
    wall = time.perf_counter() - t
    ens = fold_ensemble_predictions(members, "paper")
    ens = ens[ens["rim"] >= 0]
    res = evaluate_predictions(ens, protocol="given", method=args.model)
    print(json.dumps({"model": args.model, "kw": cfg.model_kwargs, "set": {k: v for k, v in raw.items() if k not in (
        "model", "model_kwargs", "n_folds", "seeds", "device", "checkpoint_every")}, "seeds": args.seeds,
        "epochs": len(members[0].history), "pr_auc": round(res["pr"]["auc"], 3), "proc_auc": round(res["proc"]["auc"], 3),
        "ap_pooled": round(float(average_precision_score(ens["rim"], ens["prob"])), 3),
        "roc_auc": round(float(roc_auc_score(ens["rim"], ens["prob"])), 3), "lesions": int(len(ens)),
        "rim_pos": int(ens["rim"].sum()), "wall_s": round(wall),
        "final_loss": [round(m.history[-1]["train_loss"], 4) for m in members if m.history]}, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
