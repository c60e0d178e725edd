"""Lesion thumbnails: three orthogonal slices through a lesion's centroid, QSM and FLAIR side by side.

One picture per lesion, the same for the CV report's gallery and for ``qsmrim predict``'s review page, so a
reader learns one layout. Each plane is a pair of square panels (QSM left, FLAIR right, as in paper Fig. 8):
axial, coronal, sagittal, left to right. Panels are resampled nearest-neighbour onto a square grid in
millimetres, so a 0.75 x 0.75 x 3 mm voxel is drawn four times taller than wide in the coronal and sagittal
planes instead of square. Windows are fixed so that two thumbnails can be compared by eye: QSM symmetric in
ppm, FLAIR between two percentiles of the subject's brain voxels (QSM != 0, as the patches normalise it).
The target lesion is outlined in one colour and its neighbours in another, one pixel *outside* each lesion,
so the rim itself is never painted over. A scale bar sits in the first panel.

Panels are composed pixel-exact as arrays (what a test measures is what a reader sees). Captions are drawn by
matplotlib through its object-oriented API and Agg canvas only (no ``pyplot``, safe in any process), once
per distinct text, and pasted; Pillow (a matplotlib dependency) writes the PNG with an exact 8-bit palette.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from qsmrim.data.cohort import SubjectVolumes, compact_instances

__all__ = ["PLANES", "ThumbnailConfig", "panel_boxes", "render_thumbnails"]

log = logging.getLogger(__name__)

PLANES: tuple[tuple[str, int, int, int], ...] = (
    ("axial", 0, 1, 2),
    ("coronal", 0, 2, 1),
    ("sagittal", 1, 2, 0),
)
"""(name, horizontal voxel axis, vertical voxel axis, fixed axis) of each pair, in RAS+ ``[x, y, z]`` order.
The horizontal axis grows to the right (patient right, or anterior for sagittal) and the vertical one
upwards (anterior, or superior)."""

CHANNELS: tuple[str, ...] = ("QSM", "FLAIR")
PNG_COMPRESS_LEVEL = 9
"""zlib level of the PNGs: 9 costs a few ms more than 6 per thumbnail for a smaller file."""
_AXIS_LETTER = "xyz"


@dataclass(frozen=True)
class ThumbnailConfig:
    """How a lesion is drawn; every size is in output pixels unless its name says mm.

    Parameters
    ----------
    qsm_window_ppm : float, default=0.15
        QSM is shown from ``-qsm_window_ppm`` (black) to ``+qsm_window_ppm`` (white); 0 ppm is mid grey.
        Rims are about +0.05 to +0.1 ppm above their lesion, veins up to about 0.3 ppm.
    flair_percentiles : (float, float), default=(1.0, 99.5)
        FLAIR black and white points: these percentiles of the subject's brain voxels (QSM != 0).
    fov_mm : float, default=40.0
        Side of each square panel in mm; grows to ``fov_margin`` x the lesion's largest extent for lesions
        too big to fit with context around them.
    fov_margin : float, default=1.6
    panel_px : int, default=120
        Side of each panel in pixels (120 px over 40 mm: 3 px per mm, a 0.75 mm voxel spans 2.25 px).
    gap_px, pair_gap_px, header_px : int, default=2, 10, 14
        Space between QSM and FLAIR, between planes, and the caption strip above the panels.
    scale_bar_mm : float, default=10.0
    target_rgb, neighbour_rgb : (int, int, int)
        Outline colours of the target lesion (red) and of the other lesions (cyan).
    font_size : float, default=7.0
        Caption size in points at 100 dpi.
    """

    qsm_window_ppm: float = 0.15
    flair_percentiles: tuple[float, float] = (1.0, 99.5)
    fov_mm: float = 40.0
    fov_margin: float = 1.6
    panel_px: int = 120
    gap_px: int = 2
    pair_gap_px: int = 10
    header_px: int = 14
    scale_bar_mm: float = 10.0
    target_rgb: tuple[int, int, int] = (255, 40, 40)
    neighbour_rgb: tuple[int, int, int] = (0, 200, 255)
    font_size: float = 7.0

    def __post_init__(self) -> None:
        for name in ("qsm_window_ppm", "fov_mm", "fov_margin", "scale_bar_mm", "font_size"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
                raise ValueError(f"ThumbnailConfig.{name} must be a positive number, not {value!r}")
        for name in ("panel_px", "gap_px", "pair_gap_px", "header_px"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (8 if name == "panel_px" else 0):
                raise ValueError(f"ThumbnailConfig.{name} must be an int >= {8 if name == 'panel_px' else 0}, "
                                 f"not {value!r}")  # fmt: skip
        lo, hi = self.flair_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"ThumbnailConfig.flair_percentiles must satisfy 0 <= low < high <= 100, "
                             f"not {self.flair_percentiles!r}")  # fmt: skip
        for name in ("target_rgb", "neighbour_rgb"):
            rgb = getattr(self, name)
            if len(rgb) != 3 or any(not 0 <= int(c) <= 255 for c in rgb):
                raise ValueError(f"ThumbnailConfig.{name} must be three ints in 0..255, not {rgb!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the PNG in pixels."""
        width = 6 * self.panel_px + 3 * self.gap_px + 2 * self.pair_gap_px
        return width, self.header_px + self.panel_px


