"""Ray job: the whole pipeline of DESIGN §1 for an experiment config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.pipeline --config platform/experiments/paper.yaml --data /abs/bids --base-dir "$PWD"

Stages (each resumable): cohort -> lesion table + patches -> radiomics (Dask, or Dask on Ray with
``--scheduler ray``) -> fold x seed grid (Ray Tune + Train, MLflow) -> evaluation report -> one ONNX
ensemble, registered in MLflow as ``qsmrim`` (alias ``champion`` when its CV PR AUC is at least the current
champion's). ``qsmrim demo`` runs this and then serves one prediction over HTTP.

A submitted job runs in Ray's temporary copy of ``--working-dir``: ``--base-dir`` (or an absolute
``runs_dir`` and ``--tracking-uri``) says where its run folder and MLflow store persist; the job refuses to
start when they would land in the copy (:func:`qsmrim.locations.locate_results`).
"""

from __future__ import annotations

import argparse
import json
import logging

from jobs._runtime import require_runtime


def build_parser() -> argparse.ArgumentParser:
    from qsmrim.locations import add_location_arguments

    p = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--run", help="run folder (default <runs_dir>/<name>); an existing one is resumed")
    p.add_argument("--scheduler", default=None, help="radiomics scheduler: local | ray | tcp://HOST:PORT")
    p.add_argument("--no-register", action="store_true", help="export the ONNX ensemble but do not register it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true")
    add_location_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    require_runtime("jobs.pipeline")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from qsmrim.console import run_reporting_errors
    from qsmrim.locations import config_from_args
    from qsmrim.pipeline import run_pipeline

    def _run() -> int:
        cfg, where = config_from_args(args, run=args.run)
        print(f"results: {where.describe()}", flush=True)
        summary = run_pipeline(cfg, where.run_dir, scheduler=args.scheduler, register=not args.no_register,
                               progress=not args.no_progress, tracking_uri=where.tracking_uri)  # fmt: skip
        print(json.dumps(summary, indent=1, default=str))
        print(f"results: {where.describe()}", flush=True)
        return 1 if summary["grid"]["errors"] else 0

    return run_reporting_errors(_run)


if __name__ == "__main__":
    raise SystemExit(main())
