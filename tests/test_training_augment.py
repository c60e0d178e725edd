"""Augmentation: exact flips, identity parameters, seeded replay, blur against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from qsmrim.training.augment import (
    Affine3D,
    AugmentationConfig,
    Flip3D,
    GaussianBlur3D,
    RandomAffine3D,
    RandomFlip3D,
    RandomGaussianBlur3D,
    TrainAugmentation,
    centre_of_mass_offset,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 2, 16, 32, 32, generator=g)


def test_flip_matches_numpy_slices(batch):
    """Check that each per-sample axis flip equals the NumPy reversed slice, and -1 leaves a sample alone."""
    out = Flip3D(torch.tensor([0, 1, 2, -1]))(batch).numpy()
    x = batch.numpy()
    np.testing.assert_array_equal(out[0], x[0][:, ::-1])
    np.testing.assert_array_equal(out[1], x[1][:, :, ::-1])
    np.testing.assert_array_equal(out[2], x[2][:, :, :, ::-1])
    np.testing.assert_array_equal(out[3], x[3])


def test_identity_parameters_return_input(batch):
    """Check that scale 1, no rotation, no shift and sigma 0 return the input."""
    same = Affine3D(torch.ones(4), torch.zeros(4, 3), torch.zeros(4, 3))(batch)
    torch.testing.assert_close(same, batch, atol=1e-5, rtol=0)
    torch.testing.assert_close(GaussianBlur3D(torch.zeros(4, 3))(batch), batch, atol=0, rtol=0)


def test_integer_translation_is_a_shift(batch):
    """Check that an integer translation moves content by whole voxels with zero fill."""
    out = Affine3D(torch.ones(4), torch.zeros(4, 3), torch.tensor([[1.0, 2.0, -3.0]] * 4))(batch)
    ref = torch.zeros_like(batch)
    ref[:, :, 1:, 2:, :-3] = batch[:, :, :-1, :-2, 3:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_in_plane_is_rot90(batch):
    """Check that 90 degrees about z (isotropic in-plane voxels) is an exact in-plane quarter turn."""
    out = Affine3D(torch.ones(1), torch.tensor([[90.0, 0.0, 0.0]]))(batch[:1])[0]
    errs = [float((out - torch.rot90(batch[0], k, dims=(2, 3))).abs().max()) for k in (1, 3)]
    assert min(errs) < 1e-5


def test_blur_matches_scipy(batch):
    """Check the separable per-sample blur against scipy.ndimage.gaussian_filter (truncate=4, zero padding)."""
    sig = torch.tensor([[0.3, 0.8, 0.5], [0.1, 0.2, 0.95], [0.0, 0.5, 0.5], [0.25, 0.9, 0.1]])
    out = GaussianBlur3D(sig)(batch).numpy()
    for i in range(4):
        ref = ndimage.gaussian_filter(batch[i, 1].numpy().astype(np.float64), sig[i].tolist(), mode="constant", truncate=4.0)
        np.testing.assert_allclose(out[i, 1], ref, atol=2e-6)


def test_centre_of_mass_offset_moves_lesion_to_centre():
    """Check that the offset plus translation puts the support's centre of mass at the geometric centre."""
    x = torch.zeros(1, 2, 16, 32, 32)
    x[0, 0, 2:5, 3:8, 20:26] = 1.0
    off = centre_of_mass_offset(x)
    np.testing.assert_allclose(off[0].numpy(), [7.5 - 3, 15.5 - 5, 15.5 - 22.5], atol=1e-6)
    moved = Affine3D(torch.ones(1), torch.zeros(1, 3), off)(x)
    m = moved[0, 0]
    coords = [torch.arange(s, dtype=torch.float32) for s in m.shape]
    com = [float((m.sum(dim=[d for d in range(3) if d != a]) * coords[a]).sum() / m.sum()) for a in range(3)]
    np.testing.assert_allclose(com, [7.5, 15.5, 15.5], atol=1e-4)


def test_seeded_augmentation_repeats(batch):
    """Check that the same generator seed replays the whole pipeline exactly, and another seed differs."""
    aug = TrainAugmentation(AugmentationConfig())
    a = aug(batch, torch.Generator().manual_seed(5))
    b = aug(batch, torch.Generator().manual_seed(5))
    c = aug(batch, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)


def test_random_params_follow_the_paper_ranges():
    """Check the sampled scale, angle and sigma ranges (paper 2.3)."""
    g = torch.Generator().manual_seed(0)
    scales, degrees = RandomAffine3D().get_params(5000, g)
    assert 0.95 <= scales.min() and scales.max() <= 1.05
    assert -5 <= degrees.min() and degrees.max() <= 5
    s = RandomGaussianBlur3D().get_params(5000, g)
    assert 0.03 <= s[:, 0].min() and s[:, 0].max() <= 0.3
    assert 0.1 <= s[:, 1].min() and s[:, 1].max() <= 0.95
    assert torch.equal(s[:, 1], s[:, 2])
    axes = RandomFlip3D(0.5).get_params(5000, g)
    assert 0.45 < float((axes >= 0).float().mean()) < 0.55
    assert set(axes.tolist()) == {-1, 0, 1, 2}


@pytest.mark.parametrize("kwargs, match", [({"p": 1.5}, "Probability must be a number in"), ({"p": -0.1}, "Probability")])
def test_random_flip_rejects_bad_probability(kwargs, match):
    """Check that a flip probability outside [0, 1] raises ValueError naming it."""
    with pytest.raises(ValueError, match=match):
        RandomFlip3D(**kwargs)


def test_affine_rejects_bad_scale_range():
    """Check that a non-positive scale range raises ValueError."""
    with pytest.raises(ValueError, match="scale_range"):
        RandomAffine3D(scale_range=(0.0, 1.0))
