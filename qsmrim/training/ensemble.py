"""The fold ensemble: the seeds of a fold vote (paper 2.3).

``prob`` is the mean of the members' probabilities; each member votes rim+ at or above its own threshold;
a lesion is rim+ when more than half of the members vote for it (2 of 3). ``spread`` is the population
standard deviation of the members' probabilities (DESIGN section 5).

:func:`fold_ensemble_predictions` gives the labelled rows the evaluation needs; :func:`oof_table` gives the
per-lesion out-of-fold table ``qsmrim evaluate`` writes as ``oof.parquet``, each member's probability in
its own column.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qsmrim.training.member import Member

__all__ = ["fold_ensemble_predictions", "oof_table"]

_KEY = ["fold", "subject", "lesion"]


def fold_ensemble_predictions(members: list[Member], protocol: str) -> pd.DataFrame:
    """Out-of-fold ensemble rows ``subject, lesion, fold, rim, prob, spread, votes, n_members, rim_pred``.

    ``protocol`` picks each member's threshold: ``"paper"`` (F1-optimal on its test fold) or ``"honest"``
    (chosen on an inner split of its training fold). Members must carry their test-fold predictions.
    """
    allp = _member_rows(members, (protocol,))
    g = allp.groupby(_KEY, sort=True)
    out = g.agg(rim=("rim", "first"), prob=("prob", "mean"), spread=("prob", lambda s: float(np.std(s))),
                votes=(f"vote_{protocol}", "sum"), n_members=("prob", "size")).reset_index()  # fmt: skip
    out["rim_pred"] = (out["votes"] * 2 > out["n_members"]).astype(np.int64)
    return out[["subject", "lesion", "fold", "rim", "prob", "spread", "votes", "n_members", "rim_pred"]]


def oof_table(members: list[Member]) -> pd.DataFrame:
    """One model's per-lesion out-of-fold table: every test lesion once, each member's probability beside it.

    Parameters
    ----------
    members : list of Member
        The members of one model (any folds and seeds), with their test-fold predictions and a ``"paper"``
        threshold each.

    Returns
    -------
    DataFrame
        Sorted by ``fold, subject, lesion``; columns

        - ``subject``, ``lesion`` (lesion index within the subject), ``fold`` (the fold whose test set
          held the lesion), ``rim`` (expert label 1/0, nullable ``Int64``: missing for ``n/a``);
        - ``prob_seed<s>`` per seed, sorted by seed: that seed's member of the lesion's fold (each lesion is
          out-of-fold for exactly one fold); missing where that fold has no such seed;
        - ``prob`` (member mean), ``spread`` (population std of the member probabilities), ``n_members``;
        - ``votes`` (members at or above their own paper threshold) and ``rim_pred`` (1 when
          ``2 * votes > n_members``), and ``votes_honest`` / ``rim_pred_honest`` the same with the honest
          thresholds when every member has one.

    Raises
    ------
    ValueError
        If ``members`` is empty, mixes models, repeats a (fold, seed), or a member lacks predictions or a
        paper threshold.
    """
    if not members:
        raise ValueError("no members to tabulate")
    models = sorted({m.model_name for m in members})
    if len(models) > 1:
        raise ValueError(f"oof_table takes the members of one model, got {models}")
    seen: set[tuple[int, int]] = set()
    for m in members:
        if (m.fold, m.seed) in seen:
            raise ValueError(f"{m.name} appears twice; each (fold, seed) member once")
        seen.add((m.fold, m.seed))
    protocols = ("paper", "honest") if all("honest" in m.thresholds for m in members) else ("paper",)
    allp = _member_rows(members, protocols)
    g = allp.groupby(_KEY, sort=True)
    out = g.agg(rim=("rim", "first"), prob=("prob", "mean"), spread=("prob", lambda s: float(np.std(s))),
                n_members=("prob", "size"), **{f"votes{_sfx(p)}": (f"vote_{p}", "sum") for p in protocols}
                ).reset_index()  # fmt: skip
    wide = allp.pivot(index=_KEY, columns="seed", values="prob")
    wide = wide[sorted(wide.columns)]
    wide.columns = [f"prob_seed{int(s)}" for s in wide.columns]
    out = out.join(wide, on=_KEY)
    rim = pd.to_numeric(out["rim"], errors="coerce")
    out["rim"] = rim.where(rim >= 0).astype("Int64")
    cols = ["subject", "lesion", "fold", "rim", *wide.columns, "prob", "spread", "n_members"]
    for p in protocols:
        out[f"rim_pred{_sfx(p)}"] = (out[f"votes{_sfx(p)}"] * 2 > out["n_members"]).astype(np.int64)
        cols += [f"votes{_sfx(p)}", f"rim_pred{_sfx(p)}"]
    out["votes"] = out["votes"].astype(np.int64)
    return out[cols].reset_index(drop=True)


def _member_rows(members: list[Member], protocols: tuple[str, ...]) -> pd.DataFrame:
    """Long table of every member's test-fold rows, with ``seed`` and a 0/1 ``vote_<protocol>`` column."""
    frames = []
    for m in members:
        if m.predictions is None:
            raise ValueError(f"{m.name} has no test-fold predictions")
        p = m.predictions[["subject", "lesion", "fold", "rim", "prob"]].copy()
        p["seed"] = m.seed
        for protocol in protocols:
            if protocol not in m.thresholds:
                raise ValueError(f"{m.name} has no {protocol!r} threshold (has {sorted(m.thresholds)})")
            p[f"vote_{protocol}"] = (p["prob"] >= m.thresholds[protocol]).astype(np.int64)
        frames.append(p)
    if not frames:
        raise ValueError("no members to ensemble")
    return pd.concat(frames, ignore_index=True)


def _sfx(protocol: str) -> str:
    return "" if protocol == "paper" else f"_{protocol}"
