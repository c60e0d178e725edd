"""Small fully connected building blocks shared by the QSMRim-Net family and APRL(NN).

The paper builds every fully connected part from the same unit, ``Linear -> BatchNorm1d -> Swish
[-> Dropout]`` (radiomics branch, DeepSMOTE feature transform), and ends with a ``512 -> 128 -> 1``
classifier; keeping them here means the variants in the ablation differ only in what is switched on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qsmrim.models._checks import check_positive_int, check_probability

__all__ = ["ACTIVATIONS", "ChannelScale", "ClassifierHead", "LinearBlock", "make_activation"]

#: Activation names accepted by every model's ``act`` argument. Swish (Ramachandran et al. 2017) is
#: ``x * sigmoid(x)``, i.e. :class:`torch.nn.SiLU`.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (one of :data:`ACTIVATIONS`).

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If ``name`` is not a known activation; the message lists the allowed names.
    """
    if not isinstance(name, str):
        raise TypeError(f"act must be a string, one of {sorted(ACTIVATIONS)}, not {type(name).__name__}")
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]()


class LinearBlock(nn.Sequential):
    """``Linear -> BatchNorm1d -> act [-> Dropout(p)]``, the paper's fully connected unit.

    Parameters
    ----------
    in_features, out_features
        Widths of the linear layer.
    act : str, default="swish"
        Activation name, see :data:`ACTIVATIONS`.
    dropout : float, default=0.0
        Dropout probability after the activation; no dropout layer when 0.
    """

    def __init__(self, in_features: int, out_features: int, *, act: str = "swish", dropout: float = 0.0):
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        check_probability(dropout, "dropout")
        layers: list[nn.Module] = [
            nn.Linear(in_features, out_features),
            nn.BatchNorm1d(out_features),
            make_activation(act),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class ClassifierHead(nn.Module):
    """``Linear(in, hidden) -> act -> Dropout -> Linear(hidden, 1)``: one logit per row.

    Mirrors the classifier of the authors' public QSMRim-Net code (512 -> 128 -> 1, Swish, dropout 0.5).

    Parameters
    ----------
    in_features : int
        Width of the incoming feature vector (512 in the paper).
    hidden_features : int
        Hidden width (128 in the paper).
    act : str, default="swish"
        Activation name.
    dropout : float, default=0.5
        Dropout before the last linear layer.
    """

    def __init__(self, in_features: int, hidden_features: int, *, act: str = "swish", dropout: float = 0.5):
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(hidden_features, "hidden_features")
        check_probability(dropout, "dropout")
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden_features),
            make_activation(act),
            nn.Dropout(dropout),
            nn.Linear(hidden_features, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[N, in_features]`` to logits ``[N]``."""
        return self.net(x).squeeze(-1)


class ChannelScale(nn.Module):
    r"""Multiply each image channel by a fixed factor: :math:`y_{n,c} = s_{c \bmod C}\, x_{n,c}`.

    The patch carries QSM in ppm (a rim is about 0.05 ppm above white matter, noise about 0.015) beside FLAIR
    divided by its brain median (lesions about 2). The first convolution then sees the QSM channel some 30
    times smaller than FLAIR: under Adam each weight moves by about the learning rate whatever its gradient,
    so the QSM half of the stem changes the output 30 times less per step and the rim, which lives on QSM
    only, is learnt last (bench/RESULTS.md, issue 14). Scaling QSM by 10 puts both channels near 1.

    The factors are constants, not parameters or buffers: the layer exports as one ``Mul`` and leaves the
    networks stackable (:func:`qsmrim.models.stacked.stack_networks`): for ``G`` members side by side the
    input has ``G * C`` channels and the ``C`` factors repeat ``G`` times, the stacked layout.

    Parameters
    ----------
    scale : sequence of float
        One factor per input channel (``C = len(scale)``).

    Examples
    --------
    >>> ChannelScale((10.0, 1.0))(torch.ones(1, 4, 1, 1, 1)).flatten().tolist()
    [10.0, 1.0, 10.0, 1.0]
    """

    def __init__(self, scale: Sequence[float]):
        super().__init__()
        self.scale = tuple(float(v) for v in scale)
        if not self.scale or not all(v > 0 for v in self.scale):
            raise ValueError(f"scale must be one positive factor per channel, not {scale!r}")
        self._factors: dict[tuple, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        if all(v == 1.0 for v in self.scale):
            return x
        with warnings.catch_warnings():  # the channel count is fixed: a trace (ONNX export) records a constant
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            c = int(x.shape[1])
            if c % len(self.scale):
                raise ValueError(f"input has {c} channels, not a multiple of the {len(self.scale)} scale factors")
            key = (x.device, x.dtype, c)
            if key not in self._factors:  # made once per device: a host-to-device copy per call would sync the stream
                factors = torch.tensor(self.scale * (c // len(self.scale)), dtype=x.dtype, device=x.device)
                self._factors[key] = factors.view(1, c, *([1] * (x.ndim - 2)))
        return x * self._factors[key]

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
