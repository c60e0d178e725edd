r"""Adam for the members of a :class:`~qsmrim.models.MemberStack`, each with its own step count.

Members of different folds have training sets of different sizes, so near the end of an epoch some members
have a batch left and others do not: a step must be able to move some members only. ``torch.optim.Adam``
keeps one step count per tensor and updates whole tensors; here the stacked tensors (backbones and heads) are split
into their ``G`` member blocks along dimension 0 (:class:`~qsmrim.models.MemberStack`), and member :math:`g` has
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
    """Adam over a MemberStack's stacked tensors (backbones and heads); ``step(active)`` moves those members.

    A step is a handful of multi-tensor (``torch._foreach_*``) calls over every active member's block of every
    stacked tensor (views, built once), with the per-member step size and bias correction as per-tensor
    scalars: the arithmetic of ``torch.optim.Adam(foreach=True)``. Per tensor it would be about seven kernel
    launches for each of a member's ~80 tensors, which is what bounds a small stacked step on a large GPU.

    Parameters
    ----------
    stack : MemberStack
        The stack whose parameters are optimised: every one holds its ``G`` members' blocks along dimension 0.
    lr, betas, eps, weight_decay
        As for ``torch.optim.Adam``; :attr:`lr` may be changed between steps (learning-rate schedule).
    """

    def __init__(self, stack: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):  # fmt: skip
        self.n_members = int(stack.n_members)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.params = [p for p in stack.parameters() if p.requires_grad]
        for p in self.params:
            if p.ndim == 0 or p.shape[0] % self.n_members:
                raise ValueError(f"a stacked parameter of shape {tuple(p.shape)} has no {self.n_members} member blocks")
        self.steps = [0] * self.n_members
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # Member g's block of every tensor (parameter, first and second moment): views, so in-place updates
        # of a block write the stacked tensor.
        self._p_blocks, self._m_blocks, self._v_blocks = (
            [self._blocks(t) for t in ts] for ts in (self.params, self.exp_avg, self.exp_avg_sq)
        )

    def _blocks(self, t: Tensor) -> tuple[Tensor, ...]:
        return t.unflatten(0, (self.n_members, -1)).unbind(0)

    def zero_grad(self) -> None:
        """Drop every gradient (``set_to_none``)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Sequence[int] | None = None) -> None:
        """One Adam step for the members in ``active`` (all when ``None``); the others stay as they are."""
        members = list(range(self.n_members)) if active is None else sorted(set(int(g) for g in active))
        b1, b2 = self.betas
        for g in members:
            self.steps[g] += 1
        size = {g: -self.lr / (1 - b1 ** self.steps[g]) for g in members}
        root = {g: math.sqrt(1 - b2 ** self.steps[g]) for g in members}
        params: list[Tensor] = []
        grads: list[Tensor] = []
        ms: list[Tensor] = []
        vs: list[Tensor] = []
        sizes: list[float] = []
        roots: list[float] = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad_blocks = self._blocks(p.grad)
            for g in members:
                params.append(self._p_blocks[i][g])
                grads.append(grad_blocks[g])
                ms.append(self._m_blocks[i][g])
                vs.append(self._v_blocks[i][g])
                sizes.append(size[g])
                roots.append(root[g])
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
        return {"steps": torch.tensor(self.steps, dtype=torch.int64), "lr": float(self.lr), "exp_avg": self.exp_avg,
                "exp_avg_sq": self.exp_avg_sq}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (moments are copied into the existing tensors)."""
        self.steps = [int(s) for s in state["steps"].tolist()]
        self.lr = float(state["lr"])
        with torch.no_grad():
            for dst, src in ((self.exp_avg, state["exp_avg"]), (self.exp_avg_sq, state["exp_avg_sq"])):
                for d, s in zip(dst, src, strict=True):
                    d.copy_(s)
