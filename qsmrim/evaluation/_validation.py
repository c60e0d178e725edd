"""Input checks shared by the evaluation modules.

Every check raises :class:`ValueError` whose message names the argument, what is allowed and what was
received, so a caller sees which array is wrong without reading a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray


def check_labels(y: ArrayLike, name: str) -> NDArray[np.int64]:
    """Return ``y`` as a 1-D int array of 0/1 labels, or raise ``ValueError`` naming ``name``."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of 0/1 labels, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; at least one lesion is needed")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold 0/1 labels, got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        raise ValueError(f"{name} must hold only 0 and 1, got {np.unique(arr[bad])[:5].tolist()}")
    return arr.astype(np.int64)


def check_scores(s: ArrayLike, name: str) -> NDArray[np.float64]:
    """Return ``s`` as a 1-D finite float array, or raise ``ValueError`` naming ``name``."""
    arr = np.asarray(s)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; at least one lesion is needed")
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return arr


def check_groups(g: ArrayLike, name: str) -> NDArray:
    """Return ``g`` (fold or subject ids) as a 1-D array, or raise ``ValueError`` naming ``name``."""
    arr = np.asarray(g)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of ids, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; at least one lesion is needed")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} must not contain NaN")
    if arr.dtype == object and any(v is None for v in arr):
        raise ValueError(f"{name} must not contain None")
    return arr


def check_same_length(arrays: Sequence[np.ndarray], names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every argument when the arrays differ in length."""
    lengths = [len(a) for a in arrays]
    if len(set(lengths)) > 1:
        got = ", ".join(f"{n}={k}" for n, k in zip(names, lengths, strict=True))
        raise ValueError(f"{', '.join(names)} must have the same length, got {got}")


def check_both_classes(y: NDArray[np.int64], name: str, where: str = "") -> None:
    """Raise ``ValueError`` when ``y`` does not hold both classes (ranking metrics need both)."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "rim+ (1)" if n_pos else "rim- (0)"
        raise ValueError(
            f"{name}{where} holds only {only} lesions ({y.size} lesions); curves and thresholds need both classes"
        )


def check_fraction(value: float, name: str, *, low_open: bool = True, high_closed: bool = True) -> float:
    """Return ``value`` as float when it lies in (0, 1] (or [0, 1) variants), else raise ``ValueError``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v <= 1 if high_closed else v < 1
    if not (lo_ok and hi_ok and np.isfinite(v)):
        lo = "(0" if low_open else "[0"
        hi = "1]" if high_closed else "1)"
        raise ValueError(f"{name} must be a number in {lo}, {hi}, got {value!r}")
    return v


def plain(value: object) -> object:
    """A NumPy scalar as the matching Python scalar (for dict keys and JSON); anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value