def panel_boxes(config: ThumbnailConfig = ThumbnailConfig()) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """Where each panel sits in the PNG: ``(plane, channel) -> (x0, y0, x1, y1)`` pixels, end exclusive.

    ``plane`` is ``"axial"``, ``"coronal"`` or ``"sagittal"``; ``channel`` ``"QSM"`` or ``"FLAIR"``.
    """
    p, boxes, x = config.panel_px, {}, 0
    y0 = config.header_px
    for plane, *_ in PLANES:
        for k, channel in enumerate(CHANNELS):
            boxes[(plane, channel)] = (x, y0, x + p, y0 + p)
            x += p + (config.gap_px if k == 0 else config.pair_gap_px)
    return boxes


def render_thumbnails(
    vol: SubjectVolumes,
    lesions: Iterable[int] | None = None,
    config: ThumbnailConfig = ThumbnailConfig(),
) -> dict[int, bytes]:
    """PNG thumbnails of lesions of one subject: ``lesion index -> PNG bytes`` (see the module docstring).

    The subject-wide parts (FLAIR window, centroids, bounding boxes) are computed once, so drawing all
    lesions of a subject costs little more than drawing one.

    Parameters
    ----------
    vol : SubjectVolumes
        The validated subject (RAS+ arrays indexed ``[x, y, z]``).
    lesions : iterable of int, default=None
        Lesion indices to draw (default: every lesion).
    config : ThumbnailConfig, default=ThumbnailConfig()

    Raises
    ------
    ValueError
        When a requested lesion is not in the subject's lesion map.
    """
    wanted = vol.lesion_indices if lesions is None else [int(i) for i in lesions]
    if not wanted:
        return {}
    compact, index_of = compact_instances(vol.instances)
    position = {int(v): k for k, v in enumerate(index_of)}
    missing = [i for i in wanted if i not in position or i == 0]
    if missing:
        raise ValueError(f"sub-{vol.subject}: lesion(s) {missing[:20]} are not in the lesion map")
    ks = [position[i] for i in wanted]
    coms = ndimage.center_of_mass(np.ones(compact.shape, np.float32), compact, ks)
    boxes = ndimage.find_objects(compact)
    spacing = np.asarray(vol.spacing, dtype=float)
    flair_lo, flair_hi = _flair_window(vol, config)
    canvas = _Canvas(config)
    out: dict[int, bytes] = {}
    for idx, k, com in zip(wanted, ks, coms, strict=True):
        extent_mm = max((sl.stop - sl.start) * sp for sl, sp in zip(boxes[k - 1], spacing, strict=True))
        fov = max(config.fov_mm, config.fov_margin * extent_mm)
        rgb = canvas.blank()
        captions = []
        for plane, h, v, fixed in PLANES:
            at = int(np.clip(np.floor(com[fixed] + 0.5), 0, compact.shape[fixed] - 1))
            index, inside = _sample_grid(com, spacing, compact.shape, h, v, fixed, at, fov, config.panel_px)
            labels = np.where(inside, compact[index], 0)
            for channel in CHANNELS:
                src = vol.qsm if channel == "QSM" else vol.flair
                values = src[index]
                if channel == "QSM":
                    grey = (values + config.qsm_window_ppm) / (2 * config.qsm_window_ppm)
                else:
                    grey = (values - flair_lo) / (flair_hi - flair_lo)
                grey = np.where(inside, np.clip(np.nan_to_num(grey, nan=0.0), 0.0, 1.0), 0.0)
                panel = np.repeat(np.rint(grey * 255).astype(np.uint8)[..., None], 3, axis=2)
                _outline(panel, labels, k, config)
                canvas.paste(panel, plane, channel)
            captions.append(f"{plane} {_AXIS_LETTER[fixed]}={at}")
        canvas.scale_bar(rgb, fov)
        out[idx] = canvas.png(rgb, captions)
    return out


def _flair_window(vol: SubjectVolumes, config: ThumbnailConfig) -> tuple[float, float]:
    """FLAIR black and white points from the brain voxels (QSM != 0), finite ones only."""
    brain = vol.flair[(vol.qsm != 0) & np.isfinite(vol.flair)]
    if brain.size == 0:
        brain = vol.flair[np.isfinite(vol.flair)]
    if brain.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(brain, config.flair_percentiles))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _sample_grid(com, spacing, shape, h, v, fixed, at, fov, n):
    """Voxel indices (nearest) of an ``n x n`` pixel grid of side ``fov`` mm centred on the lesion centroid.

    Row 0 is the top of the panel (the largest coordinate of the vertical axis). Returns the ``[x, y, z]``
    index arrays (for fancy indexing, each ``n x n``) and the mask of pixels inside the volume.
    """
    offsets = ((np.arange(n) + 0.5) * fov / n) - fov / 2  # mm from the centroid, pixel centres
    col = np.floor(com[h] + offsets / spacing[h] + 0.5).astype(np.int64)  # left -> right
    row = np.floor(com[v] - offsets / spacing[v] + 0.5).astype(np.int64)  # top -> bottom
    vv, hh = np.meshgrid(row, col, indexing="ij")
    inside = (hh >= 0) & (hh < shape[h]) & (vv >= 0) & (vv < shape[v])
    hh, vv = np.clip(hh, 0, shape[h] - 1), np.clip(vv, 0, shape[v] - 1)
    idx = [None, None, None]
    idx[h], idx[v], idx[fixed] = hh, vv, np.full_like(hh, at)
    return (idx[0], idx[1], idx[2]), inside


