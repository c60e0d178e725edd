r"""DeepSMOTE: minority oversampling in a learnt feature space (paper section 2.2.3, Fig. 5).

SMOTE cannot interpolate images voxel by voxel, but deep features are close to linear, so QSMRim-Net
interpolates rim+ lesions *after* the network has embedded them, inside every training minibatch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from qsmrim.models._checks import check_positive_int
from qsmrim.models.layers import LinearBlock

__all__ = ["DeepSMOTE", "SmoteDraw", "deep_smote_interpolate"]


class SmoteDraw(NamedTuple):
    """Result of :func:`deep_smote_interpolate`; the draw fields allow the step to be replayed.

    Attributes
    ----------
    features : Tensor
        ``[N + k n, d]``: the input rows, then the synthetic rows.
    labels : Tensor
        ``[N + k n]``: the input labels, then ones.
    anchors : Tensor
        ``[n]`` row indices (into the input batch) of the rim+ samples, in batch order.
    neighbors : Tensor
        ``[n, k]`` row indices of each anchor's ``k`` nearest rim+ neighbours, nearest first.
    alpha : Tensor
        ``[n, k]`` interpolation weights on the anchor.
    """

    features: Tensor
    labels: Tensor
    anchors: Tensor
    neighbors: Tensor
    alpha: Tensor


def deep_smote_interpolate(
    features: Tensor,
    labels: Tensor,
    *,
    n_neighbors: int = 2,
    alpha: Tensor | None = None,
    generator: torch.Generator | None = None,
    anchors: Tensor | None = None,
) -> SmoteDraw:
    r"""Append ``k`` synthetic rim+ rows per rim+ row of a minibatch (SMOTE in feature space).

    Let :math:`z_1, \dots, z_N \in \mathbb{R}^d` be the rows of ``features`` and
    :math:`P = \{p : y_p = 1\}` the rim+ rows, :math:`n = |P|`. For each :math:`p \in P` (batch
    order) let :math:`p_1, \dots, p_k` be its ``k`` nearest *other* rim+ rows by Euclidean distance
    :math:`\lVert z_p - z_q \rVert_2` (nearest first, ties broken by row index). Then

    .. math::

        \bar z_{p,j} = \alpha_{p,j}\, z_p + (1 - \alpha_{p,j})\, z_{p_j},
        \qquad \alpha_{p,j} \sim \mathcal{U}(0, 1), \quad j = 1, \dots, k,

    each labelled rim+. The output has :math:`N + k n` rows: the input rows unchanged, then row
    :math:`N + k i + (j - 1)` is :math:`\bar z_{p,j}` for the :math:`i`-th rim+ row :math:`p`. Every
    synthetic row lies on the segment between a rim+ row and one of its ``k`` nearest rim+ neighbours.

    Neighbours are searched on detached float32 features (the choice is not differentiable), but the
    interpolation itself is, so gradients of a loss on synthetic rows reach both endpoints and, through
    them, the backbone. With fewer than ``k + 1`` rim+ rows no neighbour set exists and the batch is
    returned unchanged (the same tensor objects).

    Parameters
    ----------
    features : Tensor
        ``[N, d]`` feature rows.
    labels : Tensor
        ``[N]`` labels; rows with value > 0.5 (or ``True``) are rim+.
    n_neighbors : int, default=2
        ``k``, the neighbours (and synthetic rows) per rim+ row; the paper uses 2.
    alpha : Tensor, optional
        ``[n, k]`` weights to use instead of drawing them (replays a previous :class:`SmoteDraw`).
    generator : torch.Generator, optional
        Source of the uniform draws; ``None`` uses torch's default generator.
    anchors : Tensor, optional
        ``[n]`` ascending row indices of the rim+ rows, when the caller knows them already (the trainer
        reads them off the CPU copy of the labels): finding them on the GPU needs a device-to-host sync,
        which stalls the training step. Must equal ``nonzero(labels > 0.5)``.

    Returns
    -------
    SmoteDraw
        Augmented features and labels, plus the anchors, neighbours and weights used.

    Examples
    --------
    >>> import torch
    >>> z = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    >>> out = deep_smote_interpolate(z, torch.tensor([1, 1, 1, 0]), alpha=torch.full((3, 2), 0.5))
    >>> out.features.squeeze(1).tolist()
    [0.0, 1.0, 3.0, 10.0, 0.5, 1.5, 0.5, 2.0, 2.0, 1.5]
    >>> out.labels.tolist()
    [1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    """
    check_positive_int(n_neighbors, "n_neighbors")
    if features.ndim != 2:
        raise ValueError(f"features must be [N, d], not shape {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be [N] = [{features.shape[0]}], not shape {tuple(labels.shape)}")
    if anchors is None:
        is_pos = labels if labels.dtype == torch.bool else labels > 0.5
        anchors = torch.nonzero(is_pos, as_tuple=False).flatten()
    elif anchors.ndim != 1:
        raise ValueError(f"anchors must be [n] row indices, not shape {tuple(anchors.shape)}")
    n = anchors.numel()
    k = n_neighbors
    if n < k + 1:
        empty = anchors.new_empty((n, k))
        return SmoteDraw(features, labels, anchors, empty, features.new_empty((n, k)))

    z_pos = features.index_select(0, anchors)
    with torch.no_grad():
        z_det = z_pos.detach().float()
        dist = torch.cdist(z_det, z_det, compute_mode="donot_use_mm_for_euclid_dist")  # per pair, as stacked
        dist.fill_diagonal_(float("inf"))
        # Stable sort, so equal distances resolve to the lower row index, reproducibly.
        order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    neighbors = anchors[order]
    if alpha is None:
        device = generator.device if generator is not None else features.device
        alpha = torch.rand((n, k), generator=generator, device=device)
    if alpha.shape != (n, k):
        raise ValueError(f"alpha must be [n, k] = [{n}, {k}], not shape {tuple(alpha.shape)}")
    a = alpha.to(device=features.device, dtype=features.dtype).unsqueeze(-1)
    synthetic = a * z_pos.unsqueeze(1) + (1 - a) * z_pos[order]
    out_features = torch.cat([features, synthetic.reshape(n * k, -1)], dim=0)
    out_labels = torch.cat([labels, labels.new_ones(n * k)], dim=0)
    return SmoteDraw(out_features, out_labels, anchors, neighbors, alpha)


class DeepSMOTE(nn.Module):
    """DeepSMOTE layer: a two-layer feature transform, then rim+ interpolation in training.

    The transform, ``Linear(in -> out) -> BN -> Swish -> Linear(out -> out) -> BN -> Swish``, also
    performs the paper's fusion: on the concatenated image + radiomics vector its first layer is "the
    fully connected layer" that reduces 1024 to 512. Synthesis (:func:`deep_smote_interpolate`) runs
    only in training mode and only when labels are given; in eval mode the layer is exactly the
    transform.

    Parameters
    ----------
    in_features : int, default=1024
        Width of the fused feature vector (1024 for concatenation, 512 for addition).
    out_features : int, default=512
        Width of the transformed feature (input of the classifier).
    n_neighbors : int, default=2
        Nearest rim+ neighbours per rim+ sample, i.e. synthetic samples per rim+ sample.
    oversample : bool, default=True
        When False the layer is only the transform; used by ablation variants without DeepSMOTE so
        that they differ from QSMRim-Net in the synthesis alone.
    act : str, default="swish"
        Activation name.
    """

    def __init__(
        self,
        in_features: int = 1024,
        out_features: int = 512,
        *,
        n_neighbors: int = 2,
        oversample: bool = True,
        act: str = "swish",
    ):
        super().__init__()
        check_positive_int(n_neighbors, "n_neighbors")
        if not isinstance(oversample, bool):
            raise TypeError(f"oversample must be a bool, not {type(oversample).__name__}")
        self.transform = nn.Sequential(
            LinearBlock(in_features, out_features, act=act),
            LinearBlock(out_features, out_features, act=act),
        )
        self.n_neighbors = n_neighbors
        self.oversample = oversample

    def forward(
        self,
        features: Tensor,
        labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        anchors: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return ``(transformed [M, out], labels [M])``; ``M = N + k n`` when synthesising, else ``N``.
        ``anchors``: the rim+ rows if known (see :func:`deep_smote_interpolate`)."""
        z = self.transform(features)
        if not (self.training and self.oversample) or labels is None:
            return z, labels
        draw = deep_smote_interpolate(z, labels, n_neighbors=self.n_neighbors, generator=generator, anchors=anchors)
        return draw.features, draw.labels
