"""Read and write NIfTI volumes in RAS+ voxel order, with errors that name the file.

Patches and features are taken in the image's own voxel axes reoriented to RAS+ (the reorientation of
``nibabel.as_closest_canonical``), so an LPS-stored copy of a subject gives the same arrays as the RAS
original.

Reading is bounded, because NIfTI files may come from a network client. :func:`read_canonical` does not call
``nibabel.load``, which parses header extensions before anything else and can be made to read a whole gzip
stream into memory. It parses the fixed-size header itself from at most 540 decompressed bytes, refuses an
image whose shape x dtype exceeds :class:`NiftiLimits` (voxels *and* bytes), skips header extensions
(never parsed, at most ``max_extension_bytes``) and then decompresses exactly the bytes the header's shape
and dtype need: what a client can make one image cost is ``max_bytes`` of stored data plus its float32
copy, whatever the compression ratio.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from qsmrim.atomic import atomic_path
from qsmrim.data.errors import InputError

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_VOXELS",
    "CanonicalImage",
    "NiftiHeaderInfo",
    "NiftiLimits",
    "read_canonical",
    "read_header",
    "write_nifti",
]

DEFAULT_MAX_VOXELS = 64 * 2**20
"""Largest image accepted, in voxels: 64 Mi voxels, e.g. 512 x 512 x 256."""

DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20
"""Largest stored image data accepted, voxels x bytes per voxel: 256 MiB (64 Mi float32 voxels)."""

DEFAULT_MAX_EXTENSION_BYTES = 2**20
"""Largest block of header extensions skipped (they are never parsed)."""

_CHUNK = 8 * 2**20
_REAL_KINDS = "uif"


@dataclass(frozen=True)
class NiftiLimits:
    """What one image may cost to read; each field is a count of voxels or bytes.

    Args:
        max_voxels: Largest product of the image dimensions.
        max_bytes: Largest stored data size (voxels x bytes per voxel of the stored dtype).
        max_extension_bytes: Largest block of header extensions between the header and the data.
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_extension_bytes: int = DEFAULT_MAX_EXTENSION_BYTES

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_bytes", "max_extension_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"NiftiLimits.{name} must be an int, not {type(value).__name__}")
            if value < 0 or (value == 0 and name != "max_extension_bytes"):
                raise ValueError(f"NiftiLimits.{name} must be a positive number, not {value}")


@dataclass(frozen=True)
class NiftiHeaderInfo:
    """What the fixed-size header of a single-file NIfTI declares, checked against :class:`NiftiLimits`."""

    header: nib.Nifti1Header
    shape: tuple[int, int, int]
    dtype: np.dtype
    vox_offset: int
    header_size: int

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape, dtype=object))

    @property
    def n_bytes(self) -> int:
        return self.n_voxels * self.dtype.itemsize


