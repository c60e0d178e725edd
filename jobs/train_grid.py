"""Ray job: the fold x seed (x model) grid with MLflow tracking.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.train_grid --config platform/experiments/ci.yaml --base-dir "$PWD"

``--base-dir`` (or an absolute ``runs_dir`` and ``--tracking-uri``): where the run folder and the MLflow store
persist, outside Ray's temporary copy of the working folder (see :mod:`jobs.pipeline`).
"""

from __future__ import annotations

import argparse
import logging

from jobs._runtime import require_runtime


def build_parser() -> argparse.ArgumentParser:
    from qsmrim.locations import add_location_arguments

    p = argparse.ArgumentParser(prog="python -m jobs.train_grid", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--run", help="run folder (default <runs_dir>/<name>); an existing one is resumed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true", help="no live trial table")
    add_location_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    require_runtime("jobs.train_grid")
    from qsmrim.console import print_grid_result, run_reporting_errors
    from qsmrim.locations import config_from_args

    def _run() -> int:
        from qsmrim.grid.ray_grid import run_grid

        cfg, where = config_from_args(args, run=args.run)
        print(f"results: {where.describe()}", flush=True)
        result = run_grid(cfg, where.run_dir, progress=not args.no_progress, tracking_uri=where.tracking_uri)
        return print_grid_result(result)

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(_run)


if __name__ == "__main__":
    raise SystemExit(main())
