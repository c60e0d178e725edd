"""The ``model.json`` sidecar file: its schema, where it sits beside the graph, and how it is written and read.

:mod:`qsmrim.export.sidecar` builds the content at export; :mod:`qsmrim.tracking.registry` reads it to tag a
registered version. Both import it from here, so the registry never imports the exporter (platform layer,
below both; imports nothing else of qsmrim).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qsmrim.atomic import write_text_atomic

__all__ = [
    "SIDECAR_SCHEMA",
    "feature_names_sha256",
    "file_sha256",
    "read_sidecar",
    "sidecar_path_for",
    "write_sidecar",
]

SIDECAR_SCHEMA = "qsmrim-model/1"


def sidecar_path_for(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.json`` beside it."""
    return Path(onnx_path).with_suffix(".json")


def feature_names_sha256(names: Sequence[str]) -> str:
    """Hash of the ordered feature list (``"\\n".join``), to compare feature orders cheaply."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_sidecar(content: dict[str, Any], path: str | Path) -> Path:
    return write_text_atomic(path, json.dumps(content, indent=1, allow_nan=False))


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Load and minimally check a sidecar; the error names the file and the missing field."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: sidecar not found (written by `qsmrim export` beside the .onnx)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(content, dict) or content.get("schema") != SIDECAR_SCHEMA:
        raise ValueError(f"{path}: not a qsmrim model sidecar (schema must be {SIDECAR_SCHEMA!r})")
    for key in ("members", "feature_names", "protocol", "patch_spec", "n_members"):
        if key not in content:
            raise ValueError(f"{path}: sidecar lacks the field {key!r}")
    return content
