"""Content hashes of input files and settings: cache keys that change when, and only when, inputs do."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

__all__ = ["file_digest", "fingerprint", "remembered_digests"]

_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex); inside :func:`remembered_digests`, each file is hashed once."""
    if _memo is not None:
        st = Path(path).stat()
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        if key not in _memo:
            _memo[key] = _sha256(path)
        return _memo[key]
    return _sha256(path)


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_memo: dict[tuple[str, int, int], str] | None = None


@contextmanager
def remembered_digests() -> Iterator[None]:
    """Within the block, a file's digest is computed once (one preparation builds several cache keys over
    the same cohort; the files must not change meanwhile)."""
    global _memo
    outer = _memo
    _memo = {} if outer is None else outer
    try:
        yield
    finally:
        _memo = outer


def fingerprint(files: Iterable[str | Path], *settings: object) -> str:
    """SHA-256 over the files' contents (in the given order) and JSON of the settings (dataclasses allowed)."""
    h = hashlib.sha256()
    for f in files:
        h.update(file_digest(f).encode())
    for s in settings:
        obj = asdict(s) if is_dataclass(s) and not isinstance(s, type) else s
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()
