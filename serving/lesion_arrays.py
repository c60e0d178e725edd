"""Decode and check client-sent lesion arrays (``POST /v1/predict/lesions``): JSON or ``.npz``, never pickle.

Everything a client sends is checked before it reaches onnxruntime, and every problem is an
:class:`~qsmrim.data.InputError` naming the field, so the HTTP layer answers 4xx and the replica stays up.
``.npz`` members are read header-first: shape and dtype are checked before any data is allocated, so a
small upload cannot claim a huge array, and object arrays are refused (``allow_pickle=False`` semantics).
The archive's entry count and central-directory size are read from its end record before ``zipfile``
parses the directory: a ZIP64 archive of a million entries (3-4 s of parsing) is refused in microseconds.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from typing import Any

import numpy as np

from qsmrim.data.errors import InputError, Problem

__all__ = ["LesionArrays", "check_lesion_arrays", "parse_json_arrays", "parse_npz_arrays"]

LesionArrays = tuple[np.ndarray, np.ndarray]
_FIELDS = ("patch", "radiomics")
_NUMERIC_KINDS = "fiu"

MAX_NPZ_ENTRIES = 16
"""Entries an uploaded ``.npz`` may hold (``numpy.savez`` writes one per array; we read two)."""
MAX_NPZ_DIRECTORY_BYTES = 64 * 2**10
"""Central-directory bytes an uploaded ``.npz`` may declare (46 bytes + name per entry)."""


def check_lesion_arrays(
    patch: Any, radiomics: Any, patch_shape: tuple[int, ...], n_features: int, max_rows: int
) -> LesionArrays:
    """Validate shapes, dtypes and values; return C-contiguous ``float32`` copies.

    A single lesion may be sent without the batch axis. ``patch`` must be finite; ``radiomics`` may hold
    NaN (a feature pyradiomics could not compute: the graph fills it with the training median) but not Inf.
    """
    problems: list[Problem] = []
    arrays: dict[str, np.ndarray] = {}
    for name, value, row_shape in (
        ("patch", patch, tuple(patch_shape)),
        ("radiomics", radiomics, (n_features,)),
    ):
        arr = np.asarray(value)
        if arr.dtype.kind not in _NUMERIC_KINDS:
            problems.append(Problem(name, f"dtype {arr.dtype} is not a real number type; send float32"))
            continue
        if arr.shape == row_shape:
            arr = arr[None]
        if arr.ndim != len(row_shape) + 1 or arr.shape[1:] != row_shape:
            problems.append(
                Problem(name, f"shape {list(arr.shape)} is not [N, {', '.join(map(str, row_shape))}]")
            )
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            arrays[name] = np.ascontiguousarray(arr, dtype=np.float32)
        if np.isinf(arrays[name]).any():
            problems.append(Problem(name, "infinite values (or values beyond float32 range)"))
        if name == "patch" and np.isnan(arrays[name]).any():
            problems.append(Problem(name, "NaN values; patches must be finite (zero outside the lesion)"))
    if not problems:
        n_p, n_r = len(arrays["patch"]), len(arrays["radiomics"])
        if n_p != n_r:
            problems.append(
                Problem("radiomics", f"{n_r} row(s) but patch has {n_p}; send one row per lesion")
            )
        elif n_p == 0:
            problems.append(Problem("patch", "no lesions (N = 0)"))
        elif n_p > max_rows:
            problems.append(Problem("patch", f"{n_p} lesions exceed the limit of {max_rows} per request"))
    if problems:
        raise InputError(problems)
    return arrays["patch"], arrays["radiomics"]


def parse_json_arrays(body: bytes) -> tuple[Any, Any]:
    """``{"patch": [...], "radiomics": [...]}`` -> nested values; ``null`` in radiomics means NaN."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise InputError("JSON nested too deeply; send {\"patch\": [...], \"radiomics\": [...]}", where="body") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and integers of more than 4300 digits
        raise InputError(f"not valid JSON ({str(exc)[:200]})", where="body") from None
    if not isinstance(doc, dict):
        raise InputError('expected a JSON object {"patch": [...], "radiomics": [...]}', where="body")
    missing = [f for f in _FIELDS if f not in doc]
    if missing:
        raise InputError([Problem(f, "missing field") for f in missing])
    out = []
    for name in _FIELDS:
        try:
            # float64 first so that null -> NaN and ragged or non-numeric nesting raises here
            out.append(np.array(doc[name], dtype=np.float64))
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise InputError(f"not a rectangular array of numbers ({str(exc)[:200]})", where=name) from None
    return out[0], out[1]


