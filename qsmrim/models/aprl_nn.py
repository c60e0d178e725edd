"""APRL(NN) comparator (paper section 2.4): the radiomics branch of QSMRim-Net plus its classifier.

Same architecture as QSMRim-Net's radiomics MLP (527 -> 1024 -> 512) followed by the 512 -> 128 -> 1
classifier, on all 527 radiomic features; no image input and no oversampling.
"""

from __future__ import annotations

from torch import Tensor

from qsmrim.models._checks import check_positive_int
from qsmrim.models.base import (
    CLASSIFIER_HIDDEN_MULT,
    FEATURE_MULT,
    N_RADIOMICS,
    RADIOMICS_HIDDEN_MULT,
    RimClassifier,
)
from qsmrim.models.layers import ClassifierHead
from qsmrim.models.radiomics_mlp import RadiomicsMLP

__all__ = ["APRLNN"]


class APRLNN(RimClassifier):
    """Radiomics-only network: ``radiomics [N, 527] -> logit [N]``; ``patch`` is ignored.

    Parameters
    ----------
    n_radiomics : int, default=527
        Number of radiomic features.
    base_channels : int, default=64
        Width knob shared with :class:`~qsmrim.models.qsmrimnet.QSMRimNet`: hidden 16x, feature 8x,
        classifier hidden 2x ``base_channels`` (1024, 512, 128 at the default).
    radiomics_dropout : float, default=0.3
        Dropout of the MLP's first layer.
    classifier_dropout : float, default=0.5
        Dropout inside the classifier.
    act : str, default="swish"
        Activation name.

    Examples
    --------
    >>> import torch
    >>> APRLNN(base_channels=4).eval()(torch.zeros(2, 2, 16, 32, 32), torch.zeros(2, 527)).shape
    torch.Size([2])
    """

    uses_patch = False

    def __init__(
        self,
        n_radiomics: int = N_RADIOMICS,
        base_channels: int = 64,
        *,
        radiomics_dropout: float = 0.3,
        classifier_dropout: float = 0.5,
        act: str = "swish",
    ):
        super().__init__()
        check_positive_int(base_channels, "base_channels")
        self.radiomics_mlp = RadiomicsMLP(
            n_radiomics,
            RADIOMICS_HIDDEN_MULT * base_channels,
            FEATURE_MULT * base_channels,
            dropout=radiomics_dropout,
            act=act,
        )
        self.classifier = ClassifierHead(
            FEATURE_MULT * base_channels,
            CLASSIFIER_HIDDEN_MULT * base_channels,
            act=act,
            dropout=classifier_dropout,
        )

    def forward(self, patch: Tensor, radiomics: Tensor) -> Tensor:
        """Return rim+ logits ``[N]``."""
        del patch
        return self.classifier(self.radiomics_mlp(radiomics))
