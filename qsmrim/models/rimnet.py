"""RimNet comparator (Barquero et al. 2020), adapted to QSM + FLAIR (paper section 2.4).

RimNet is a multimodal 3-D VGG: each modality has its own convolutional stream of VGG blocks
(``[Conv3x3x3 -> BN -> act] x convs_per_block -> MaxPool 2``), each stream's last feature map is
reduced by a 1x1x1 convolution and flattened, the streams are concatenated (late fusion) and fully
connected layers give the decision. Here the streams take the QSM and FLAIR channels in place of
phase and FLAIR, the widths default to the public re-implementations (32, 64, 128 channels;
256, 128, 64 hidden units) and the output is one logit. Batch normalisation replaces the original
model's plain convolutions so that it trains with the same optimiser settings as the other models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qsmrim.models._checks import (
    check_int_sequence,
    check_int_tuple,
    check_positive_int,
    check_probability,
)
from qsmrim.models.base import PATCH_SHAPE, QSM_SCALE, RimClassifier
from qsmrim.models.layers import ChannelScale, make_activation

__all__ = ["RimNet"]


class RimNet(RimClassifier):
    """Multimodal 3-D VGG with one stream per modality and late fusion: ``patch -> logit [N]``.

    Parameters
    ----------
    in_channels : int, default=2
        Modalities; each gets its own stream.
    channels : sequence of int, default=(32, 64, 128)
        Output channels of each VGG block (one max pool per block).
    convs_per_block : int, default=2
        3x3x3 convolutions per block.
    reduction_channels : int, default=1
        Channels of the 1x1x1 convolution closing each stream (keeps the flattened vector small).
    hidden_features : sequence of int, default=(256, 128, 64)
        Fully connected widths after fusion.
    dropout : float, default=0.5
        Dropout after each hidden fully connected layer.
    act : str, default="relu"
        Activation name.
    spatial_size : sequence of 3 int, default=(16, 32, 32)
        Patch size (z, y, x); fixes the flattened width of the fully connected input.
    qsm_scale : float, default=10.0
        Fixed factor on the QSM channel (ppm), as in QSMRim-Net (:class:`~qsmrim.models.layers.ChannelScale`).

    Examples
    --------
    >>> import torch
    >>> net = RimNet(channels=(4, 8, 8), hidden_features=(16,)).eval()
    >>> net(torch.zeros(3, 2, 16, 32, 32), torch.zeros(3, 527)).shape
    torch.Size([3])
    """

    uses_radiomics = False

    def __init__(
        self,
        in_channels: int = 2,
        channels: Sequence[int] = (32, 64, 128),
        *,
        convs_per_block: int = 2,
        reduction_channels: int = 1,
        hidden_features: Sequence[int] = (256, 128, 64),
        dropout: float = 0.5,
        act: str = "relu",
        spatial_size: Sequence[int] = PATCH_SHAPE[1:],
        qsm_scale: float = QSM_SCALE,
    ):
        super().__init__()
        if not qsm_scale > 0:
            raise ValueError(f"qsm_scale must be > 0, not {qsm_scale!r}")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(convs_per_block, "convs_per_block")
        check_positive_int(reduction_channels, "reduction_channels")
        check_probability(dropout, "dropout")
        channels = check_int_sequence(channels, "channels")
        hidden = check_int_sequence(hidden_features, "hidden_features")
        spatial = check_int_tuple(spatial_size, "spatial_size", 3)
        make_activation(act)  # fail early on an unknown name

        self.input_scale = ChannelScale((float(qsm_scale),) + (1.0,) * (in_channels - 1))  # channel 0 is QSM (ppm)
        self.streams = nn.ModuleList(
            [_stream(channels, convs_per_block, reduction_channels, act) for _ in range(in_channels)]
        )
        with torch.no_grad():
            n_flat = self.streams[0].eval()(torch.zeros(1, 1, *spatial)).numel()
        self.streams.train()

        layers: list[nn.Module] = []
        width = n_flat * in_channels
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(act), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.fc = nn.Sequential(*layers)

    def forward(self, patch: Tensor, radiomics: Tensor) -> Tensor:
        """Return rim+ logits ``[N]``; ``radiomics`` is ignored."""
        del radiomics
        patch = self.input_scale(patch)
        feats = [stream(patch[:, c : c + 1]).flatten(1) for c, stream in enumerate(self.streams)]
        return self.fc(torch.cat(feats, dim=1)).squeeze(-1)


def _stream(
    channels: tuple[int, ...], convs_per_block: int, reduction_channels: int, act: str
) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for c_out in channels:
        for _ in range(convs_per_block):
            layers += [
                nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm3d(c_out),
                make_activation(act),
            ]
            c_in = c_out
        layers.append(nn.MaxPool3d(2, ceil_mode=True))
    layers.append(nn.Conv3d(c_in, reduction_channels, 1))
    return nn.Sequential(*layers)
