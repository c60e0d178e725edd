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
        size = {g: self.lr / (1 - b1 ** self.steps[g]) for g in members}
        root = {g: math.sqrt(1 - b2 ** self.steps[g]) for g in members}
        for g in members:
            self._step_tensors(self.heads[g], self.m_heads[g], self.v_heads[g], size[g], root[g])
        if len(members) == self.n_members:
            self._step_stacked_all(size, root)
        else:
            for p, m, v in zip(self.stacked, self.m_stacked, self.v_stacked, strict=True):
                if p.grad is None:
                    continue
                blocks = [t.unflatten(0, (self.n_members, -1)) for t in (p, p.grad, m, v)]
                for g in members:
                    self._step_tensors([blocks[0][g]], [blocks[2][g]], [blocks[3][g]], size[g], root[g],
                                       grads=[blocks[1][g]])  # fmt: skip

    def _grads(self, params: list[Tensor], grads: list[Tensor] | None) -> list[Tensor]:
        grads = grads if grads is not None else [p.grad for p in params]  # type: ignore[misc]
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        return grads

    def _step_tensors(self, params: list[Tensor], ms: list[Tensor], vs: list[Tensor], size: float, root: float,
                      grads: list[Tensor] | None = None) -> None:  # fmt: skip
        keep = [i for i, p in enumerate(params) if grads is not None or p.grad is not None]
        if not keep:
            return
        params, ms, vs = [params[i] for i in keep], [ms[i] for i in keep], [vs[i] for i in keep]
        gs = self._grads(params, [grads[i] for i in keep] if grads is not None else None)
        b1, b2 = self.betas
        for p, g, m, v in zip(params, gs, ms, vs, strict=True):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / root).add_(self.eps), value=-size)

    def _step_stacked_all(self, size: dict[int, float], root: dict[int, float]) -> None:
        live = [i for i, p in enumerate(self.stacked) if p.grad is not None]
        if not live:
            return
        ps = [self.stacked[i] for i in live]
        ms, vs = [self.m_stacked[i] for i in live], [self.v_stacked[i] for i in live]
        gs = self._grads(ps, None)
        b1, b2 = self.betas
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        g_count = self.n_members
        sizes = torch.tensor([size[g] for g in range(g_count)], dtype=ps[0].dtype, device=ps[0].device)
        roots = torch.tensor([root[g] for g in range(g_count)], dtype=ps[0].dtype, device=ps[0].device)
        for p, m, v in zip(ps, ms, vs, strict=True):
            shape = (g_count,) + (1,) * p.dim()
            blocks_p, blocks_m, blocks_v = (t.unflatten(0, (g_count, -1)) for t in (p, m, v))
            denom = (blocks_v.sqrt() / roots.view(shape)).add_(self.eps)
            blocks_p.addcdiv_(blocks_m * sizes.view(shape), denom, value=-1.0)

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
