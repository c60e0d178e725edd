"""Batched, on-device training augmentation (paper section 2.3), one transform per class.

Every random transform draws its parameters in :meth:`get_params` and applies its deterministic twin, so a
draw can be recorded and replayed. All act on ``[N, C, D, H, W]`` tensors (patch axes z, y, x) with
per-sample parameters, on whatever device the batch lives on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Flip3D",
    "RandomFlip3D",
    "Affine3D",
    "RandomAffine3D",
    "GaussianBlur3D",
    "RandomGaussianBlur3D",
    "centre_of_mass_offset",
    "AugmentationConfig",
    "AugmentationDraw",
    "TrainAugmentation",
]


def _check_batch(x: Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"expected a batch [N, C, D, H, W], got shape {tuple(x.shape)}")


@functools.lru_cache(maxsize=32)
def _half_extent_ratio(extent_mm: tuple[float, float, float], device: str) -> Tensor:
    """``[3, 3]`` float64 ``r[i, j] = e[j] / e[i]``, on ``device`` once: copying it from the host every batch
    would wait for the GPU (a blocking host-to-device copy synchronises the stream)."""
    e = torch.tensor(extent_mm, dtype=torch.float64)
    return (e.unsqueeze(0) / e.unsqueeze(1)).to(device)


class Flip3D:
    """Flip each sample along one spatial axis: ``axes[i]`` in {-1 (none), 0 (z), 1 (y), 2 (x)}.

    Example:
        >>> x = torch.arange(8.).reshape(1, 1, 2, 2, 2)
        >>> bool((Flip3D(torch.tensor([2]))(x) == x.flip(4)).all())
        True
    """

    def __init__(self, axes: Tensor):
        self.axes = axes

    def __call__(self, x: Tensor) -> Tensor:
        _check_batch(x)
        axes = self.axes.to(x.device).view(-1, 1, 1, 1, 1)
        out = torch.where(axes == 0, x.flip(2), x)
        out = torch.where(axes == 1, x.flip(3), out)
        return torch.where(axes == 2, x.flip(4), out)


class RandomFlip3D:
    """With probability ``p`` flip a sample along one axis drawn uniformly from (z, y, x).

    Args:
        p: probability that a sample is flipped, in [0, 1].
    """

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Probability must be a number in [0, 1], not {p}")
        self.p = p

    #: Uniform draws per sample: whether to flip, which axis.
    n_uniforms = 2

    def from_uniforms(self, u: Tensor) -> Tensor:
        """Axes ``[N]`` from uniforms ``u [N, 2]`` on [0, 1): flip if ``u0 < p``, along axis ``floor(3 u1)``."""
        axes = (u[:, 1] * 3).long().clamp_max(2)
        return axes.masked_fill(u[:, 0] >= self.p, -1)

    def get_params(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        return self.from_uniforms(torch.rand(n, self.n_uniforms, generator=generator, device=device))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return Flip3D(self.get_params(x.shape[0], generator, x.device))(x)


class Affine3D:
    r"""Scale, rotate (about the patch centre, in mm) and translate each sample; trilinear, zero padding.

    The output voxel at physical position :math:`p` (mm, relative to the patch centre) samples the input at
    :math:`s^{-1} R^\top p + t`, where :math:`s` is the scale, :math:`R = R_z R_y R_x` the rotation and
    :math:`t` the translation in voxels converted to mm. Rotations act in physical space so anisotropic
    voxels (0.75 x 0.75 x 3 mm) are rotated correctly.

    Args:
        scales: ``[N]`` isotropic scale factors.
        degrees: ``[N, 3]`` rotation angles about the z, y, x axes, in degrees.
        translation: ``[N, 3]`` shift of the content in voxels (z, y, x); positive moves content towards
            higher indices.
        spacing: voxel size (z, y, x) in mm.
    """

    def __init__(self, scales: Tensor, degrees: Tensor, translation: Tensor | None = None,
                 spacing: tuple[float, float, float] = (3.0, 0.75, 0.75)):  # fmt: skip
        self.scales, self.degrees, self.translation, self.spacing = scales, degrees, translation, spacing

    def matrices(self, shape: tuple[int, int, int], device, dtype=torch.float32) -> Tensor:
        """``[N, 3, 4]`` matrices for :func:`torch.nn.functional.affine_grid` (x, y, z order)."""
        n = self.scales.shape[0]
        rad = torch.deg2rad(self.degrees.to(device, torch.float64))
        cz, sz = torch.cos(rad[:, 0]), torch.sin(rad[:, 0])
        cy, sy = torch.cos(rad[:, 1]), torch.sin(rad[:, 1])
        cx, sx = torch.cos(rad[:, 2]), torch.sin(rad[:, 2])
        one, zero = torch.ones_like(cz), torch.zeros_like(cz)
        # rotations in (x, y, z) coordinates, the order affine_grid uses
        rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).view(n, 3, 3)
        ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(n, 3, 3)
        rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).view(n, 3, 3)
        rot = rz @ ry @ rx
        d, h, w = shape
        # diag(1 / half) @ R^T @ diag(half), half = the patch's half extent in mm (x, y, z)
        ratio = _half_extent_ratio((w * self.spacing[2], h * self.spacing[1], d * self.spacing[0]), str(device))
        lin = rot.transpose(1, 2) * ratio / self.scales.to(device, torch.float64).view(n, 1, 1)
        t = torch.zeros(n, 3, dtype=torch.float64, device=device)
        if self.translation is not None:
            tr = self.translation.to(device, torch.float64)  # z, y, x voxels
            t = -torch.stack([tr[:, 2] * 2 / w, tr[:, 1] * 2 / h, tr[:, 0] * 2 / d], -1)
        return torch.cat([lin, t.unsqueeze(-1)], -1).to(dtype)

    def __call__(self, x: Tensor) -> Tensor:
        _check_batch(x)
        theta = self.matrices(tuple(x.shape[2:]), x.device, torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)


class RandomAffine3D:
    r"""Random isotropic scale :math:`s \sim \mathcal{U}(a, b)` and rotations :math:`\theta_i \sim \mathcal{U}(-d, d)`.

    Args:
        scale_range: (a, b), default (0.95, 1.05) as in the paper.
        max_degrees: d in degrees for each of the three axes, default 5.
        spacing: voxel size (z, y, x) in mm.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.95, 1.05), max_degrees: float = 5.0,
                 spacing: tuple[float, float, float] = (3.0, 0.75, 0.75)):  # fmt: skip
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < a <= b, not {scale_range}")
        if max_degrees < 0:
            raise ValueError(f"max_degrees must be >= 0, not {max_degrees}")
        self.scale_range, self.max_degrees, self.spacing = scale_range, max_degrees, spacing

    #: Uniform draws per sample: scale, three angles.
    n_uniforms = 4

    def from_uniforms(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Scales ``[N]`` and angles ``[N, 3]`` from uniforms ``u [N, 4]`` on [0, 1)."""
        a, b = self.scale_range
        return a + (b - a) * u[:, 0], (2 * u[:, 1:4] - 1) * self.max_degrees

    def get_params(self, n: int, generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
        return self.from_uniforms(torch.rand(n, self.n_uniforms, generator=generator, device=device))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None, translation: Tensor | None = None) -> Tensor:
        scales, degrees = self.get_params(x.shape[0], generator, x.device)
        return Affine3D(scales, degrees, translation, self.spacing)(x)


def _gaussian_kernels(sigmas: Tensor, radius: int) -> Tensor:
    """``[N, 2r+1]`` normalised 1-d Gaussians; sigma 0 gives a delta."""
    offsets = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float32)
    s = sigmas.float().clamp_min(1e-6).unsqueeze(1)
    k = torch.exp(-0.5 * (offsets / s) ** 2)
    per_radius = torch.floor(4 * sigmas.float() + 0.5).unsqueeze(1)
    k = torch.where(offsets.abs().unsqueeze(0) <= per_radius, k, torch.zeros_like(k))
    return k / k.sum(dim=1, keepdim=True)


class GaussianBlur3D:
    r"""Separable Gaussian blur with per-sample :math:`\sigma` (voxels) along z, y, x.

    Each 1-d kernel is truncated at radius :math:`\lfloor 4\sigma + 0.5 \rfloor` (the paper's
    "kernel radius 4σ+0.5", scipy's ``truncate=4``) and normalised; outside the patch is zero.

    Args:
        sigmas: ``[N, 3]`` standard deviations (z, y, x) in voxels; 0 leaves that axis unchanged.
        radius: kernel support (z, y, x) to convolve with, at least the largest per-sample radius (taps
            beyond a sample's own radius are zero). Given, the blur needs no device-to-host read of
            ``sigmas`` (a GPU sync); ``None`` derives it from ``sigmas``.
    """

    def __init__(self, sigmas: Tensor, radius: tuple[int, int, int] | None = None):
        self.sigmas = sigmas
        self.radius = radius

    def __call__(self, x: Tensor) -> Tensor:
        _check_batch(x)
        n, c = x.shape[:2]
        sig = self.sigmas.to(x.device)
        out = x.float()
        for axis in range(3):
            if self.radius is not None:
                radius = int(self.radius[axis])
            else:
                radius = int(torch.floor(4 * sig[:, axis].max() + 0.5).item())
            if radius == 0:
                continue
            k = _gaussian_kernels(sig[:, axis], radius).repeat_interleave(c, dim=0)  # [N*C, K]
            shape = [n * c, 1, 1, 1, 1]
            shape[2 + axis] = 2 * radius + 1
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            flat = F.pad(out.reshape(1, n * c, *out.shape[2:]), pad)
            out = F.conv3d(flat, k.view(shape), groups=n * c).view_as(out)
        return out.to(x.dtype)


class RandomGaussianBlur3D:
    r"""Random blur: :math:`\sigma_{y,x} \sim \mathcal{U}(0.1, 0.95)`, :math:`\sigma_z \sim \mathcal{U}(0.03, 0.3)` (paper).

    Args:
        inplane_range: range of the in-plane sigma (y and x share one draw), in voxels.
        slice_range: range of the slice-axis sigma, in voxels.
    """

    def __init__(self, inplane_range: tuple[float, float] = (0.1, 0.95), slice_range: tuple[float, float] = (0.03, 0.3)):
        for name, r in (("inplane_range", inplane_range), ("slice_range", slice_range)):
            if not 0 <= r[0] <= r[1]:
                raise ValueError(f"{name} must be 0 <= a <= b, not {r}")
        self.inplane_range, self.slice_range = inplane_range, slice_range

    #: Uniform draws per sample: slice-axis sigma, in-plane sigma.
    n_uniforms = 2

    def from_uniforms(self, u: Tensor) -> Tensor:
        """Sigmas ``[N, 3]`` (z, y, x) from uniforms ``u [N, 2]`` on [0, 1)."""
        (z0, z1), (p0, p1) = self.slice_range, self.inplane_range
        s_z, s_in = z0 + (z1 - z0) * u[:, 0], p0 + (p1 - p0) * u[:, 1]
        return torch.stack([s_z, s_in, s_in], -1)

    def get_params(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        return self.from_uniforms(torch.rand(n, self.n_uniforms, generator=generator, device=device))

    @property
    def radius(self) -> tuple[int, int, int]:
        """The largest kernel radius (z, y, x) any draw can need, so the blur never reads sigmas back."""
        rz = math.floor(4 * self.slice_range[1] + 0.5)
        r = math.floor(4 * self.inplane_range[1] + 0.5)
        return (rz, r, r)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return GaussianBlur3D(self.get_params(x.shape[0], generator, x.device), self.radius)(x)


def centre_of_mass_offset(x: Tensor) -> Tensor:
    """``[N, 3]`` shift (z, y, x voxels) that moves each lesion's centre of mass to the patch's geometric centre.

    The lesion is the non-zero support of the patch (DESIGN §4 zeroes everything else); samples with an
    empty support get no shift.
    """
    _check_batch(x)
    support = (x != 0).any(dim=1).float()  # [N, D, H, W]
    total = support.sum(dim=(1, 2, 3)).clamp_min(1.0)
    out = []
    for axis, size in enumerate(x.shape[2:]):
        coords = torch.arange(size, device=x.device, dtype=torch.float32)
        dims = [d for d in (1, 2, 3) if d != axis + 1]
        com = (support.sum(dim=dims) * coords).sum(dim=1) / total
        out.append((size - 1) / 2 - com)
    off = torch.stack(out, -1)
    return torch.where(support.sum(dim=(1, 2, 3), keepdim=False).unsqueeze(-1) > 0, off, torch.zeros_like(off))


@dataclass(frozen=True)
class AugmentationConfig:
    """Knobs of the training augmentation; defaults are the paper's."""

    enabled: bool = True
    align_centre_of_mass: bool = True
    flip_p: float = 0.5
    scale_range: tuple[float, float] = (0.95, 1.05)
    max_degrees: float = 5.0
    blur_inplane_sigma: tuple[float, float] = (0.1, 0.95)
    blur_slice_sigma: tuple[float, float] = (0.03, 0.3)
    spacing_zyx: tuple[float, float, float] = (3.0, 0.75, 0.75)


@dataclass(frozen=True)
class AugmentationDraw:
    """One batch's random draws (see :meth:`TrainAugmentation.get_params`): ``[N, 8]`` uniforms on [0, 1),
    which :meth:`TrainAugmentation.apply` maps to each transform's parameters."""

    uniforms: Tensor

    @staticmethod
    def cat(draws: list[AugmentationDraw]) -> AugmentationDraw:
        """Rows of several draws in order (one per member of a stack), applied to their concatenated batches."""
        return AugmentationDraw(torch.cat([d.uniforms for d in draws]))


class TrainAugmentation:
    """The paper's pipeline: centre-of-mass alignment + random affine (one resample), flip, blur.

    ``aug(x, generator)`` is ``aug.apply(x, aug.get_params(len(x), generator, x.device))``: the draws are
    separate from the work, so several members can draw from their own generators and be augmented in one
    pass over their concatenated batches (stacked training).
    """

    def __init__(self, cfg: AugmentationConfig = AugmentationConfig()):
        self.cfg = cfg
        self.flip = RandomFlip3D(cfg.flip_p)
        self.affine = RandomAffine3D(cfg.scale_range, cfg.max_degrees, cfg.spacing_zyx)
        self.blur = RandomGaussianBlur3D(cfg.blur_inplane_sigma, cfg.blur_slice_sigma)

    def get_params(self, n: int, generator: torch.Generator | None = None, device=None) -> AugmentationDraw:
        """Draw ``n`` samples' uniforms, one call on the generator: affine, flip, then blur columns."""
        width = self.affine.n_uniforms + self.flip.n_uniforms + self.blur.n_uniforms
        return AugmentationDraw(torch.rand(n, width, generator=generator, device=device))

    def apply(self, x: Tensor, draw: AugmentationDraw) -> Tensor:
        """Augment ``x`` with drawn parameters (deterministic); the uniforms are mapped here, once per batch
        however many members' draws it concatenates."""
        u_affine, u_flip, u_blur = draw.uniforms.split([self.affine.n_uniforms, self.flip.n_uniforms, self.blur.n_uniforms], 1)
        scales, degrees = self.affine.from_uniforms(u_affine)
        shift = centre_of_mass_offset(x) if self.cfg.align_centre_of_mass else None
        x = Affine3D(scales, degrees, shift, self.cfg.spacing_zyx)(x)
        x = Flip3D(self.flip.from_uniforms(u_flip))(x)
        return GaussianBlur3D(self.blur.from_uniforms(u_blur), self.blur.radius)(x)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.cfg.enabled:
            return x
        return self.apply(x, self.get_params(x.shape[0], generator, x.device))


def _degrees_check() -> float:  # pragma: no cover - keeps math imported for doc builds
    return math.pi
