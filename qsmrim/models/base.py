"""The interface every torch rim classifier implements, and the input contract it is built for.

All torch models in :mod:`qsmrim.models` take ``(patch, radiomics)`` and return one logit per lesion,
so the trainer, the evaluator and the ONNX exporter treat every model the same way; a model simply
ignores the input it does not use. Models whose training step changes the batch (DeepSMOTE appends
synthetic rim+ samples) do so in :meth:`RimClassifier.forward_train`, which is the identity on the
labels for every other model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "CLASSIFIER_HIDDEN_MULT",
    "FEATURE_MULT",
    "N_RADIOMICS",
    "PATCH_SHAPE",
    "QSM_SCALE",
    "RADIOMICS_HIDDEN_MULT",
    "RimClassifier",
    "example_inputs",
]

#: One lesion patch, channels (QSM, FLAIR) x (z, y, x); DESIGN.md section 4.
PATCH_SHAPE: tuple[int, int, int, int] = (2, 16, 32, 32)
#: Radiomic features per lesion, in the order of ``qsmrim.radiomics.FEATURE_NAMES``; DESIGN.md section 4.
N_RADIOMICS: int = 527
#: Factor on the QSM channel (ppm) inside the image models, so that it enters on FLAIR's scale (median-normalised);
#: see :class:`qsmrim.models.layers.ChannelScale`.
QSM_SCALE: float = 10.0

# Widths as multiples of a model's ``base_channels`` knob; at the paper's ``base_channels=64`` they give
# the ResNet-18 / radiomics feature of 512, the radiomics hidden layer of 1024 and the classifier hidden
# layer of 128.
FEATURE_MULT: int = 8
RADIOMICS_HIDDEN_MULT: int = 16
CLASSIFIER_HIDDEN_MULT: int = 2


class RimClassifier(nn.Module):
    """Base class: ``forward(patch, radiomics) -> logit [N]``.

    Subclasses set :attr:`uses_patch` / :attr:`uses_radiomics` (used by export and benchmarks to build
    inputs and by the trainer to skip loading what a model ignores) and implement :meth:`forward`.
    Models that augment the batch during training override :meth:`forward_train`.

    The output is a 1-d tensor of raw logits, one per row (not ``[N, 1]``), so that
    ``torch.nn.functional.binary_cross_entropy_with_logits(logit, label.float())`` works with labels of
    shape ``[N]`` and ``torch.sigmoid(logit)`` is the rim+ probability.
    """

    uses_patch: bool = True
    uses_radiomics: bool = True

    def forward(self, patch: Tensor, radiomics: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return rim+ logits ``[N]`` for ``patch [N,2,16,32,32]`` and ``radiomics [N,527]``."""
        raise NotImplementedError

    def forward_train(
        self,
        patch: Tensor,
        radiomics: Tensor,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
        anchors: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Training step forward: ``(logits [M], labels [M])`` with ``M >= N``.

        The trainer calls this for every model and computes the loss on the returned pair, so that
        models that synthesise samples (DeepSMOTE) and models that do not share one loop. The default
        is the plain forward with the labels passed through unchanged (``M == N``).

        Parameters
        ----------
        patch, radiomics
            The minibatch, as for :meth:`forward`.
        labels
            ``[N]`` rim labels (1 = rim+, 0 = rim-), any numeric or bool dtype.
        generator
            Optional source of randomness for models that draw during the forward pass, so a step can
            be replayed; ``None`` uses torch's default generator.
        anchors
            Optional ``[n]`` ascending indices of the rim+ rows, known to the caller without a GPU sync; used
            by models that synthesise rim+ samples, ignored by the others.
        """
        del generator, anchors
        return self(patch, radiomics), labels


def example_inputs(
    batch_size: int = 2,
    *,
    n_radiomics: int = N_RADIOMICS,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Return seeded random ``(patch [B,2,16,32,32], radiomics [B,n_radiomics])`` float32 inputs."""
    gen = torch.Generator().manual_seed(seed)
    patch = torch.randn((batch_size, *PATCH_SHAPE), generator=gen)
    radiomics = torch.randn((batch_size, n_radiomics), generator=gen)
    return patch.to(device), radiomics.to(device)
