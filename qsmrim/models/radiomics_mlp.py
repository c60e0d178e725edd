"""Radiomics branch of QSMRim-Net (paper section 2.2.1), also the body of APRL(NN).

Two fully connected layers: ``Linear(527 -> 1024) -> BatchNorm1d -> Swish -> Dropout(0.3)`` then
``Linear(1024 -> 512) -> BatchNorm1d -> Swish``. Inputs are radiomic features already standardised on
the training fold (done upstream, inside the exported graph at inference).
"""

from __future__ import annotations

from torch import Tensor, nn

from qsmrim.models.base import N_RADIOMICS
from qsmrim.models.layers import LinearBlock

__all__ = ["RadiomicsMLP"]


class RadiomicsMLP(nn.Module):
    """Two-layer MLP over the 527 radiomic features: ``[N, in_features] -> [N, out_features]``.

    Parameters
    ----------
    in_features : int, default=527
        Number of radiomic features.
    hidden_features : int, default=1024
        Width of the first layer.
    out_features : int, default=512
        Width of the output (matches the ResNet-18 feature so the two can be concatenated or added).
    dropout : float, default=0.3
        Dropout after the first layer (paper); the second layer has none.
    act : str, default="swish"
        Activation name, see :data:`qsmrim.models.layers.ACTIVATIONS`.

    Examples
    --------
    >>> import torch
    >>> RadiomicsMLP(hidden_features=16, out_features=8).eval()(torch.zeros(2, 527)).shape
    torch.Size([2, 8])
    """

    def __init__(
        self,
        in_features: int = N_RADIOMICS,
        hidden_features: int = 1024,
        out_features: int = 512,
        *,
        dropout: float = 0.3,
        act: str = "swish",
    ):
        super().__init__()
        self.net = nn.Sequential(
            LinearBlock(in_features, hidden_features, act=act, dropout=dropout),
            LinearBlock(hidden_features, out_features, act=act),
        )
        self.out_features = out_features

    def forward(self, radiomics: Tensor) -> Tensor:
        """Return the radiomic embedding ``[N, out_features]``."""
        return self.net(radiomics)