def parse_npz_arrays(body: bytes, expected: dict[str, tuple[int, ...]], max_rows: int) -> tuple[Any, Any]:
    """Read ``patch`` and ``radiomics`` from an ``.npz`` archive without pickle and without trusting sizes.

    ``expected`` maps each field to its per-row shape; a member whose header declares another shape, more
    than ``max_rows`` rows, or a non-numeric dtype is refused before its data is read.
    """
    _check_zip_directory(body)
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"not an .npz (zip) archive ({exc})", where="body") from None
    names = set(archive.namelist())
    missing = [f for f in _FIELDS if f"{f}.npy" not in names]
    if missing:
        raise InputError([Problem(f, f"missing array (archive holds {sorted(names)[:10]})") for f in missing])
    out = []
    with archive:
        for name in _FIELDS:
            try:
                with archive.open(f"{name}.npy") as fh:
                    out.append(_read_npy(fh, name, expected[name], max_rows))
            except InputError:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as exc:
                raise InputError(
                    f"unreadable .npy member ({type(exc).__name__}: {exc})", where=name
                ) from None
    return out[0], out[1]


def _check_zip_directory(body: bytes) -> None:
    """Refuse an archive whose end record declares more than :data:`MAX_NPZ_ENTRIES` entries or a directory
    above :data:`MAX_NPZ_DIRECTORY_BYTES` (ZIP64 included) before ``zipfile`` parses the directory.

    The end record is read by ``zipfile``'s own reader, so the sizes checked are the ones it would loop over;
    a malformed archive passes here and is reported by ``zipfile.ZipFile``.
    """
    try:
        end = zipfile._EndRecData(io.BytesIO(body))  # type: ignore[attr-defined]  # noqa: SLF001
    except (OSError, struct.error, ValueError):
        return
    if not end:
        return
    entries, dir_size = int(end[zipfile._ECD_ENTRIES_TOTAL]), int(end[zipfile._ECD_SIZE])  # type: ignore[attr-defined]  # noqa: SLF001
    if entries > MAX_NPZ_ENTRIES or dir_size > MAX_NPZ_DIRECTORY_BYTES:
        raise InputError(
            f"archive declares {entries} entries in a {dir_size}-byte directory; an .npz holds patch and "
            f"radiomics (at most {MAX_NPZ_ENTRIES} entries, {MAX_NPZ_DIRECTORY_BYTES} directory bytes)",
            where="body",
        )


def _read_npy(fh: Any, name: str, row_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fh)
    else:
        raise InputError(f".npy format version {version} is not supported; use numpy.savez", where=name)
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise InputError(
            f"dtype {dtype} is not a real number type (object arrays are refused); send float32", where=name
        )
    if tuple(shape[1:]) != row_shape and tuple(shape) != row_shape:
        raise InputError(f"shape {list(shape)} is not [N, {', '.join(map(str, row_shape))}]", where=name)
    rows = 1 if tuple(shape) == row_shape else int(shape[0])
    if rows > max_rows:
        raise InputError(f"{rows} lesions exceed the limit of {max_rows} per request", where=name)
    count = int(np.prod(shape, dtype=np.int64))
    data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise InputError(f"truncated array data ({len(data)} of {count * dtype.itemsize} bytes)", where=name)
    arr = np.frombuffer(data, dtype=dtype)
    order = "F" if fortran else "C"
    return arr.reshape(shape, order=order)
