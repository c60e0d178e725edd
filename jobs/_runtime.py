"""What every job checks before it imports qsmrim: that the Python running it is the project's environment.

``ray job submit ... -- python -m jobs.<name>`` runs the ``python`` found on the PATH of the ``ray start`` that
started the node. ``.venv/bin/ray start`` without an activated venv leaves that the system's Python, and the
job died with ``No module named 'torch'``; this says what to do instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["RUNTIME_MODULES", "require_runtime"]

#: Modules a job imports that only the project's environment has (the job's own sources come with --working-dir).
RUNTIME_MODULES = ("torch", "ray", "mlflow", "yaml", "numpy", "pandas", "onnxruntime")


def require_runtime(job: str) -> None:
    """Exit 2 with advice when this interpreter lacks one of :data:`RUNTIME_MODULES`."""
    missing = [m for m in RUNTIME_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return
    print(f"error: {sys.executable} cannot run {job}: missing module(s) {', '.join(missing)}.\n"
          "  A Ray job runs the `python` on the PATH of the `ray start` that started this node "
          f"(PATH here: {os.environ.get('PATH', '')}).\n"
          "  Start Ray from the project's environment: `source .venv/bin/activate && ray stop && ray start --head ...` "
          "(docs/deploy.md),\n"
          "  or submit with that environment's interpreter: `ray job submit ... -- /abs/path/.venv/bin/python -m "
          f"{job} ...`.", file=sys.stderr)  # fmt: skip
    raise SystemExit(2)
