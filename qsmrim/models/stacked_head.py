r"""The heads of ``G`` QSMRim-Net members (radiomics MLP, DeepSMOTE layer, classifier) run as one.

A stacked step (:mod:`qsmrim.models.stacked`) runs the members' backbones as one network whose output holds
the members side by side, ``[N, G * F]`` with member :math:`g` in columns :math:`[gF, (g+1)F)`. This module
keeps that layout through the heads, so each head layer runs once for all members instead of once per
member (one kernel launch each: about 60 per member and step, which is what bounds a large stack's step):

* a linear layer holds the members' weights as :math:`W \in \mathbb{R}^{G \times out \times in}` and
  biases :math:`b \in \mathbb{R}^{G \times out}`; one batched matmul gives block :math:`g` of the output
  as :math:`x_g W_g^\top + b_g`;
* a batch norm is ``G * C`` wide, so its statistics are per channel, hence per member;
* dropout multiplies by a mask given with the batch (:meth:`StackedHead.draw`): each member draws its own
  mask from its own generator state, of the shape it has when trained alone, so its draws are its own;
* DeepSMOTE (:func:`~qsmrim.models.deepsmote.deep_smote_interpolate`) interpolates each member's rim+ rows.
  Their counts :math:`n_g` differ, so the rows are padded to :math:`n_{max}`; the output has
  :math:`N + k n_{max}` rows and member :math:`g`'s rows from :math:`N + k n_g` on carry zero loss weight
  (:attr:`HeadDraw.weights`). The classifier acts on rows one by one, so padding never reaches a real row.

Parameters and buffers are named as in one member's head, with the member index as a leading block:
:meth:`StackedHead.member_tensors` gives member :math:`g`'s views, and :meth:`StackedHead.member_head_train`
runs one member alone through them (its short last batch).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qsmrim.models.stack_layers import member_block, stacked_norm

__all__ = ["HeadDraw", "StackedDropout", "StackedHead", "StackedLinear"]

_NORMS = (nn.BatchNorm1d,)
# Where each part of the stacked head lives in one member (QSMRimNet).
_PARTS = (("radiomics_mlp", "radiomics_mlp.net"), ("transform", "smote.transform"), ("classifier", "classifier.net"))


class StackedLinear(nn.Module):
    """``G`` linear layers of one shape on a ``[N, G * in]`` input -> ``[N, G * out]`` (one batched matmul)."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]).clone())
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears]).clone()) if linears[0].bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        g, out_f, in_f = self.weight.shape
        xg = x.reshape(x.shape[0], g, in_f).transpose(0, 1)  # [G, N, in], a view
        w = self.weight.transpose(1, 2)
        y = torch.baddbmm(self.bias.unsqueeze(1), xg, w) if self.bias is not None else torch.bmm(xg, w)
        return y.transpose(0, 1).reshape(x.shape[0], g * out_f)


