"""The layer-level pieces of stacking: grouped convolutions, wider batch norms, a member's block of a tensor.

Shared by :mod:`qsmrim.models.stacked` (stacked backbones) and :mod:`qsmrim.models.stacked_head` (stacked
heads), so the two do not import each other; the maths is in :mod:`qsmrim.models.stacked`'s docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["member_block", "stacked_conv", "stacked_norm"]


def stacked_conv(convs: Sequence[nn.Conv1d | nn.Conv2d | nn.Conv3d]) -> nn.Module:
    """One convolution computing ``convs`` side by side: ``groups`` and channels times ``len(convs)``, weights
    concatenated along the output channels."""
    c = convs[0]
    g = len(convs)
    out = type(c)(
        c.in_channels * g,
        c.out_channels * g,
        c.kernel_size,  # type: ignore[arg-type]
        stride=c.stride,  # type: ignore[arg-type]
        padding=c.padding,  # type: ignore[arg-type]
        dilation=c.dilation,  # type: ignore[arg-type]
        groups=c.groups * g,
        bias=c.bias is not None,
        padding_mode=c.padding_mode,
        device=c.weight.device,
        dtype=c.weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in convs], 0))
        if c.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in convs], 0))  # type: ignore[union-attr]
    return out


def stacked_norm(norms: Sequence[nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d]) -> nn.Module:
    """One batch norm ``len(norms)`` times wider holding each norm's parameters and statistics in its block."""
    n = norms[0]
    out = type(n)(n.num_features * len(norms), eps=n.eps, momentum=n.momentum, affine=n.affine,
                  track_running_stats=n.track_running_stats)  # fmt: skip
    out = out.to(device=next(iter(n.buffers()), torch.zeros(0)).device)
    with torch.no_grad():
        for name, t in list(out.named_parameters()) + list(out.named_buffers()):
            parts = [getattr(m, name) for m in norms]
            if t.ndim == 0:  # num_batches_tracked: the same count for members that train together
                t.copy_(parts[0])
            else:
                t.copy_(torch.cat(parts, 0))
    return out


def member_block(t: Tensor, n_members: int, index: int) -> Tensor:
    """Member ``index``'s block of a stacked tensor (dimension 0 holds ``n_members`` blocks): a view, so
    gradients and in-place updates reach the stacked tensor. A 0-d tensor (a batch norm's step counter,
    shared by the stack) is copied."""
    return t.unflatten(0, (n_members, -1))[index] if t.ndim else t.clone()
