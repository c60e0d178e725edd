"""One frozen place for every radiomics setting, so the cache key, the fast path and the reference agree.

The values follow the paper (section 2.2.2) and DESIGN §4: pyradiomics defaults for ``firstorder``, ``glcm``,
``glrlm`` and ``shape`` over the original image and the 8 coif1 wavelet decompositions, QSM scaled from ppm to
ppb before extraction, fixed bin width 25 ppb, no resampling, the lesion's own mask as the ROI.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pywt

__all__ = ["RadiomicsSettings", "DEFAULT_SETTINGS", "PYRADIOMICS_VERSION"]

PYRADIOMICS_VERSION = "3.1.4"
"""The pyradiomics(-bhklab) version whose values the fast path reproduces (pinned in pyproject.toml)."""


@dataclass(frozen=True)
class RadiomicsSettings:
    """Settings of the 527-feature extraction.

    Args:
        bin_width: Fixed bin width for grey-level discretisation, in the units of the scaled image (ppb).
        qsm_scale: Factor applied to QSM (ppm) before extraction; 1000 gives ppb.
        wavelet: PyWavelets name of the wavelet for the 8 stationary decompositions.
        crop_margin: Voxels kept around each lesion's bounding box before the wavelet transform. ``None`` uses
            the wavelet's filter length, which is enough for values identical to an uncropped transform.
        minimum_roi_dimensions: Lesions spanning fewer axes than this (pyradiomics default 2) get NaN features.

    .. tip::
        Resampling stays off on purpose: the paper extracts on the native 0.75 x 0.75 x 3 mm grid.

    Example:
        >>> RadiomicsSettings().pyradiomics_kwargs()["binWidth"]
        25.0
    """

    bin_width: float = 25.0
    qsm_scale: float = 1000.0
    wavelet: str = "coif1"
    crop_margin: int | None = None
    minimum_roi_dimensions: int = 2

    def __post_init__(self) -> None:
        for name in ("bin_width", "qsm_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, not {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.wavelet, str):
            raise TypeError(f"wavelet must be a string, not {type(self.wavelet).__name__}")
        if self.wavelet not in pywt.wavelist(kind="discrete"):
            raise ValueError(
                f"wavelet must be a discrete PyWavelets wavelet such as 'coif1', not {self.wavelet!r}"
            )
        if self.crop_margin is not None:
            if isinstance(self.crop_margin, bool) or not isinstance(self.crop_margin, int):
                raise TypeError(f"crop_margin must be an int or None, not {type(self.crop_margin).__name__}")
            if self.crop_margin < pywt.Wavelet(self.wavelet).dec_len // 2:
                raise ValueError(
                    f"crop_margin must be >= half the {self.wavelet} filter length "
                    f"({pywt.Wavelet(self.wavelet).dec_len // 2}) to keep wavelet values exact, not {self.crop_margin}"
                )
        if self.minimum_roi_dimensions not in (1, 2, 3):
            raise ValueError(f"minimum_roi_dimensions must be 1, 2 or 3, not {self.minimum_roi_dimensions!r}")

    @property
    def margin(self) -> int:
        """Crop margin in voxels actually used (the wavelet filter length unless set)."""
        return self.crop_margin if self.crop_margin is not None else pywt.Wavelet(self.wavelet).dec_len

    def pyradiomics_kwargs(self) -> dict[str, Any]:
        """The settings as pyradiomics keyword arguments (for the extractor and the feature classes)."""
        return {
            "binWidth": self.bin_width,
            "wavelet": self.wavelet,
            "label": 1,
            "minimumROIDimensions": self.minimum_roi_dimensions,
            "resampledPixelSpacing": None,
            "normalize": False,
            "distances": [1],
            "force2D": False,
        }

    @cached_property
    def digest(self) -> str:
        """SHA-256 over the values that change features (crop margin excluded: it never changes a value)."""
        payload = {k: v for k, v in asdict(self).items() if k != "crop_margin"}
        payload["pyradiomics"] = PYRADIOMICS_VERSION
        payload["pywavelets"] = pywt.__version__
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


DEFAULT_SETTINGS = RadiomicsSettings()
"""The paper's settings."""
