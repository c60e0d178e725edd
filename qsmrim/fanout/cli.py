"""``qsmrim features ROOT --out DIR``: the thin command-line entry to :func:`qsmrim.fanout.features.extract_cohort`.

Wire it into the main parser with ``add_features_parser(subparsers)``; the parser's ``func`` default is
:func:`features_main`. Importing this module is cheap (no pyradiomics, Dask or Ray until it runs).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qsmrim.console import add_lesion_source_args, lesion_source

__all__ = ["add_features_parser", "features_main"]


def add_features_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``features`` sub-command to an ``argparse`` sub-parser collection and return it."""
    p = subparsers.add_parser(
        "features",
        help="extract the 527 radiomic features of every lesion (Dask or Ray; cached, resumable)",
        description="Extract the paper's 527 pyradiomics features per lesion into OUT/features.parquet "
        "(plus one Parquet per subject in OUT/subjects/). Subjects whose inputs and settings are unchanged "
        "since an earlier run are reused.",
    )
    p.add_argument("root", help="BIDS root or CSV manifest")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--scheduler",
        default="local",
        help="'local' (new LocalCluster, default), 'tcp://HOST:PORT' (running Dask scheduler), "
        "'ray' (Ray cluster via Dask-on-Ray; RAY_ADDRESS if set) or 'sync' (in-process, for debugging)",
    )
    p.add_argument(
        "--workers", type=int, help="worker processes for 'local' / CPUs for a local Ray (default: all CPUs)"
    )
    p.add_argument("--chunk-lesions", type=int, help="lesions per task (default: automatic, 16-64)")
    p.add_argument("--bin-width", type=float, default=25.0, help="grey-level bin width in ppb (default 25)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lesion_source_args(p)
    p.set_defaults(func=features_main)
    return p


def features_main(args: argparse.Namespace) -> int:
    """Run the extraction for parsed arguments; print a summary; return the exit code."""
    from qsmrim.data import discover_cohort
    from qsmrim.data.errors import InputError
    from qsmrim.fanout.features import extract_cohort
    from qsmrim.radiomics.settings import RadiomicsSettings

    settings = RadiomicsSettings(bin_width=args.bin_width)
    try:
        cohort = discover_cohort(args.root, lesions=lesion_source(args))
        if args.no_progress or not sys.stderr.isatty():
            result = extract_cohort(
                cohort, args.out, settings=settings, scheduler=args.scheduler, workers=args.workers,
                chunk_lesions=args.chunk_lesions,
            )  # fmt: skip
        else:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
            with Progress("[progress.description]{task.description}", *columns, transient=True) as bar:
                task = bar.add_task("radiomics (lesions)", total=None)
                result = extract_cohort(
                    cohort, args.out, settings=settings, scheduler=args.scheduler, workers=args.workers,
                    chunk_lesions=args.chunk_lesions,
                    on_progress=lambda done, total: bar.update(task, completed=done, total=total),
                )  # fmt: skip
    except InputError as exc:
        from qsmrim.console import print_problems

        print_problems(exc.problems, outcome="nothing merged")
        return 1
    table = result.table
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    print(
        f"wrote {len(table)} lesion(s) x {len(table.columns) - 4} features of "
        f"{len(result.computed) + len(result.cached)} subject(s) to {result.path}"
    )
    print(
        f"  computed {len(result.computed)} subject(s), reused {len(result.cached)} from cache, "
        f"{result.seconds:.1f} s on scheduler {result.scheduler}"
    )
    print("  status  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0
