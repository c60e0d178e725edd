"""The paper's names for the model registry's names, shared by the report's tables and its figures.

Its own module so that :mod:`qsmrim.evaluation.report` (which renders the figures) and
:mod:`qsmrim.evaluation.figures` (which titles them) both read it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DISPLAY_NAMES", "display_name"]

DISPLAY_NAMES: Mapping[str, str] = {
    "qsmrimnet": "QSMRim-Net",
    "qsmrimnet-add": "QSMRim-Net (additive fusion)",
    "image-channel": "Image only, channel fusion",
    "image-rimnet": "Image only, RimNet streams",
    "image-radiomics": "Image + radiomics",
    "rimnet": "Rim-Net",
    "aprl-rf": "APRL (RF)",
    "aprl-nn": "APRL (NN)",
}
"""Paper names of the model registry names (issue 5); unknown names are shown as they are."""


def display_name(label: str, result: Mapping[str, Any] | None = None) -> str:
    """The paper's name for a registry name, keeping any protocol suffix of ``label``."""
    method = (result or {}).get("method") or label
    pretty = DISPLAY_NAMES.get(method, method)
    return label.replace(method, pretty, 1) if method in label else pretty
