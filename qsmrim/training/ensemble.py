"""The fold ensemble: the seeds of a fold vote (paper 2.3).

``prob`` is the mean of the members' probabilities; each member votes rim+ at or above its own threshold;
a lesion is rim+ when more than half of the members vote for it (2 of 3).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qsmrim.training.member import Member

__all__ = ["fold_ensemble_predictions"]


def fold_ensemble_predictions(members: list[Member], protocol: str) -> pd.DataFrame:
    """Out-of-fold ensemble rows ``subject, lesion, fold, rim, prob, spread, votes, n_members, rim_pred``.

    ``protocol`` picks each member's threshold: ``"paper"`` (F1-optimal on its test fold) or ``"honest"``
    (chosen on an inner split of its training fold). Members must carry their test-fold predictions.
    """
    frames = []
    for m in members:
        if m.predictions is None:
            raise ValueError(f"{m.name} has no test-fold predictions")
        if protocol not in m.thresholds:
            raise ValueError(f"{m.name} has no {protocol!r} threshold (has {sorted(m.thresholds)})")
        p = m.predictions[["subject", "lesion", "fold", "rim", "prob"]].copy()
        p["vote"] = (p["prob"] >= m.thresholds[protocol]).astype(np.int64)
        frames.append(p)
    if not frames:
        raise ValueError("no members to ensemble")
    allp = pd.concat(frames, ignore_index=True)
    g = allp.groupby(["fold", "subject", "lesion"], sort=True)
    out = g.agg(rim=("rim", "first"), prob=("prob", "mean"), spread=("prob", lambda s: float(np.std(s))),
                votes=("vote", "sum"), n_members=("prob", "size")).reset_index()  # fmt: skip
    out["rim_pred"] = (out["votes"] * 2 > out["n_members"]).astype(np.int64)
    return out[["subject", "lesion", "fold", "rim", "prob", "spread", "votes", "n_members", "rim_pred"]]
