"""What the entry points (``qsmrim``, ``jobs``, ``serving.cli``) print when something goes wrong, and the
cohort options they share.

:func:`run_reporting_errors` turns user errors into one clear message and an exit code, and
:func:`print_problems` is the one way a list of input problems reaches the terminal.
:func:`add_lesion_source_args` / :func:`lesion_source` are the ``--lesions-from`` / ``--lesions-desc`` options of
every command that reads lesion maps from a BIDS root. Entry-point layer:
imports only the error types of :mod:`qsmrim.data` and :mod:`qsmrim.config`, so every entry point can
share it without importing another.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

__all__ = ["add_lesion_source_args", "lesion_source", "print_grid_result", "print_problems", "run_reporting_errors"]


def add_lesion_source_args(parser: Any, *, config: bool = False) -> None:
    """Add ``--lesions-from DIR`` and ``--lesions-desc LABEL`` (defaults: ``derivatives/lesions``, ``lesions``).

    ``config=True``: for commands that read an experiment config, the options default to None and override
    ``data.lesions_from`` / ``data.lesions_desc`` only when given.
    """
    where = "sets data.lesions_from; default: the config's, else" if config else "default"
    parser.add_argument("--lesions-from", default=None if config else "derivatives/lesions", metavar="DIR",
                        help=f"lesion derivatives folder, relative to the BIDS root or absolute "
                             f"({where} derivatives/lesions)")
    where = "sets data.lesions_desc; default: the config's, else" if config else "default"
    parser.add_argument("--lesions-desc", default=None if config else "lesions", metavar="LABEL",
                        help=f"desc- label of the lesion maps: <scan>_desc-LABEL_dseg or _mask ({where} lesions)")  # fmt: skip


def lesion_source(args: Any) -> Any:
    """The :class:`qsmrim.data.LesionSource` of parsed ``--lesions-from`` / ``--lesions-desc`` options."""
    from qsmrim.data.bids import LesionSource

    return LesionSource(args.lesions_from, args.lesions_desc)


def print_problems(problems: Iterable[Any], *, outcome: str | None = None, stream: TextIO | None = None) -> None:
    """``error: N problem(s) found:`` (or ``; <outcome>:``), then one ``  - problem`` line each, on stderr."""
    stream = stream or sys.stderr
    problems = list(problems)
    tail = f"; {outcome}:" if outcome else " found:"
    print(f"error: {len(problems)} problem(s){tail}", file=stream)
    for p in problems:
        print(f"  - {p}", file=stream)


def run_reporting_errors(fn: Callable[[], int | None]) -> int:
    """Run an entry point; user errors become one clear message and exit 1 (130 on Ctrl-C), no traceback.

    Shared by the ``qsmrim`` CLI and the ``jobs`` entry points.
    """
    from qsmrim.config import ConfigError
    from qsmrim.data.errors import InputError

    try:
        return int(fn() or 0)
    except InputError as exc:
        print_problems(exc.problems)
        return 1
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_grid_result(result: dict[str, Any]) -> int:
    """Print a :func:`qsmrim.grid.ray_grid.run_grid` summary (JSON) and each failed trial; 1 if any failed."""
    import json

    print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=1, default=str))
    for err in result["errors"]:
        print(f"trial failed: {err}", file=sys.stderr)
    return 1 if result["errors"] else 0
