"""CV comparison of every method (paper Tables 2 and 3) on a synthetic cohort, without Ray.

Trains each model of ``platform/experiments/comparison.yaml`` on the same stratified folds with the
sequential backend (:func:`qsmrim.experiment.train_local`), evaluates the fold ensembles and prints the
methods ranked by PR AUC. Sized by flags so it fits a laptop; the paper setting is the config as is.

    python bench/compare.py --subjects 60 --epochs 4 --seeds 0 --base-channels 4 --out runs/compare60
    python bench/compare.py --subjects 60 --epochs 30 --recipe platform/experiments/demo.yaml --out runs/compare60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/radiomics.py would shadow pyradiomics (`radiomics`) for scripts run from bench/: put the repo first.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


#: The keys of a training recipe (how long and how fast a member learns), as opposed to what it trains.
RECIPE_KEYS = ("lr", "batch_size", "milestones", "gamma", "weight_decay", "min_steps")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=60)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--base-channels", type=int, default=4)
    p.add_argument("--models", nargs="+")
    p.add_argument("--difficulty", type=float, help="synthetic cohort difficulty (default: the config's)")
    p.add_argument("--recipe", type=Path, metavar="YAML",
                   help="take the training recipe (lr, batch_size, milestones, gamma, weight_decay, min_steps) from "
                        "this experiment config, e.g. platform/experiments/demo.yaml (the small-cohort recipe)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="any config override, e.g. training.lr=1e-3 (repeatable)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    args = p.parse_args(argv)

    from qsmrim.config import load_config, parse_overrides
    from qsmrim.experiment import prepare_run, train_local
    from qsmrim.training.evaluate_run import evaluate_run

    over = {"data.synth_subjects": args.subjects, "training.epochs": args.epochs, "training.seeds": args.seeds,
            "training.model_kwargs": {}, "training.device": "auto",
            "model_overrides": {"qsmrimnet": {"base_channels": args.base_channels},
                                "image-channel": {"base_channels": args.base_channels},
                                "image-rimnet": {"base_channels": args.base_channels},
                                "image-radiomics": {"base_channels": args.base_channels},
                                "rimnet": {"channels": [2 * args.base_channels, 4 * args.base_channels,
                                                        8 * args.base_channels]},
                                "aprl-nn": {},  # the paper's MLP: cheap at full size
                                "aprl-rf": {"n_estimators": 300}}}  # fmt: skip
    if args.models:
        over["models"] = args.models
    if args.difficulty is not None:
        over["data.synth_difficulty"] = args.difficulty
    if args.recipe is not None:
        recipe = load_config(args.recipe).training
        over.update({f"training.{k}": getattr(recipe, k) for k in RECIPE_KEYS})
    over.update(parse_overrides(args.overrides))
    cfg = load_config(REPO / "platform/experiments/comparison.yaml", over)
    t = time.perf_counter()
    prepare_run(cfg, args.out)
    t_prep = time.perf_counter() - t
    train_local(cfg, args.out)
    t_train = time.perf_counter() - t - t_prep
    results = evaluate_run(args.out)
    rows = sorted(((label, r) for label, r in results.items() if "[honest]" not in label),
                  key=lambda kv: -(kv[1]["pr"]["auc"] or 0))  # fmt: skip
    print(f"\n{args.subjects} subjects, {results[rows[0][0]]['n_lesions']} lesions, seeds {args.seeds}, "
          f"{args.epochs} epochs; prepare {t_prep:.0f} s, train {t_train:.0f} s")  # fmt: skip
    print(f"{'method':<18} {'PR AUC':>7} {'pROC AUC':>9} {'F1':>6} {'sens':>6} {'PPV':>6} {'r':>6} {'MSE':>6}")
    for label, r in rows:
        f = lambda v: f"{v:.3f}" if isinstance(v, int | float) else "  n/a"  # noqa: E731
        print(f"{label:<18} {f(r['pr']['auc']):>7} {f(r['proc']['auc']):>9} {f(r['lesion']['f1']):>6} "
              f"{f(r['lesion']['sensitivity']):>6} {f(r['lesion']['ppv']):>6} {f(r['subject']['r']):>6} "
              f"{f(r['subject']['mse']):>6}")  # fmt: skip
    (args.out / "comparison.json").write_text(json.dumps({k: {"pr_auc": v["pr"]["auc"], "proc_auc": v["proc"]["auc"],
                                                              "f1": v["lesion"]["f1"]} for k, v in results.items()}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
