r"""Adam for the members of a :class:`~qsmrim.models.MemberStack`, each with its own step count.

Members of different folds have training sets of different sizes, so near the end of an epoch some members
have a batch left and others do not: a step must be able to move some members only. ``torch.optim.Adam``
keeps one step count per tensor and updates whole tensors; here the stacked backbone tensors are split
into their ``G`` member blocks along dimension 0 (:mod:`qsmrim.models.stacked`), and member :math:`g` has
its own count :math:`t_g`. For the members that step, with gradient :math:`g` (plus :math:`\lambda\theta`
with weight decay :math:`\lambda`), this is ``torch.optim.Adam``'s arithmetic:

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
    \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^{t_g}} \,
    \frac{m}{\sqrt{v} / \sqrt{1-\beta_2^{t_g}} + \epsilon}.

The members that do not step keep their weights and moments exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["StackAdam"]


class StackAdam:
    """Adam over a MemberStack's stacked backbones and per-member heads; ``step(active)`` moves those members.

    A step is a handful of multi-tensor (``torch._foreach_*``) calls over every active member's tensors: the
    heads' parameters and each stacked tensor's member blocks (views, built once), with the per-member step
    size and bias correction as per-tensor scalars, the arithmetic of ``torch.optim.Adam(foreach=True)``. Per
    tensor it would be about seven kernel launches for each of a member's ~80 tensors, which is what bounds a
    small stacked step on a large GPU.

    Parameters
    ----------
    stack : MemberStack
        The stack whose parameters are optimised.
    lr, betas, eps, weight_decay
        As for ``torch.optim.Adam``; :attr:`lr` may be changed between steps (learning-rate schedule).
    """

    def __init__(self, stack: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):  # fmt: skip
        self.n_members = int(stack.n_members)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.stacked = [p for p in stack.backbones.parameters() if p.requires_grad]
        self.heads = [[p for p in h.parameters() if p.requires_grad] for h in stack.heads]
        self.steps = [0] * self.n_members
        self.m_stacked = [torch.zeros_like(p) for p in self.stacked]
        self.v_stacked = [torch.zeros_like(p) for p in self.stacked]
        self.m_heads = [[torch.zeros_like(p) for p in ps] for ps in self.heads]
        self.v_heads = [[torch.zeros_like(p) for p in ps] for ps in self.heads]
        # Member g's block of every stacked tensor (parameter, first and second moment): views, so in-place
        # updates of a block write the stacked tensor.
        self._p_blocks, self._m_blocks, self._v_blocks = (
            [self._blocks(t) for t in ts] for ts in (self.stacked, self.m_stacked, self.v_stacked)
        )

    def _blocks(self, t: Tensor) -> tuple[Tensor, ...]:
        return t.unflatten(0, (self.n_members, -1)).unbind(0)

    def zero_grad(self) -> None:
        """Drop every gradient (``set_to_none``)."""
        for p in self.stacked + [p for ps in self.heads for p in ps]:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Sequence[int] | None = None) -> None:
        """One Adam step for the members in ``active`` (all when ``None``); the others stay as they are."""
        members = list(range(self.n_members)) if active is None else sorted(set(int(g) for g in active))
        b1, b2 = self.betas
        for g in members:
            self.steps[g] += 1
        params: list[Tensor] = []
        grads: list[Tensor] = []
        ms: list[Tensor] = []
        vs: list[Tensor] = []
        sizes: list[float] = []
        roots: list[float] = []

        def add(g: int, p: Tensor, grad: Tensor, m: Tensor, v: Tensor) -> None:
            params.append(p)
            grads.append(grad)
            ms.append(m)
            vs.append(v)
            sizes.append(-self.lr / (1 - b1 ** self.steps[g]))
            roots.append(math.sqrt(1 - b2 ** self.steps[g]))

        for g in members:
            for p, m, v in zip(self.heads[g], self.m_heads[g], self.v_heads[g], strict=True):
                if p.grad is not None:
                    add(g, p, p.grad, m, v)
        for i, p in enumerate(self.stacked):
            if p.grad is None:
                continue
            grad_blocks = self._blocks(p.grad)
            for g in members:
                add(g, self._p_blocks[i][g], grad_blocks[g], self._m_blocks[i][g], self._v_blocks[i][g])
        if not params:
            return
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, roots)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, ms, denom, sizes)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers only (a checkpoint loads with ``weights_only=True``)."""
        return {"steps": torch.tensor(self.steps, dtype=torch.int64), "lr": float(self.lr),
                "m_stacked": self.m_stacked, "v_stacked": self.v_stacked, "m_heads": self.m_heads,
                "v_heads": self.v_heads}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (moments are copied into the existing tensors)."""
        self.steps = [int(s) for s in state["steps"].tolist()]
        self.lr = float(state["lr"])
        with torch.no_grad():
            for dst, src in ((self.m_stacked, state["m_stacked"]), (self.v_stacked, state["v_stacked"])):
                for d, s in zip(dst, src, strict=True):
                    d.copy_(s)
            for dst, src in ((self.m_heads, state["m_heads"]), (self.v_heads, state["v_heads"])):
                for dm, sm in zip(dst, src, strict=True):
                    for d, s in zip(dm, sm, strict=True):
                        d.copy_(s)
