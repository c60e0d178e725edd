"""Orchestration overhead of the Ray grid: wall time minus the sum of member compute.

Runs :func:`qsmrim.grid.ray_grid.run_grid` on the CI cohort with trivial members (tiny network, 1 epoch) so
that nearly all of the wall time is Ray Tune + Ray Train + MLflow orchestration, and reports
``overhead = wall - sum(fit_seconds) / concurrency``. The GPU part of the paper grid is measured by
``bench/train.py`` on the GPU machine (Ray is not available there); add the two for the paper estimate.

    python bench/grid.py --folds 5 --seeds 0 1 2 --json bench/results/grid_cpu.json              # 5 stacked trials
    python bench/grid.py --folds 5 --seeds 0 1 2 --no-stack --json bench/results/grid_cpu_flat.json  # 15 trials
    python bench/grid.py --folds 5 --seeds 0 1 2 --stack-folds --json bench/results/grid_cpu_model.json  # 1 trial
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/radiomics.py would shadow pyradiomics (`radiomics`) for scripts run from bench/: put the repo first.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--no-stack", dest="stack", action="store_false", help="one trial per member (grid.stack_seeds false)")
    p.add_argument("--stack-folds", action="store_true", help="one trial for the whole grid (grid.stack_folds)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from qsmrim.config import load_config
    from qsmrim.grid.ray_grid import run_grid
    from qsmrim.training.layout import iter_member_dirs

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlruns.db")
        cfg = load_config(REPO / "platform/experiments/ci.yaml", {
            "runs_dir": tmp, "models": ["image-channel"], "training.n_folds": args.folds,
            "training.seeds": args.seeds, "training.epochs": args.epochs, "training.inner_val_fraction": 0.0,
            "data.synth_subjects": max(6, 2 * args.folds), "grid.stack_seeds": args.stack,
            "grid.stack_folds": args.stack_folds})  # fmt: skip
        from qsmrim.experiment import prepare_run

        prepare_run(cfg)  # data preparation is not orchestration: keep it out of the clock
        t = time.perf_counter()
        res = run_grid(cfg, progress=False, evaluate=False)
        wall = time.perf_counter() - t
        fits = [json.loads((f / "member.json").read_text())["metrics"]["fit_seconds"]
                for *_, f in iter_member_dirs(Path(tmp) / "ci")]  # fmt: skip
        import ray

        cpus = ray.cluster_resources().get("CPU", 1)
    conc = max(1, min(int(cpus // cfg.grid.cpus_per_trial), res["trials"]))  # trials that can run at once
    out = {"stack_seeds": args.stack, "stack_folds": args.stack_folds, "trials": res["trials"], "members": len(fits), "errors": len(res["errors"]), "wall_s": wall, "sum_fit_s": sum(fits),
           "concurrency": conc, "overhead_s": wall - sum(fits) / conc,
           "overhead_per_trial_s": (wall - sum(fits) / conc) / max(res["trials"], 1) * conc}  # fmt: skip
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
