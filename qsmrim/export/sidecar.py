"""The ``model.json`` sidecar: what a client must know to feed the graph, in MONAI ``network_data_format`` style.

It travels with the ONNX file (same folder, ``<stem>.json``) and is logged with the MLflow model, so a
server or a BIDS app can check its inputs (feature order, patch geometry, channel meaning) without torch or
the training run. The same facts are also stored as MLflow version tags by :mod:`qsmrim.tracking.registry`.

This module builds the content; the file itself (schema, path, atomic write, checked read) is
:mod:`qsmrim.model_sidecar`, below both this package and the registry that reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qsmrim.model_sidecar import (
    SIDECAR_SCHEMA,
    feature_names_sha256,
    file_sha256,
    read_sidecar,
    sidecar_path_for,
    write_sidecar,
)
from qsmrim.models.base import PATCH_SHAPE
from qsmrim.training.member import Member

__all__ = [
    "SIDECAR_SCHEMA",
    "build_sidecar",
    "feature_names_sha256",
    "file_sha256",
    "read_sidecar",
    "screening_from_evaluation",
    "sidecar_path_for",
    "write_sidecar",
]

CHANNEL_DEF = {"0": "QSM (ppm)", "1": "FLAIR / median FLAIR over brain voxels"}
DECISION_RULE = "votes = sum_k [p_k >= threshold_k]; rim = votes * 2 > n_members; prob = mean_k p_k"
SPREAD_NOTE = (
    "population standard deviation of the member probabilities; an output added to DESIGN section 5 "
    "because the HTTP API reports it as the lesion's uncertainty"
)


def build_sidecar(
    members: Sequence[Member],
    *,
    protocol: str,
    feature_names: Sequence[str],
    files: dict[str, Path],
    opset: int,
    weights_dtype: str,
    parity: dict[str, Any] | None = None,
    export_seconds: float | None = None,
    screening: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sidecar's content (JSON-ready). ``files`` maps a role (``graph``, ``external_data``) to a path.

    ``screening`` is CV's high-sensitivity operating point (:func:`screening_from_evaluation`): serving flags
    a lesion ``review`` when its ``prob`` is at or above its ``threshold`` (DESIGN section 5). ``None`` when
    the run has no evaluation to take it from; serving then falls back to the rim call.
    """
    from qsmrim import __version__

    n = len(feature_names)
    z, y, x = PATCH_SHAPE[1:]
    first = members[0]
    return {
        "schema": SIDECAR_SCHEMA,
        "qsmrim_version": __version__,
        "model": first.model_name,
        "model_kwargs": first.model_kwargs,
        "protocol": protocol,
        "n_members": len(members),
        "decision_rule": DECISION_RULE,
        "members": [
            {
                "model": m.model_name,
                "fold": m.fold,
                "seed": m.seed,
                "threshold": m.thresholds[protocol],
                "thresholds": dict(m.thresholds),
            }
            for m in members
        ],
        "patch_spec": {
            "axes": "zyx",
            "size": [z, y, x],
            "channels": PATCH_SHAPE[0],
            "channel_def": CHANNEL_DEF,
        },
        "feature_names": list(feature_names),
        "feature_names_sha256": feature_names_sha256(feature_names),
        "network_data_format": {
            "inputs": {
                "patch": {
                    "type": "image",
                    "dtype": "float32",
                    "shape": ["N", *PATCH_SHAPE],
                    "num_channels": PATCH_SHAPE[0],
                    "spatial_shape": [z, y, x],
                    "axes": "zyx",
                    "channel_def": CHANNEL_DEF,
                    "note": "centred on the lesion's centre of mass, zero outside the lesion (DESIGN section 4)",
                },
                "radiomics": {
                    "type": "tabular",
                    "dtype": "float32",
                    "shape": ["N", n],
                    "num_features": n,
                    "note": "raw values in the order of feature_names; NaN/Inf become each member's training "
                    "median inside the graph, which then standardises per member",
                },
            },
            "outputs": {
                "prob": {
                    "dtype": "float32",
                    "shape": ["N"],
                    "value_range": [0, 1],
                    "note": "mean member probability",
                },
                "votes": {
                    "dtype": "int64",
                    "shape": ["N"],
                    "value_range": [0, len(members)],
                    "note": "members at or above their own threshold",
                },
                "rim": {"dtype": "bool", "shape": ["N"], "note": "votes * 2 > n_members"},
                "spread": {"dtype": "float32", "shape": ["N"], "value_range": [0, 0.5], "note": SPREAD_NOTE},
            },
        },
        "onnx": {
            "opset": opset,
            "weights_dtype": weights_dtype,
            "files": {
                role: {"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
                for role, p in files.items()
            },
        },
        "parity": parity,
        "export_seconds": export_seconds,
        "screening": screening,
    }


SCREENING_NOTE = (
    "review = prob >= threshold. The threshold is CV's high-sensitivity point: the largest out-of-fold "
    "sensitivity below max_sensitivity, chosen on each fold ensemble's pooled probabilities; the exported graph "
    "averages every fold's members, so its probabilities are close to, not identical with, those it was chosen on"
)


def screening_from_evaluation(result: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The sidecar's ``screening`` entry from one method's ``evaluate_predictions`` result (or None).

    ``source`` says where it came from (e.g. the ``evaluation.json`` path). A point that flags nothing (no
    threshold below the sensitivity limit; ``threshold`` None) gives None: there is no threshold to carry.
    """
    point = result.get("high_sensitivity") or {}
    threshold = point.get("threshold")
    if not isinstance(threshold, int | float) or not math.isfinite(threshold):
        return None
    keys = ("sensitivity", "specificity", "ppv", "tp", "fp", "fn", "tn", "n_lesions", "lesions_to_review",
            "review_saved", "max_sensitivity")  # fmt: skip
    return {
        "threshold": float(threshold),
        "rule": "review = prob >= threshold",
        "source": source,
        "operating_point": "cv high-sensitivity (largest sensitivity below max_sensitivity)",
        **{k: point.get(k) for k in keys},
        "note": SCREENING_NOTE,
    }
