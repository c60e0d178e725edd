"""3-D ResNet backbone (He et al. 2016 with 3-D kernels), the image branch of QSMRim-Net.

The paper turns ResNet-18 into 3-D and feeds it the two channels (QSM, FLAIR); it returns the globally
average-pooled last feature map, ``8 * base_channels`` wide (512 at the paper's ``base_channels=64``).
The stem and strides default to the authors' public code: a 7x7x7 stride-2 convolution, a 3x3x3
stride-2 max pool, and stage strides ``(1, 2, 2, 1)``, which maps a ``16x32x32`` patch to ``1x2x2``
before pooling instead of collapsing it to a single voxel one stage early.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from qsmrim.models._checks import check_int_tuple, check_positive_int
from qsmrim.models.layers import ChannelScale

__all__ = ["BasicBlock3D", "ResNet3D", "resnet18_3d"]

#: Blocks per stage of ResNet-18.
RESNET18_LAYERS: tuple[int, int, int, int] = (2, 2, 2, 2)


class BasicBlock3D(nn.Module):
    """Two 3x3x3 convolutions with batch norm and an identity (or 1x1x1 projection) shortcut.

    Parameters
    ----------
    in_channels, out_channels : int
        Channel widths.
    stride : int, default=1
        Stride of the first convolution; a projection shortcut is added when it is not 1 or the
        widths differ, so the residual sum has matching shapes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block forward."""
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet3D(nn.Module):
    """3-D ResNet feature extractor: ``[N, in_channels, D, H, W] -> [N, 8 * base_channels]``.

    Parameters
    ----------
    in_channels : int, default=2
        Input channels (QSM, FLAIR).
    base_channels : int, default=64
        Width of the first stage; stage ``i`` has ``base_channels * 2**i`` channels. Use small values
        (e.g. 4) for tests and CI.
    layers : sequence of 4 int, default=(2, 2, 2, 2)
        Basic blocks per stage (ResNet-18).
    stage_strides : sequence of 4 int, default=(1, 2, 2, 1)
        Stride of the first block of each stage (authors' code: the last stage keeps the resolution).
    stem_kernel : int, default=7
        Kernel size of the stem convolution.
    stem_stride : int, default=2
        Stride of the stem convolution.
    stem_pool : bool, default=True
        Whether a 3x3x3 stride-2 max pool follows the stem.
    input_scale : sequence of float, optional
        A fixed factor per input channel applied before the stem (:class:`~qsmrim.models.layers.ChannelScale`);
        ``None`` leaves the input as it is.

    Attributes
    ----------
    out_features : int
        Width of the returned feature vector, ``8 * base_channels``.

    Examples
    --------
    >>> import torch
    >>> net = ResNet3D(base_channels=4).eval()
    >>> net(torch.zeros(3, 2, 16, 32, 32)).shape
    torch.Size([3, 32])
    """

    def __init__(
        self,
        in_channels: int = 2,
        base_channels: int = 64,
        *,
        layers: Sequence[int] = RESNET18_LAYERS,
        stage_strides: Sequence[int] = (1, 2, 2, 1),
        stem_kernel: int = 7,
        stem_stride: int = 2,
        stem_pool: bool = True,
        input_scale: Sequence[float] | None = None,
    ):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(base_channels, "base_channels")
        check_positive_int(stem_kernel, "stem_kernel")
        check_positive_int(stem_stride, "stem_stride")
        layers = check_int_tuple(layers, "layers", 4)
        stage_strides = check_int_tuple(stage_strides, "stage_strides", 4)
        if stem_kernel % 2 == 0:
            raise ValueError(
                f"stem_kernel must be odd so the stem keeps the patch centred, not {stem_kernel}"
            )

        self.input_scale = ChannelScale(input_scale if input_scale is not None else (1.0,) * in_channels)
        if len(self.input_scale.scale) != in_channels:
            raise ValueError(f"input_scale needs one factor per input channel ({in_channels}), not {input_scale!r}")
        self.stem = nn.Sequential(
            nn.Conv3d(
                in_channels,
                base_channels,
                stem_kernel,
                stride=stem_stride,
                padding=stem_kernel // 2,
                bias=False,
            ),
            nn.BatchNorm3d(base_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=3, stride=2, padding=1) if stem_pool else nn.Identity(),
        )
        stages: list[nn.Module] = []
        width_in = base_channels
        for i, (n_blocks, stride) in enumerate(zip(layers, stage_strides, strict=True)):
            width = base_channels * 2**i
            blocks = [BasicBlock3D(width_in, width, stride)]
            blocks += [BasicBlock3D(width, width) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            width_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_features = width_in
        self._init_weights()

    def forward(self, x: Tensor) -> Tensor:
        """Return pooled features ``[N, out_features]``."""
        return self.pool(self.stages(self.stem(self.input_scale(x)))).flatten(1)

    def _init_weights(self) -> None:
        # He initialisation for ReLU networks, as in torchvision and the authors' code.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def resnet18_3d(in_channels: int = 2, base_channels: int = 64, **kwargs: object) -> ResNet3D:
    """ResNet-18 in 3-D: ``(2, 2, 2, 2)`` basic blocks; ~33.2M parameters at the defaults."""
    return ResNet3D(in_channels, base_channels, layers=RESNET18_LAYERS, **kwargs)  # type: ignore[arg-type]
