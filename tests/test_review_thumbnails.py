"""Tests of the lesion thumbnails (:func:`qsmrim.review.render_thumbnails`), measured on the decoded PNG.

The subject is built by hand at 0.75 x 0.75 x 3 mm so every expected pixel is worked out from millimetres:
the target lesion is a 4 x 4 x 4 voxel box (3 x 3 x 12 mm), drawn at 3 px per mm with a one-pixel outline
outside it, so its red outline spans 9 + 2 px wide and 36 + 2 px tall in the coronal and sagittal panels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qsmrim.data import SubjectVolumes, discover_cohort
from qsmrim.data.cohort import load_subject
from qsmrim.review import ThumbnailConfig, panel_boxes, render_thumbnails

SPACING = (0.75, 0.75, 3.0)
SHAPE = (64, 64, 16)  # 48 x 48 x 48 mm: a 40 mm panel around the centre stays inside the volume
CFG = ThumbnailConfig()
PX_PER_MM = CFG.panel_px / CFG.fov_mm
RED = np.array(CFG.target_rgb)
CYAN = np.array(CFG.neighbour_rgb)


def _subject() -> SubjectVolumes:
    qsm = np.full(SHAPE, 0.075, np.float32)  # every voxel is brain (QSM != 0)
    z = np.arange(SHAPE[2], dtype=np.float32)
    flair = np.broadcast_to(100 * z + 50, SHAPE).astype(np.float32).copy()
    inst = np.zeros(SHAPE, np.int32)
    inst[30:34, 30:34, 6:10] = 7  # target: 3 x 3 x 12 mm, centroid voxel (31.5, 31.5, 7.5)
    inst[42:46, 30:34, 6:10] = 9  # neighbour, 9 mm to patient right
    qsm[inst == 7], flair[inst == 7] = 0.3, 5000.0  # saturates both windows: white
    qsm[inst == 9] = -0.05
    affine = np.diag([*SPACING, 1.0])
    return SubjectVolumes("01", qsm, flair, inst, affine, {7: 1, 9: 0})


def _png(vol: SubjectVolumes, lesion: int, config: ThumbnailConfig = CFG) -> np.ndarray:
    png = render_thumbnails(vol, [lesion], config)[lesion]
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _panel(img: np.ndarray, plane: str, channel: str, config: ThumbnailConfig = CFG) -> np.ndarray:
    x0, y0, x1, y1 = panel_boxes(config)[(plane, channel)]
    return img[y0:y1, x0:x1]


def _extent(panel: np.ndarray, rgb: np.ndarray) -> tuple[int, int]:
    """(width, height) in pixels of the pixels of colour ``rgb``."""
    ys, xs = np.nonzero((panel == rgb).all(axis=2))
    assert xs.size, "colour not found in the panel"
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _png(_subject(), 7)


def test_thumbnail_size_is_the_layout(image):
    """Check that the PNG has the configured size: 6 panels of 120 px, gaps, a caption strip."""
    assert image.shape[:2] == (CFG.header_px + CFG.panel_px, 6 * 120 + 3 * 2 + 2 * 10)
    assert CFG.size == (image.shape[1], image.shape[0])


@pytest.mark.parametrize(("plane", "mm_wide", "mm_tall"), [("axial", 3, 3), ("coronal", 3, 12), ("sagittal", 3, 12)])
@pytest.mark.parametrize("channel", ["QSM", "FLAIR"])
def test_thumbnail_aspect_follows_the_voxel_size(image, plane, channel, mm_wide, mm_tall):
    """Check that the red outline spans the lesion's true extent in mm (+1 px each side): a 0.75 x 0.75 x 3 mm
    voxel box of 4 x 4 x 4 voxels is 4 times taller than wide in the coronal and sagittal planes."""
    width, height = _extent(_panel(image, plane, channel), RED)
    assert abs(width - (mm_wide * PX_PER_MM + 2)) <= 1
    assert abs(height - (mm_tall * PX_PER_MM + 2)) <= 1
    if plane != "axial":
        assert height / width > 3.0


def test_thumbnail_outline_is_outside_the_lesion(image):
    """Check that the lesion's own voxels keep their grey (white: 0.3 ppm and FLAIR above the window), with
    the outline around them, and the centre of each panel is the lesion."""
    for (plane, channel), _box in panel_boxes(CFG).items():
        panel = _panel(image, plane, channel)
        c = CFG.panel_px // 2
        assert (panel[c - 2:c + 2, c - 2:c + 2] == 255).all(), (plane, channel)


def test_thumbnail_qsm_window_is_symmetric_in_ppm(image):
    """Check grey values against the fixed window: 0.075 ppm -> (0.075 + 0.15) / 0.3 * 255 = 191; the
    neighbour at -0.05 ppm -> 85."""
    qsm = _panel(image, "axial", "QSM")
    assert (qsm[5, 5] == 191).all()
    # neighbour centre: 11 voxels (8.25 mm) right of the target centroid on the same rows
    cx = CFG.panel_px // 2 + round(((43.5 - 31.5) * 0.75) * PX_PER_MM)
    assert (qsm[CFG.panel_px // 2, cx] == 85).all()
    assert _extent(qsm, CYAN)[0] > 0


def test_thumbnail_flair_window_is_brain_percentiles(image):
    """Check the FLAIR grey of the axial slice (z = 8, FLAIR 850) against the 1st and 99.5th percentiles of
    the brain voxels computed here with NumPy."""
    vol = _subject()
    lo, hi = np.percentile(vol.flair[vol.qsm != 0], (1, 99.5))
    want = round((850 - lo) / (hi - lo) * 255)
    flair = _panel(image, "axial", "FLAIR")
    assert abs(int(flair[5, 5, 0]) - want) <= 1
    assert (flair[5, 5] == flair[5, 5, 0]).all()  # grey


def test_thumbnail_scale_bar_is_ten_mm(image):
    """Check that the white scale bar in the first panel is 10 mm long at 3 px per mm."""
    qsm = _panel(image, "axial", "QSM")
    row = qsm[CFG.panel_px - 4]
    white = np.flatnonzero((row == 255).all(axis=1))
    assert white.size == round(10 * PX_PER_MM)


def test_thumbnail_field_of_view_grows_for_large_lesions():
    """Check that a lesion larger than the panel is shown whole: the field of view becomes 1.6 x its extent,
    and the scale bar shrinks to match."""
    vol = _subject()
    inst = vol.instances.copy()
    inst[8:56, 8:56, 6:10] = 7  # 36 mm wide: the panel grows to 57.6 mm
    big = SubjectVolumes("01", vol.qsm, vol.flair, inst, vol.affine, {7: 1})
    img = _png(big, 7)
    qsm = _panel(img, "axial", "QSM")
    fov = 1.6 * 36
    width, _ = _extent(qsm, RED)
    assert abs(width - (36 * CFG.panel_px / fov + 2)) <= 1
    white = np.flatnonzero((qsm[CFG.panel_px - 4] == 255).all(axis=1))
    assert white.size == round(10 * CFG.panel_px / fov)


def test_thumbnail_of_a_synthetic_subject_is_small(synth_root):
    """Check that thumbnails of every lesion of a real synthetic subject are PNGs of about 30 KB or less."""
    vol = load_subject(discover_cohort(synth_root).subjects[0])
    pngs = render_thumbnails(vol)
    assert sorted(pngs) == vol.lesion_indices
    sizes = [len(p) for p in pngs.values()]
    assert all(p.startswith(b"\x89PNG") for p in pngs.values())
    assert max(sizes) < 40_000, sizes


def test_thumbnail_unknown_lesion_is_refused():
    """Check that asking for a lesion not in the map names the subject and the lesion."""
    with pytest.raises(ValueError, match=r"sub-01: lesion\(s\) \[3\] are not in the lesion map"):
        render_thumbnails(_subject(), [3])


@pytest.mark.parametrize(
    ("params", "err_msg"),
    [
        ({"qsm_window_ppm": 0}, "qsm_window_ppm must be a positive number"),
        ({"fov_mm": float("nan")}, "fov_mm must be a positive number"),
        ({"panel_px": 4}, "panel_px must be an int >= 8"),
        ({"flair_percentiles": (99, 1)}, "flair_percentiles must satisfy"),
        ({"target_rgb": (300, 0, 0)}, "target_rgb must be three ints"),
    ],
)
def test_thumbnail_config_bad_values(params, err_msg):
    """Check that each bad config value raises ValueError naming the field."""
    with pytest.raises(ValueError, match=err_msg):
        ThumbnailConfig(**params)
