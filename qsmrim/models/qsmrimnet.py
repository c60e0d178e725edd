"""QSMRim-Net (Zhang et al., paper section 2.2) and the ablation variants of its Table 3.

One class covers the family, switched by four options so that each ablation arm differs from
QSMRim-Net only in the component it names:

====================  ============  =============  ==========  ===========
registry name         image_fusion  use_radiomics  fusion      oversample
====================  ============  =============  ==========  ===========
``qsmrimnet``         channel       yes            concat      yes
``qsmrimnet-add``     channel       yes            add         yes
``image-channel``     channel       no             (none)      no
``image-rimnet``      stream        no             (none)      no
``image-radiomics``   channel       yes            concat      no
====================  ============  =============  ==========  ===========

Data flow: ResNet-18-3D image feature (512) [+ radiomics MLP feature (512), concatenated -> 1024 or
added -> 512] -> DeepSMOTE layer (feature transform to 512, rim+ interpolation in training) ->
classifier 512 -> 128 -> 1 logit.

Decisions worth knowing:

* Concatenation is the paper's fusion (text and Fig. 4); element-wise addition is what the authors'
  public code does, offered as ``fusion="add"`` (registry ``qsmrimnet-add``).
* The paper's "fully connected layer after the concatenation" and the DeepSMOTE MLP that "reduces the
  feature dimension from 1024 to 512" are one and the same here (the first layer of the DeepSMOTE
  transform). Variants without DeepSMOTE keep that transform and drop only the synthesis, so Table 3's
  last step measures oversampling and not extra capacity.
* ``image_fusion="stream"`` is the RimNet-style image fusion of the ablation: one ResNet-18-3D per
  modality (1 input channel each), features concatenated (late fusion).
* All widths scale with ``base_channels`` (64 gives the paper's sizes), so tests run narrow nets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qsmrim.models._checks import check_choice, check_positive_int, check_probability
from qsmrim.models.base import (
    CLASSIFIER_HIDDEN_MULT,
    FEATURE_MULT,
    N_RADIOMICS,
    QSM_SCALE,
    RADIOMICS_HIDDEN_MULT,
    RimClassifier,
)
from qsmrim.models.deepsmote import DeepSMOTE
from qsmrim.models.layers import ClassifierHead
from qsmrim.models.radiomics_mlp import RadiomicsMLP
from qsmrim.models.resnet3d import resnet18_3d

__all__ = ["FUSIONS", "IMAGE_FUSIONS", "QSMRimNet"]

#: How the image and radiomic feature vectors are combined.
FUSIONS: tuple[str, ...] = ("concat", "add")
#: How the QSM and FLAIR channels are combined: stacked into one backbone, or one backbone each.
IMAGE_FUSIONS: tuple[str, ...] = ("channel", "stream")


class QSMRimNet(RimClassifier):
    """QSMRim-Net and its Table 3 ablation variants: ``(patch, radiomics) -> logit [N]``.

    Parameters
    ----------
    in_channels : int, default=2
        Image channels (QSM, FLAIR).
    base_channels : int, default=64
        Width knob: ResNet stage widths are ``base_channels * (1, 2, 4, 8)``, the image and radiomic
        features and the DeepSMOTE output are ``8 * base_channels`` wide, the radiomics hidden layer
        ``16 * base_channels`` and the classifier hidden layer ``2 * base_channels``.
    image_fusion : {"channel", "stream"}, default="channel"
        ``"channel"``: one backbone on the stacked channels (QSMRim-Net). ``"stream"``: one backbone
        per channel, features concatenated (RimNet-style, ablation).
    use_radiomics : bool, default=True
        Whether the radiomics branch is present.
    fusion : {"concat", "add"}, default="concat"
        How image and radiomic features are combined (ignored without radiomics). ``"add"`` needs
        equal widths, so it requires ``image_fusion="channel"``.
    oversample : bool, default=True
        Whether DeepSMOTE synthesises rim+ features in :meth:`forward_train`.
    n_radiomics : int, default=527
        Number of radiomic features.
    n_neighbors : int, default=2
        DeepSMOTE neighbours per rim+ sample.
    radiomics_dropout : float, default=0.3
        Dropout of the radiomics MLP's first layer.
    classifier_dropout : float, default=0.5
        Dropout inside the classifier (authors' code).
    act : str, default="swish"
        Activation of the fully connected parts (the ResNet keeps ReLU).
    qsm_scale : float, default=10.0
        Fixed factor on the QSM channel (ppm) before the backbone, so that it enters on FLAIR's scale
        (:class:`~qsmrim.models.layers.ChannelScale`); 1 feeds the patch as it is.

    Examples
    --------
    >>> import torch
    >>> net = QSMRimNet(base_channels=4).eval()
    >>> net(torch.zeros(3, 2, 16, 32, 32), torch.zeros(3, 527)).shape
    torch.Size([3])
    """

    def __init__(
        self,
        in_channels: int = 2,
        base_channels: int = 64,
        *,
        image_fusion: str = "channel",
        use_radiomics: bool = True,
        fusion: str = "concat",
        oversample: bool = True,
        n_radiomics: int = N_RADIOMICS,
        n_neighbors: int = 2,
        radiomics_dropout: float = 0.3,
        classifier_dropout: float = 0.5,
        act: str = "swish",
        qsm_scale: float = QSM_SCALE,
    ):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(base_channels, "base_channels")
        if not qsm_scale > 0:
            raise ValueError(f"qsm_scale must be > 0, not {qsm_scale!r}")
        check_positive_int(n_radiomics, "n_radiomics")
        check_choice(image_fusion, "image_fusion", IMAGE_FUSIONS)
        check_choice(fusion, "fusion", FUSIONS)
        check_probability(radiomics_dropout, "radiomics_dropout")
        check_probability(classifier_dropout, "classifier_dropout")
        for name, flag in (("use_radiomics", use_radiomics), ("oversample", oversample)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        if image_fusion == "stream" and in_channels < 2:
            raise ValueError(f"image_fusion='stream' needs at least 2 in_channels, not {in_channels}")
        if use_radiomics and fusion == "add" and image_fusion == "stream":
            raise ValueError(
                "fusion='add' needs image and radiomic features of equal width; "
                "use image_fusion='channel' or fusion='concat'"
            )

        self.image_fusion = image_fusion
        self.fusion = fusion
        self.uses_radiomics = use_radiomics
        width = FEATURE_MULT * base_channels

        scale = (float(qsm_scale),) + (1.0,) * (in_channels - 1)  # channel 0 is QSM (ppm)
        if image_fusion == "channel":
            self.backbones = nn.ModuleList([resnet18_3d(in_channels, base_channels, input_scale=scale)])
        else:
            self.backbones = nn.ModuleList([resnet18_3d(1, base_channels, input_scale=scale[c : c + 1])
                                            for c in range(in_channels)])  # fmt: skip
        fused = width * len(self.backbones)

        self.radiomics_mlp: RadiomicsMLP | None = None
        if use_radiomics:
            self.radiomics_mlp = RadiomicsMLP(
                n_radiomics,
                RADIOMICS_HIDDEN_MULT * base_channels,
                width,
                dropout=radiomics_dropout,
                act=act,
            )
            fused = fused + width if fusion == "concat" else fused

        self.smote = DeepSMOTE(fused, width, n_neighbors=n_neighbors, oversample=oversample, act=act)
        self.classifier = ClassifierHead(
            width, CLASSIFIER_HIDDEN_MULT * base_channels, act=act, dropout=classifier_dropout
        )

    def image_features(self, patch: Tensor) -> Tensor:
        """Return the image feature ``[N, 8 * base_channels * n_backbones]`` (one backbone per stream)."""
        if self.image_fusion == "channel":
            return self.backbones[0](patch)
        return torch.cat([net(patch[:, c : c + 1]) for c, net in enumerate(self.backbones)], dim=1)

    def fuse(self, image: Tensor, radiomics: Tensor) -> Tensor:
        """Combine an image feature with the radiomics branch's feature (identity without radiomics)."""
        if self.radiomics_mlp is None:
            return image
        rad = self.radiomics_mlp(radiomics)
        return torch.cat([image, rad], dim=1) if self.fusion == "concat" else image + rad

    def fused_features(self, patch: Tensor, radiomics: Tensor) -> Tensor:
        """Return the fused image (+ radiomics) vector that enters the DeepSMOTE layer."""
        return self.fuse(self.image_features(patch), radiomics)

    def head_train(
        self,
        image: Tensor,
        radiomics: Tensor,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
        anchors: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward_train` from a precomputed image feature (stacked training computes it for several
        members at once, :mod:`qsmrim.models.stacked`)."""
        z, labels_out = self.smote(self.fuse(image, radiomics), labels, generator=generator, anchors=anchors)
        assert labels_out is not None  # labels were given, so the layer returns them
        return self.classifier(z), labels_out

    def forward(self, patch: Tensor, radiomics: Tensor) -> Tensor:
        """Return rim+ logits ``[N]``; no synthesis, whatever the mode."""
        z, _ = self.smote(self.fused_features(patch, radiomics))
        return self.classifier(z)

    def forward_train(
        self,
        patch: Tensor,
        radiomics: Tensor,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
        anchors: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(logits [N + 2n], labels [N + 2n])`` in training mode with DeepSMOTE on.

        ``n`` is the number of rim+ rows when it is at least ``n_neighbors + 1``, else 0. The first
        ``N`` logits are those of the input rows; the rest belong to synthetic rim+ features. In eval
        mode, or with ``oversample=False``, this equals ``(forward(patch, radiomics), labels)``.
        """
        return self.head_train(self.image_features(patch), radiomics, labels, generator=generator, anchors=anchors)
