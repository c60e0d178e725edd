"""Content hashes of input files and settings: cache keys that change when, and only when, inputs do."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from pathlib import Path

__all__ = ["file_digest", "fingerprint"]

_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(files: Iterable[str | Path], *settings: object) -> str:
    """SHA-256 over the files' contents (in the given order) and JSON of the settings (dataclasses allowed)."""
    h = hashlib.sha256()
    for f in files:
        h.update(file_digest(f).encode())
    for s in settings:
        obj = asdict(s) if is_dataclass(s) and not isinstance(s, type) else s
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()
