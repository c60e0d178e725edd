"""Which code produced a result: the one ``git_commit`` behind MLflow tags, the sidecar and BIDS ``GeneratedBy``.

Platform layer (below tracking, export and serving, which all record it); imports nothing else of qsmrim.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

__all__ = ["git_commit"]

_SHA = re.compile(r"[0-9a-f]{40}")


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the qsmrim checkout this code runs from, or None when that is unknown.

    ``QSMRIM_GIT_COMMIT`` wins (images are built without ``.git``). Otherwise ``git rev-parse HEAD`` in
    ``cwd``, by default the checkout holding this package; an installed wheel has no checkout (no
    ``pyproject.toml`` beside the package), so it gets None rather than the commit of whatever repository
    happens to contain its site-packages. Only a full 40-hex SHA is returned from git.
    """
    if os.environ.get("QSMRIM_GIT_COMMIT"):
        return os.environ["QSMRIM_GIT_COMMIT"]
    if cwd is None:
        repo = Path(__file__).resolve().parents[1]
        if not (repo / "pyproject.toml").is_file():
            return None
    else:
        repo = Path(cwd)
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and _SHA.fullmatch(sha) else None
