"""Ray job: the fold x seed (x model) grid with MLflow tracking.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.train_grid --config platform/experiments/ci.yaml
"""

from __future__ import annotations

import argparse
import logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_grid", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--run", help="run folder (default <runs_dir>/<name>); an existing one is resumed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true", help="no live trial table")
    return p


def main(argv: list[str] | None = None) -> int:
    from qsmrim.config import load_config, parse_overrides
    from qsmrim.console import print_grid_result, run_reporting_errors

    def _run() -> int:
        from qsmrim.grid.ray_grid import run_grid

        result = run_grid(load_config(args.config, parse_overrides(args.set)), args.run, progress=not args.no_progress)
        return print_grid_result(result)

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(_run)


if __name__ == "__main__":
    raise SystemExit(main())