@dataclass(frozen=True)
class CanonicalImage:
    """A 3-D volume in RAS+ voxel order (indexed ``[x, y, z]``) with its affine."""

    path: Path
    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along x, y, z."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def read_header(path: str | Path, limits: NiftiLimits = NiftiLimits()) -> NiftiHeaderInfo:
    """Parse and check a NIfTI-1/2 header, decompressing at most 540 bytes; raise :class:`InputError` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", where=path)
    try:
        with _open_stream(path) as stream:
            return _read_header(stream, path, limits)
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, nib.spatialimages.HeaderDataError) as exc:
        raise InputError(f"unreadable NIfTI header ({type(exc).__name__}: {exc})", where=path) from None


def read_canonical(
    path: str | Path, *, dtype: type | None = np.float32, limits: NiftiLimits = NiftiLimits()
) -> CanonicalImage:
    """Load a 3-D NIfTI, reoriented to RAS+; raise :class:`InputError` naming ``path`` on any problem.

    Args:
        path: A single-file NIfTI-1 or NIfTI-2 image, ``.nii`` or gzipped (detected by content).
        dtype: Type of the returned array; ``None`` keeps the stored type (integers stay integers unless
            the header scales them), which is how lesion maps are read.
        limits: What the image may cost to read (:class:`NiftiLimits`); checked on the header before any
            data is decompressed.

    .. tip:: Header extensions are skipped, never parsed; trailing bytes after the data are never read.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", where=path)
    try:
        with _open_stream(path) as stream:
            info = _read_header(stream, path, limits)
            _skip(stream, info.vox_offset - info.header_size, path)
            raw = _read_exact(stream, info.n_bytes, path)
        data = np.frombuffer(raw, dtype=info.dtype).reshape(info.shape, order="F")
        data = _scaled(data, info.header, dtype, path)
        affine = _affine(info.header, path)
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, nib.spatialimages.HeaderDataError) as exc:
        raise InputError(f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})", where=path) from None
    ornt = io_orientation(affine)
    data = apply_orientation(data, ornt)
    affine = affine @ inv_ornt_aff(ornt, info.shape)
    if dtype is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.asarray(data, dtype=dtype)
    return CanonicalImage(path=path, data=data, affine=np.asarray(affine, dtype=np.float64))


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` as NIfTI-1; ``.nii.gz`` is gzipped with mtime 0 so equal inputs give equal bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            with open(tmp, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
                gz.write(raw)
        else:
            tmp.write_bytes(raw)
    return path


@contextmanager
def _open_stream(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, gunzipped on the fly when it starts with the gzip magic (reads stay bounded)."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
        if not gzipped:
            yield fh
            return
        with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
            yield gz  # type: ignore[misc]


def _read_header(stream: BinaryIO, path: Path, limits: NiftiLimits) -> NiftiHeaderInfo:
    block = stream.read(348)
    if len(block) < 348:
        raise InputError(f"unreadable or truncated NIfTI: {len(block)} bytes, shorter than a NIfTI-1 header", where=path)
    size_le, size_be = int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")
    if 540 in (size_le, size_be):
        block += stream.read(540 - 348)
        if len(block) < 540:
            raise InputError("unreadable or truncated NIfTI: the NIfTI-2 header is cut short", where=path)
        klass: type = nib.Nifti2Header
    elif 348 in (size_le, size_be):
        klass = nib.Nifti1Header
    else:
        raise InputError(f"unreadable or truncated NIfTI: not a NIfTI-1/2 file (sizeof_hdr {size_le}, expected 348 or 540)", where=path)
    endian = "<" if size_le in (348, 540) else ">"
    hdr = klass(block, endianness=endian, check=False)
    magic = bytes(hdr["magic"]).rstrip(b"\0")[:3]
    if magic not in (b"n+1", b"n+2"):
        raise InputError(
            f"magic {magic!r} is not a single-file NIfTI ('n+1' or 'n+2'); send one .nii or .nii.gz",
            where=path,
        )
    dim = [int(d) for d in hdr["dim"]]
    if not 1 <= dim[0] <= 7:
        raise InputError(f"header dim[0] = {dim[0]} is not a number of dimensions in 1..7", where=path)
    shape = dim[1 : 1 + dim[0]]
    bad = [(i + 1, d) for i, d in enumerate(shape) if d <= 0]
    if bad:
        raise InputError(f"header dim {shape}: dimension(s) must be positive, got {bad}", where=path)
    if len(shape) < 3 or any(d != 1 for d in shape[3:]):
        raise InputError(f"expected a 3-D image, got {len(shape)}-D with shape {tuple(shape)}", where=path)
    try:
        dtype = hdr.get_data_dtype()
    except (KeyError, nib.spatialimages.HeaderDataError):
        raise InputError(f"header datatype code {int(hdr['datatype'])} is unknown", where=path) from None
    if dtype.fields is not None or dtype.kind not in _REAL_KINDS or dtype.itemsize > 8:
        raise InputError(
            f"header datatype {dtype} (code {int(hdr['datatype'])}) is not a real number type; "
            "complex, RGB and other types are refused: store integers or floats",
            where=path,
        )
    shape3 = (shape[0], shape[1], shape[2])
    n = int(np.prod(shape3, dtype=object))
    if n > limits.max_voxels:
        raise InputError(
            f"image of shape {list(shape3)} has {n} voxels, above the limit of {limits.max_voxels}",
            where=path,
        )
    if n * dtype.itemsize > limits.max_bytes:
        raise InputError(
            f"image of shape {list(shape3)} as {dtype} is {n * dtype.itemsize} bytes, above the limit of "
            f"{limits.max_bytes} bytes; store it as float32",
            where=path,
        )
    header_size = len(block)
    vox_offset = float(hdr["vox_offset"])
    if not np.isfinite(vox_offset) or vox_offset != int(vox_offset):
        raise InputError(f"header vox_offset {vox_offset} is not a whole number of bytes", where=path)
    offset = int(vox_offset) or header_size + 4  # 0 is read as "right after the header" (nibabel does too)
    if offset < header_size + 4:
        raise InputError(f"header vox_offset {offset} points inside the header", where=path)
    if offset - header_size - 4 > limits.max_extension_bytes:
        raise InputError(
            f"header extensions of {offset - header_size - 4} bytes (vox_offset {offset}) exceed the limit of "
            f"{limits.max_extension_bytes} bytes",
            where=path,
        )
    return NiftiHeaderInfo(hdr, shape3, dtype, offset, header_size)


def _skip(stream: BinaryIO, n: int, path: Path) -> None:
    while n > 0:
        got = len(stream.read(min(n, _CHUNK)))
        if got == 0:
            raise InputError("unreadable or truncated NIfTI: the file ends inside the header extensions", where=path)
        n -= got


def _read_exact(stream: BinaryIO, n: int, path: Path) -> bytearray:
    """Exactly ``n`` bytes, read (and decompressed) chunk by chunk into one preallocated buffer."""
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        chunk = stream.read(min(n - pos, _CHUNK))
        if not chunk:
            raise InputError(f"unreadable or truncated NIfTI: {pos} of {n} data bytes", where=path)
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return buf


def _scaled(data: np.ndarray, hdr: nib.Nifti1Header, dtype: type | None, path: Path) -> np.ndarray:
    """Apply ``scl_slope``/``scl_inter`` as nibabel does; identity scaling keeps the stored type."""
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if slope == 0 or not np.isfinite(slope) or (slope == 1 and inter == 0):
        return data
    if not np.isfinite(inter):
        raise InputError(f"header scl_inter {inter} is not finite", where=path)
    out = np.dtype(dtype) if dtype is not None and np.dtype(dtype).kind == "f" else np.dtype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return data.astype(out) * out.type(slope) + out.type(inter)


def _affine(hdr: nib.Nifti1Header, path: Path) -> np.ndarray:
    """The header's best affine (sform, else qform, else pixdim); refuse a singular or non-finite one."""
    field = "sform" if int(hdr["sform_code"]) > 0 else "qform" if int(hdr["qform_code"]) > 0 else "pixdim"
    with np.errstate(all="ignore"):
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
        ok = np.all(np.isfinite(affine)) and abs(float(np.linalg.det(affine[:3, :3]))) > 1e-12
    if not ok:
        raise InputError(
            f"header {field} affine {affine[:3].round(6).tolist()} is singular or not finite: voxels need a "
            "non-zero size and three independent axes",
            where=path,
        )
    return affine
