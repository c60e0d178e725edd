"""A fitted member's rim+ probabilities on raw inputs (patches and unstandardised radiomics).

Its own module, below both :mod:`qsmrim.training.member` (whose ``Member.predict_proba`` calls it) and
:mod:`qsmrim.training.fit` (which scores the test fold with it), so neither imports the other back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from qsmrim.models import is_torch_model

if TYPE_CHECKING:
    from qsmrim.training.member import Member

__all__ = ["predict_member"]


def predict_member(member: Member, patch: np.ndarray | None, radiomics: np.ndarray | None, *,
                   device: str | torch.device = "cpu", batch_size: int = 256) -> np.ndarray:  # fmt: skip
    """Rim+ probabilities ``float64 [N]`` of a member on raw inputs."""
    n = len(patch) if patch is not None else len(radiomics)  # type: ignore[arg-type]
    rad = member.standardisation.transform(np.asarray(radiomics)) if member.standardisation is not None else None
    if not is_torch_model(member.model_name):
        return member.model.predict_proba(rad)[:, 1].astype(np.float64)
    model = member.model.to(device).eval()
    out = np.empty(n, np.float64)
    dummy_r = torch.zeros(0)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            p = torch.as_tensor(np.array(patch[i : i + batch_size], dtype=np.float32), device=device) if patch is not None else None
            r = torch.as_tensor(rad[i : i + batch_size], device=device) if rad is not None else None
            m = len(p) if p is not None else len(r)  # type: ignore[arg-type]
            if p is None:
                p = torch.zeros((m, 2, 16, 32, 32), device=device)
            if r is None:
                r = dummy_r.new_zeros((m, len(member.feature_names) or 527)).to(device)
            out[i : i + m] = torch.sigmoid(model(p, r).float()).cpu().numpy()
    return out
