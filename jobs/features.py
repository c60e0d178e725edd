"""Ray/Dask job: the 527 radiomic features of every lesion of an experiment's cohort.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.features --config platform/experiments/ci.yaml --scheduler ray --base-dir "$PWD"

``--scheduler`` is ``local`` (a Dask LocalCluster, default), ``ray`` (Dask on Ray: no separate Dask
cluster inside a Ray job), or ``tcp://HOST:PORT`` (an existing Dask scheduler, e.g. dask-kubernetes).
"""

from __future__ import annotations

import argparse
import logging

from jobs._runtime import require_runtime


def main(argv: list[str] | None = None) -> int:
    require_runtime("jobs.features")
    from qsmrim.locations import add_location_arguments

    p = argparse.ArgumentParser(prog="python -m jobs.features", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--run", help="run folder (default <runs_dir>/<name>)")
    p.add_argument("--scheduler", default=None, help="local | ray | tcp://HOST:PORT")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    add_location_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from qsmrim.console import run_reporting_errors
    from qsmrim.experiment import features_path
    from qsmrim.fanout.features import extract_cohort
    from qsmrim.locations import config_from_args
    from qsmrim.prepare import prepare_cohort
    from qsmrim.training.layout import RunLayout

    def _run() -> int:
        cfg, where = config_from_args(args, run=args.run)
        run = where.run_dir
        print(f"results: run folder {run}", flush=True)
        prep = prepare_cohort(cfg, RunLayout(run).prepared)
        res = extract_cohort(prep.outputs["cohort"], features_path(run).parent, scheduler=args.scheduler,
                             lesions=cfg.data.lesion_source())  # fmt: skip
        print(f"features of {res.n_lesions} lesions -> {res.path} ({res.seconds:.1f} s, {res.scheduler}; "
              f"{len(res.computed)} subject(s) computed, {len(res.cached)} cached)")  # fmt: skip
        return 0

    return run_reporting_errors(_run)


if __name__ == "__main__":
    raise SystemExit(main())
