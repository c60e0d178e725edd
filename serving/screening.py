"""Which thresholds an answer used, and the ``review`` flag they give each lesion (DESIGN §5, §6).

Two thresholds decide what a reader sees. The *rim* call is the ensemble's majority vote, each member voting
at its own threshold; both are inside the ONNX graph and come from the model. The *screening* threshold is
CV's high-sensitivity point (``model.json``'s ``screening`` entry, registry tag ``screening_threshold``): a
lesion with ``prob`` at or above it is flagged ``review``. An operator may override the screening threshold
in ``platform/serve.yaml`` (``screening_threshold``) or on the command line (``--screening-threshold``);
every answer says which value it used and where it came from.

A model exported before the screening threshold travelled (or from a run whose CV never dropped below the
sensitivity limit) has none. Then ``review`` equals the rim call and the answer says so (source ``rim-call``):
nothing is flagged for review that the model does not already call rim+, so the review list never looks
more complete than it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from qsmrim.data.qc import QCReport

__all__ = [
    "OVERRIDE_SOURCES",
    "add_lesion_flags",
    "model_thresholds",
    "resolve_thresholds",
    "review_flags",
]

OVERRIDE_SOURCES = ("serve.yaml", "cli")
"""Where an operator's screening threshold may come from (besides the model)."""

_RIM_RULE = "rim = votes * 2 > members; a member votes when its prob >= its own threshold"
_REVIEW_RULE = "review = prob >= screening threshold"
_NO_SCREENING = "the model carries no screening threshold: review = rim"


def model_thresholds(metadata: Mapping[str, Any], members: int | None) -> dict[str, Any]:
    """The thresholds a model brings (its ``model.json`` or registry tags, flattened into ``metadata``)."""
    member_thresholds = _member_thresholds(metadata)
    screening = metadata.get("screening")
    value = (
        screening.get("threshold") if isinstance(screening, Mapping) else metadata.get("screening_threshold")
    )
    value = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
    return {
        "rim": {
            "rule": _RIM_RULE,
            "members": members,
            "min_votes": members // 2 + 1 if members else None,
            "member_thresholds": member_thresholds,
            "protocol": metadata.get("protocol") if isinstance(metadata.get("protocol"), str) else None,
            "source": "model",
        },
        "screening": {
            "value": value,
            "rule": _REVIEW_RULE if value is not None else _NO_SCREENING,
            "source": "model" if value is not None else "rim-call",
            "model_value": value,
        },
    }


def resolve_thresholds(
    from_model: Mapping[str, Any], override: float | None = None, source: str = "serve.yaml"
) -> dict[str, Any]:
    """The thresholds an answer uses: the model's, with the screening threshold overridden when given."""
    if override is None:
        return {"rim": dict(from_model["rim"]), "screening": dict(from_model["screening"])}
    if source not in OVERRIDE_SOURCES:
        raise ValueError(
            f"screening threshold source must be one of {list(OVERRIDE_SOURCES)}, not {source!r}"
        )
    if not (isinstance(override, int | float) and 0.0 <= override <= 1.0):
        raise ValueError(f"screening threshold must be a number in [0, 1], not {override!r} (from {source})")
    screening = {
        "value": float(override),
        "rule": _REVIEW_RULE,
        "source": source,
        "model_value": from_model["screening"].get("model_value"),
    }
    return {"rim": dict(from_model["rim"]), "screening": screening}


def review_flags(prob: np.ndarray, rim: np.ndarray, thresholds: Mapping[str, Any]) -> np.ndarray:
    """``prob >= screening threshold`` per lesion; the rim call itself when there is no threshold."""
    value = thresholds["screening"]["value"]
    if value is None:
        return np.asarray(rim, dtype=bool).copy()
    return np.asarray(prob, dtype=np.float64) >= float(value)


def add_lesion_flags(
    records: list[dict[str, Any]], review: np.ndarray, qc: QCReport | None
) -> list[dict[str, Any]]:
    """Add ``review`` and the per-lesion QC marks (``qc_cropped``, ``qc_confluent``) to answer rows, in place."""
    cropped = set(qc.cropped_lesions) if qc is not None else set()
    confluent = set(qc.confluent_lesions) if qc is not None else set()
    for rec, flag in zip(records, review, strict=True):
        rec["review"] = bool(flag)
        if qc is not None:
            rec["qc_cropped"] = rec["index"] in cropped
            rec["qc_confluent"] = rec["index"] in confluent
    return records


def _member_thresholds(metadata: Mapping[str, Any]) -> list[float] | None:
    """Each member's own threshold: ``members[*].threshold`` of an exported sidecar, else ``thresholds``."""
    members = metadata.get("members")
    if isinstance(members, list) and members and all(isinstance(m, Mapping) for m in members):
        values = [m.get("threshold") for m in members]
    else:
        values = metadata.get("thresholds")
    if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
        return None
    return [float(v) for v in values]