class StackedDropout(nn.Module):
    """Dropout by a given mask (values 0 or ``1 / (1 - p)``): the members draw their masks themselves."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.mask is None or self.mask.shape != x.shape:
            raise RuntimeError("StackedDropout needs the batch's mask (StackedHead.forward_train sets it)")
        return x * self.mask


def _stack_layers(seqs: Sequence[nn.Module]) -> nn.Module:
    out = copy.deepcopy(seqs[0])
    members = [dict(s.named_modules()) for s in seqs]
    for name, mod in list(out.named_modules()):
        parts = [m[name] for m in members]
        if isinstance(mod, nn.Linear):
            new: nn.Module = StackedLinear(parts)  # type: ignore[arg-type]
        elif isinstance(mod, _NORMS):
            new = stacked_norm(parts)  # type: ignore[arg-type]
        elif isinstance(mod, nn.Dropout):
            new = StackedDropout(mod.p)
        elif list(mod.parameters(recurse=False)) or list(mod.buffers(recurse=False)):
            raise TypeError(f"cannot stack head layer {name} ({type(mod).__name__})")
        else:
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, leaf, new)
    return out


@dataclass(frozen=True)
class HeadDraw:
    """One stacked batch's random draws and row bookkeeping (:meth:`StackedHead.draw`).

    Attributes
    ----------
    masks : dict[str, Tensor]
        Dropout mask of each :class:`StackedDropout` (by module name), ``[rows, G * C]``.
    anchors : Tensor or None
        ``[G, n_max + 1]``: each member's rim+ rows, padded, then its count :math:`n_g` (0 where it does not
        synthesise); None when no member synthesises.
    alpha : Tensor or None
        ``[G, n_max, k]`` interpolation weights, padded.
    weights : Tensor
        ``[N + k n_max, G]`` loss weight of each output row: ``1 / M_g`` on member ``g``'s ``M_g`` real and
        synthetic rows (its batch loss is then the weighted sum), 0 on padding and on members that sit out.
    """

    masks: dict[str, Tensor]
    anchors: Tensor | None
    alpha: Tensor | None
    weights: Tensor

    @property
    def n_max(self) -> int:
        return 0 if self.anchors is None else self.anchors.shape[1] - 1


class _HeadTrain(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, *args, **kwargs):
        return self.head.head_train(*args, **kwargs)


class StackedHead(nn.Module):
    """The heads of ``G`` QSMRim-Net members as one module over the stacked layout (see the module doc).

    Parameters
    ----------
    members : sequence of QSMRimNet
        Members built with the same options; their head weights are copied, the members are not modified.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        first = members[0]
        self.n_members = len(members)
        self.uses_radiomics = bool(first.uses_radiomics)
        self.fusion = first.fusion
        self.n_neighbors = int(first.smote.n_neighbors)
        self.oversample = bool(first.smote.oversample)
        self.radiomics_mlp = _stack_layers([m.radiomics_mlp.net for m in members]) if self.uses_radiomics else None
        self.transform = _stack_layers([m.smote.transform for m in members])
        self.classifier = _stack_layers([m.classifier.net for m in members])
        template = copy.deepcopy(first).cpu()
        template.backbones = nn.ModuleList()
        self._template = [template]  # a plain list: not a submodule, its tensors are not the stack's
        self._member_names = {name: self._member_name(name) for name, _ in self._tensors()}
        shapes = dict(template.state_dict())
        self._member_shapes = {name: shapes[m].shape for name, m in self._member_names.items()}
        self._constants: dict[tuple, Tensor] = {}
        # Every dropout with p > 0, in the order of the forward: its name, module, whether it acts after the
        # interpolation (on M_g rows, else N) and its width per member (the out-features of the linear before it).
        self._dropout_specs: list[tuple[str, StackedDropout, bool, int]] = []
        for part, after in (("radiomics_mlp", False), ("transform", False), ("classifier", True)):
            width = 0
            for name, mod in (getattr(self, part) or nn.Sequential()).named_modules():
                if isinstance(mod, StackedLinear):
                    width = mod.weight.shape[1]
                elif isinstance(mod, StackedDropout) and mod.p > 0:
                    self._dropout_specs.append((f"{part}.{name}", mod, after, width))

    # -- member views ---------------------------------------------------------------------------------
    @staticmethod
    def _member_name(name: str) -> str:
        for stacked, member in _PARTS:
            if name.startswith(stacked + "."):
                return member + name[len(stacked) :]
        raise KeyError(name)

    def _tensors(self) -> list[tuple[str, Tensor]]:
        return [*self.named_parameters(), *self.named_buffers()]

    def member_tensors(self, index: int) -> dict[str, Tensor]:
        """Member ``index``'s head parameters and buffers, named as in one member: views of its blocks (the
        batch-norm step counters, shared, are copies)."""
        g = self.n_members
        if not 0 <= index < g:
            raise IndexError(f"member index {index} out of range for a stack of {g}")
        return {self._member_names[name]: member_block(t, g, index).view(self._member_shapes[name])
                for name, t in self._tensors()}  # fmt: skip

    def member_head_train(self, index: int, image: Tensor, radiomics: Tensor, labels: Tensor, *,
                          generator: torch.Generator | None = None, anchors: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """One member's :meth:`QSMRimNet.head_train` through views of its block (gradients and batch-norm
        statistics land in the block), for a batch only that member has."""
        from torch.func import functional_call

        template = self._template[0].train(self.training)
        tensors = {"head." + k: v for k, v in self.member_tensors(index).items()}
        return functional_call(_HeadTrain(template), tensors, (image, radiomics, labels),
                               {"generator": generator, "anchors": anchors})  # fmt: skip

    def new_member_head(self, index: int) -> nn.Module:
        """A QSMRim-Net holding member ``index``'s head weights, without backbones (CPU copies)."""
        head = copy.deepcopy(self._template[0])
        head.load_state_dict({k: v.detach().cpu().clone() for k, v in self.member_tensors(index).items()})
        return head

    # -- stacked training -----------------------------------------------------------------------------
    def _constant(self, value: float, rows: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[rows, width]`` of ``value``, a slice of a cached tensor (no fill kernel per step)."""
        key = (value, width, str(device), dtype)
        cached = self._constants.get(key)
        if cached is None or cached.shape[0] < rows:
            cached = torch.full((max(rows, 2 * (cached.shape[0] if cached is not None else 0)), width), value,
                                device=device, dtype=dtype)  # fmt: skip
            self._constants[key] = cached
        return cached[:rows]

    def draw(self, n: int, anchors: Sequence[np.ndarray | Tensor | None], generators: Sequence[torch.Generator | None],
             member_rng: Callable[[int], AbstractContextManager], device: torch.device,
             dtype: torch.dtype = torch.float32) -> HeadDraw:  # fmt: skip
        """Draw one stacked batch of ``n`` rows per member: each member's dropout masks (inside
        ``member_rng(g)``, its own global-generator state) and DeepSMOTE weights (from ``generators[g]``),
        in the order and shapes of :meth:`QSMRimNet.head_train` on that member alone.

        ``anchors[g]`` holds member ``g``'s rim+ rows of the batch (ascending, host array), or None for a
        member that sits the step out: it draws nothing and all its rows weigh 0. ``dtype``: the activations'
        dtype (bf16 under autocast), in which dropout draws its masks. Per member this launches its draws
        only (one kernel each); the padding into the stacked layout is a few launches for all members.
        """
        g_count, k = self.n_members, self.n_neighbors
        anchors = [np.asarray(a, dtype=np.int64) if a is not None else None for a in anchors]
        synth = [0] * g_count
        if self.oversample:
            synth = [a.size if a is not None and a.size >= k + 1 else 0 for a in anchors]
        n_max = max(synth)
        rows = [n + k * s for s in synth]
        m = n + k * n_max
        masks: dict[str, list[Tensor]] = {name: [] for name, *_ in self._dropout_specs}
        alphas: list[Tensor] = []
        for g in range(g_count):
            if anchors[g] is None:
                continue
            with member_rng(g):
                for name, mod, after, width in self._dropout_specs:
                    ones = self._constant(1.0, rows[g] if after else n, width, device, dtype)
                    masks[name].append(F.dropout(ones, mod.p, True))
            if synth[g]:
                gen = generators[g]
                alphas.append(torch.rand((synth[g], k), generator=gen, device=gen.device if gen is not None else device))
        # Host-side bookkeeping (numpy: no dispatcher on the host's critical path), sent in one copy: each
        # member's rim+ rows and count, and where its mask rows and DeepSMOTE draws go in the padded layout.
        active = [g for g in range(g_count) if anchors[g] is not None]
        table = np.zeros((g_count, n_max + 1), dtype=np.int64)
        weights = np.zeros((m, g_count), dtype=np.float32)
        after_rows, alpha_rows = [], []
        for g in active:
            after_rows.append(np.arange(rows[g]) * g_count + g)
            weights[:n, g] = weights[n : n + k * synth[g], g] = 1.0 / rows[g]
            if synth[g]:
                table[g, : synth[g]] = anchors[g]  # type: ignore[index]
                table[g, n_max] = synth[g]
                alpha_rows.append(np.arange(synth[g]) + g * n_max)
        index = [table.ravel(), *after_rows, *alpha_rows]
        host_index = torch.from_numpy(np.concatenate(index) if len(index) > 1 else index[0])
        host_weights = torch.from_numpy(weights)
        if device.type == "cuda":
            host_index, host_weights = host_index.pin_memory(), host_weights.pin_memory()
        dev = host_index.to(device, non_blocking=True)
        weights_dev = host_weights.to(device, non_blocking=True)
        n_after = sum(len(r) for r in after_rows)
        table_dev, after_dev, alpha_dev = dev.split([table.size, n_after, dev.numel() - table.size - n_after])
        stacked_masks = {}
        for name, _, after, width in self._dropout_specs:
            if not after:  # every member has n rows here: side by side, zeros for those that sit out
                it = iter(masks[name])
                parts = [next(it) if anchors[g] is not None else self._constant(0.0, n, width, device, dtype) for g in range(g_count)]
                stacked_masks[name] = torch.cat(parts, 1)
            else:  # member g's M_g rows, zero-padded to M
                full = torch.zeros(m * g_count, width, device=device, dtype=dtype)
                if masks[name]:
                    full.index_copy_(0, after_dev, torch.cat(masks[name], 0))
                stacked_masks[name] = full.view(m, g_count * width)
        alpha = None
        if n_max:
            alpha = torch.zeros(g_count * n_max, k, device=device).index_copy_(0, alpha_dev, torch.cat(alphas).to(device))
            alpha = alpha.view(g_count, n_max, k)
        return HeadDraw(stacked_masks, table_dev.view(g_count, n_max + 1) if n_max else None, alpha, weights_dev)

    def forward_train(self, image: Tensor, radiomics: Tensor | None, labels: Tensor, draw: HeadDraw) -> tuple[Tensor, Tensor]:
        """``image [N, G * F]``, ``radiomics [N, G * R]`` (None without the radiomics branch), ``labels [N, G]``
        -> ``(logits [M, G], labels [M, G])``, ``M = N + k n_max``; weigh the rows with ``draw.weights``."""
        n, g_count = image.shape[0], self.n_members
        dropouts = [(mod, draw.masks[name]) for name, mod, *_ in self._dropout_specs]
        try:
            for mod, mask in dropouts:
                mod.mask = mask
            if self.radiomics_mlp is not None:
                rad = self.radiomics_mlp(radiomics)
                if self.fusion == "concat":  # member g's fused vector is [image_g, rad_g]
                    fused = torch.cat([image.view(n, g_count, -1), rad.view(n, g_count, -1)], 2).view(n, -1)
                else:
                    fused = image + rad
            else:
                fused = image
            z = self.transform(fused)
            if draw.anchors is not None:
                z = torch.cat([z, self._synthetic_rows(z, draw)], 0)
                labels = torch.cat([labels, labels.new_ones(self.n_neighbors * draw.n_max, g_count)], 0)
            logits = self.classifier(z)
        finally:
            for mod, _ in dropouts:
                mod.mask = None
        return logits, labels

    def _synthetic_rows(self, z: Tensor, draw: HeadDraw) -> Tensor:
        """:func:`deep_smote_interpolate`'s synthetic rows of every member, ``[k n_max, G * d]`` (padded)."""
        assert draw.anchors is not None and draw.alpha is not None
        g_count, k, n_max = self.n_members, self.n_neighbors, draw.n_max
        z3 = z.view(z.shape[0], g_count, -1)
        members = torch.arange(g_count, device=z.device).unsqueeze(1)
        z_pos = z3[draw.anchors[:, :n_max], members]  # [G, n_max, d]
        with torch.no_grad():
            z_det = z_pos.detach().float()
            dist = torch.cdist(z_det, z_det, compute_mode="donot_use_mm_for_euclid_dist")
            padding = torch.arange(n_max, device=z.device).unsqueeze(0) >= draw.anchors[:, n_max:]  # [G, n_max]
            dist.masked_fill_(padding.unsqueeze(1), float("inf"))
            dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
            order = torch.sort(dist, dim=2, stable=True).indices[..., :k]  # [G, n_max, k]
        neighbours = z_pos[members.unsqueeze(2), order]  # [G, n_max, k, d]
        a = draw.alpha.to(z.dtype).unsqueeze(-1)
        synthetic = a * z_pos.unsqueeze(2) + (1 - a) * neighbours
        return synthetic.permute(1, 2, 0, 3).reshape(n_max * k, -1)