def _outline(panel: np.ndarray, labels: np.ndarray, target: int, config: ThumbnailConfig) -> None:
    """One-pixel outlines just outside the neighbours (first) and the target (on top)."""
    cross = ndimage.generate_binary_structure(2, 1)
    mine = labels == target
    others = (labels != 0) & ~mine
    ring_others = ndimage.binary_dilation(others, cross) & ~others & ~mine
    ring_mine = ndimage.binary_dilation(mine, cross) & ~mine
    panel[ring_others] = config.neighbour_rgb
    panel[ring_mine] = config.target_rgb


class _Canvas:
    """The PNG being composed: panels pasted pixel-exact into an RGB array, captions drawn by matplotlib (Agg)
    once per distinct text and pasted as bitmaps (drawing text was most of a thumbnail's cost)."""

    def __init__(self, config: ThumbnailConfig) -> None:
        self.config = config
        self.width, self.height = config.size
        self.boxes = panel_boxes(config)
        self._rgb: np.ndarray | None = None

    def blank(self) -> np.ndarray:
        self._rgb = np.zeros((self.height, self.width, 3), np.uint8)
        return self._rgb

    def paste(self, panel: np.ndarray, plane: str, channel: str) -> None:
        x0, y0, x1, y1 = self.boxes[(plane, channel)]
        self._rgb[y0:y1, x0:x1] = panel

    def scale_bar(self, rgb: np.ndarray, fov: float) -> None:
        """``scale_bar_mm`` long, 2 px high, at the bottom left of the first panel, labelled above."""
        c = self.config
        x0, y0, x1, y1 = self.boxes[(PLANES[0][0], CHANNELS[0])]
        length = int(round(c.scale_bar_mm * c.panel_px / fov))
        rgb[y1 - 5:y1 - 3, x0 + 4:x0 + 4 + length] = 255
        label = _text_bitmap(f"{c.scale_bar_mm:g} mm", c.font_size - 1, x1 - x0 - 4, c.header_px)
        top = y1 - 6 - label.shape[0]
        area = rgb[top:y1 - 6, x0 + 4:x1]
        np.maximum(area, label[:, :, None], out=area)  # white text over the image

    def png(self, rgb: np.ndarray, captions: list[str]) -> bytes:
        c = self.config
        for (plane, *_), caption in zip(PLANES, captions, strict=True):
            x0 = self.boxes[(plane, CHANNELS[0])][0]
            x1 = self.boxes[(plane, CHANNELS[1])][2]
            text = _text_bitmap(f"{caption}  QSM | FLAIR", c.font_size, x1 - x0, c.header_px)
            rgb[:c.header_px, x0:x1] = text[:, :, None]
        return _encode_png(rgb)


@functools.lru_cache(maxsize=512)
def _text_bitmap(text: str, font_size: float, width: int, height: int) -> np.ndarray:
    """White text on black, ``height x width`` grey levels, drawn by matplotlib's Agg canvas (read-only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="black")
    agg = FigureCanvasAgg(fig)
    fig.text(1 / width, 1 - 1 / height, text, color="white", fontsize=font_size, va="top", ha="left")
    agg.draw()
    grey = np.asarray(agg.buffer_rgba())[..., 0].copy()
    grey.flags.writeable = False
    return grey


def _encode_png(image: np.ndarray) -> bytes:
    """PNG bytes; an exact 8-bit palette when the picture has at most 256 colours (about half the size).

    The pictures are grey but for the outline colours, so the palette is found from a 256-bin histogram of
    the grey pixels plus the few other colours, not by sorting every pixel.
    """
    from PIL import Image

    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    grey = (r == g) & (g == b)
    levels = np.flatnonzero(np.bincount(r[grey], minlength=256))
    others = image[~grey]
    packed = (others[:, 0].astype(np.uint32) << 16) | (others[:, 1].astype(np.uint32) << 8) | others[:, 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    buf = io.BytesIO()
    if levels.size + colours.size <= 256:
        lut = np.zeros(256, np.uint8)
        lut[levels] = np.arange(levels.size)
        index = lut[r]
        index[~grey] = (levels.size + inverse).astype(np.uint8)
        pal = np.concatenate([np.repeat(levels[:, None], 3, axis=1),
                              np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1)])  # fmt: skip
        img = Image.fromarray(index, mode="P")
        img.putpalette(pal.astype(np.uint8).ravel().tolist())
    else:
        img = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()
