r"""Several networks of one architecture run as one: grouped convolutions side by side.

The paper's grid trains 15 members at batch 64. One such step is too small to fill a large GPU (it is
bound by kernel launches, ``bench/RESULTS.md``), so members that share a training set are stacked: ``G``
networks of the same architecture, each with its own weights, become one network whose convolutions have
``groups = G`` and whose batch norms are ``G`` times wider.

Let member :math:`g` have convolution weights :math:`W_g \in \mathbb{R}^{C_o \times C_i \times k^3}` and
input :math:`x_g \in \mathbb{R}^{N \times C_i \times D \times H \times W}`. The stacked input puts
:math:`x_g` in channels :math:`[g C_i, (g+1) C_i)` and the stacked weight is
:math:`[W_0; W_1; \dots; W_{G-1}] \in \mathbb{R}^{G C_o \times C_i \times k^3}`. A grouped convolution
never mixes groups, so output channels :math:`[g C_o, (g+1) C_o)` are exactly :math:`W_g * x_g`; batch norm,
ReLU, pooling and residual sums act per channel, so every layer keeps member :math:`g` in its own channel
block, and the pooled feature ``[N, G * F]`` holds member :math:`g`'s feature in columns
:math:`[g F, (g+1) F)`. Batch-norm statistics are per channel, hence per member, as when trained apart.

This holds for networks whose forward pass mixes channels only inside convolutions (e.g.
:class:`qsmrim.models.resnet3d.ResNet3D`); :func:`stack_networks` refuses modules with parameters other
than convolutions and batch norms.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from qsmrim.models.stack_layers import member_block, stacked_conv, stacked_norm

__all__ = ["member_block", "stack_networks", "unstack_network", "stacked_input"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def stack_networks(nets: Sequence[nn.Module]) -> nn.Module:
    """Return one module computing ``len(nets)`` networks of one architecture side by side (see module doc).

    The result has the structure and parameter names of ``nets[0]``, with every convolution grouped
    ``G`` times and every batch norm ``G`` times wider; the inputs are untouched. Feed it
    :func:`stacked_input` and read member ``g`` from column block ``g`` of the output.
    """
    if not nets:
        raise ValueError("stack_networks needs at least one network")
    shapes = {k: v.shape for k, v in nets[0].state_dict().items()}
    for other in nets[1:]:
        if type(other) is not type(nets[0]) or {k: v.shape for k, v in other.state_dict().items()} != shapes:
            raise ValueError("stack_networks needs networks of one architecture (same layers and shapes)")
    for name, mod in nets[0].named_modules():
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if own and not isinstance(mod, _CONVS + _NORMS):
            raise TypeError(f"cannot stack {name or 'the network'} ({type(mod).__name__}): only convolutions "
                            "and batch norms may hold parameters")  # fmt: skip
    stacked = copy.deepcopy(nets[0])
    members = [dict(n.named_modules()) for n in nets]
    for name, mod in list(stacked.named_modules()):
        if isinstance(mod, _CONVS + _NORMS):
            parts = [m[name] for m in members]
            new = stacked_conv(parts) if isinstance(mod, _CONVS) else stacked_norm(parts)  # type: ignore[arg-type]
            parent_name, _, leaf = name.rpartition(".")
            parent = stacked.get_submodule(parent_name) if parent_name else stacked
            setattr(parent, leaf, new)
    stacked.n_stacked = len(nets)  # type: ignore[assignment]
    return stacked


def unstack_network(stacked: nn.Module, index: int) -> dict[str, Tensor]:
    """State dict of member ``index`` of ``stacked``, in the layout of the networks that were stacked."""
    g = int(getattr(stacked, "n_stacked", 0))
    if not 0 <= index < g:
        raise IndexError(f"member index {index} out of range for a stack of {g}")
    return {k: member_block(v.detach(), g, index).clone() for k, v in stacked.state_dict().items()}


def stacked_input(xs: Sequence[Tensor] | Tensor) -> Tensor:
    """``G`` batches ``[N, C, ...]`` (a list or a ``[G, N, C, ...]`` tensor) -> one input ``[N, G * C, ...]``."""
    x = torch.stack(list(xs), 1) if not isinstance(xs, Tensor) else xs.transpose(0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


class MemberStack(nn.Module):
    """``G`` QSMRim-Net members of one configuration as one module: stacked backbones and stacked heads.

    The image backbones (nearly all of the compute) run once for all members through
    :func:`stack_networks`; the small heads (radiomics MLP, DeepSMOTE, classifier) run once for all members
    through :class:`~qsmrim.models.stacked_head.StackedHead` (:attr:`head`). Each member still sees its own
    batch: :meth:`image_block_features` takes one batch per member. :meth:`unstack` returns ordinary
    :class:`~qsmrim.models.qsmrimnet.QSMRimNet` members with the trained weights.

    Parameters
    ----------
    members : sequence of QSMRimNet
        Networks built with the same options (their weights may differ); they are copied, not modified.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        from qsmrim.models.qsmrimnet import QSMRimNet

        if not members:
            raise ValueError("MemberStack needs at least one member")
        if not all(isinstance(m, QSMRimNet) for m in members):
            raise TypeError("MemberStack stacks QSMRimNet-family members only")
        first = members[0]
        if any((m.image_fusion, m.fusion, m.uses_radiomics, len(m.backbones))
               != (first.image_fusion, first.fusion, first.uses_radiomics, len(first.backbones)) for m in members):  # fmt: skip
            raise ValueError("MemberStack needs members built with the same options")
        self.n_members = len(members)
        #: Memory format of the stacked backbone input (``torch.channels_last_3d`` with channels-last weights).
        self.memory_format = torch.contiguous_format
        self.image_fusion = first.image_fusion
        self.backbones = nn.ModuleList(
            [stack_networks([m.backbones[j] for m in members]) for j in range(len(first.backbones))]
        )
        from qsmrim.models.stacked_head import StackedHead

        self.head = StackedHead(members)
        # Unregistered templates (a plain list), used only to rebuild members' backbones in unstack().
        self._templates = [copy.deepcopy(b).cpu() for b in first.backbones]

    def image_block_features(self, patches: Sequence[Tensor] | Tensor, runners: Sequence[Callable] | None = None) -> Tensor:
        """One patch batch ``[N, C, D, H, W]`` per member (a list, or a ``[G, N, C, D, H, W]`` tensor) -> the
        members' image features side by side, ``[N, G * F]`` (the layout :attr:`head` takes). ``runners``
        replace the calls of :attr:`backbones` (e.g. CUDA-graphed ones)."""
        if len(patches) != self.n_members:
            raise ValueError(f"expected {self.n_members} batches, one per member, not {len(patches)}")
        fmt = self.memory_format
        nets = list(runners) if runners is not None else list(self.backbones)
        if self.image_fusion == "channel":
            return nets[0](stacked_input(patches).contiguous(memory_format=fmt))
        feats = [net(stacked_input([p[:, c : c + 1] for p in patches]).contiguous(memory_format=fmt))
                 for c, net in enumerate(nets)]  # fmt: skip
        n = feats[0].shape[0]  # member g's feature is its block of every stream, concatenated
        return torch.cat([f.view(n, self.n_members, -1) for f in feats], 2).view(n, -1)

    def image_features(self, patches: Sequence[Tensor] | Tensor, runners: Sequence[Callable] | None = None) -> list[Tensor]:
        """As :meth:`image_block_features`, as one ``[N, F]`` feature per member."""
        feats = self.image_block_features(patches, runners)
        per = feats.view(feats.shape[0], self.n_members, -1)
        return [per[:, g] for g in range(self.n_members)]

    def member_image_features(self, index: int, patch: Tensor) -> Tensor:
        """Image feature of member ``index`` alone, through views of its block of the stacked weights.

        For a batch only one member has (the last, short batch of a member whose training set differs in
        size): gradients reach that member's block of the stacked parameters and batch-norm statistics are
        updated in place in its block, as if the member were a network of its own.
        """
        from torch.func import functional_call

        g = self.n_members
        inputs = [patch] if self.image_fusion == "channel" else [patch[:, c : c + 1] for c in range(len(self.backbones))]
        feats = []
        for stacked, template, x in zip(self.backbones, self._templates, inputs, strict=True):
            tensors = {name: member_block(t, g, index) for name, t in [*stacked.named_parameters(), *stacked.named_buffers()]}
            template.train(self.training)
            feats.append(functional_call(template, tensors, (x.contiguous(memory_format=self.memory_format),)))
        return torch.cat(feats, 1) if len(feats) > 1 else feats[0]

    def member_tensors(self, index: int) -> dict[str, Tensor]:
        """Member ``index``'s parameters and buffers named as in one QSMRim-Net: views of its blocks of the
        stacked tensors (batch-norm step counters, shared by the stack, are copies)."""
        g = self.n_members
        if not 0 <= index < g:
            raise IndexError(f"member index {index} out of range for a stack of {g}")
        out = {}
        for j, stacked in enumerate(self.backbones):
            for name, t in [*stacked.named_parameters(), *stacked.named_buffers()]:
                out[f"backbones.{j}.{name}"] = member_block(t, g, index)
        return {**out, **self.head.member_tensors(index)}

    def unstack(self) -> list[nn.Module]:
        """The members as separate QSMRim-Net modules (copies, on the stack's device, in the stack's mode)."""
        device = next(self.parameters()).device
        out = []
        for g in range(self.n_members):
            member = self.head.new_member_head(g)
            backbones = []
            for j, stacked in enumerate(self.backbones):
                b = copy.deepcopy(self._templates[j])
                b.load_state_dict(unstack_network(stacked, g))
                backbones.append(b)
            member.backbones = nn.ModuleList(backbones)
            out.append(member.to(device).train(self.training))
        return out
