"""Read and write NIfTI volumes in RAS+ voxel order, with errors that name the file.

Patches and features are taken in the image's own voxel axes reoriented to RAS+
(``nibabel.as_closest_canonical``), so an LPS-stored copy of a subject gives the same arrays as the RAS
original.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmrim.data.errors import InputError

__all__ = ["CanonicalImage", "read_canonical", "write_nifti"]


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


def read_canonical(path: str | Path, *, dtype: type = np.float32) -> CanonicalImage:
    """Load a 3-D NIfTI, reoriented to RAS+; raise :class:`InputError` naming ``path`` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", where=path)
    try:
        img = nib.load(str(path))
        if img.ndim == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        if img.ndim != 3:
            raise InputError(f"expected a 3-D image, got {img.ndim}-D with shape {tuple(img.shape)}", where=path)
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=dtype)
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise InputError(f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})", where=path) from None
    return CanonicalImage(path=path, data=data, affine=np.asarray(img.affine, dtype=np.float64))


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` as NIfTI-1; ``.nii.gz`` is gzipped with mtime 0 so equal inputs give equal bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    tmp = path.with_name(path.name + ".part")
    if path.name.endswith(".gz"):
        with open(tmp, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
            gz.write(raw)
    else:
        tmp.write_bytes(raw)
    tmp.replace(path)
    return path
