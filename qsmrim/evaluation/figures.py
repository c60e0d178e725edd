"""PNG figures of the evaluation report: averaged pROC and PR curves, predicted-vs-expert counts, reliability.

matplotlib is imported only when a figure is drawn, and only through its object-oriented API with the Agg
canvas (no ``pyplot``, no global backend switch), so importing :mod:`qsmrim.evaluation` never needs it and
drawing is safe in any process.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from qsmrim.evaluation.names import display_name

logger = logging.getLogger(__name__)


def render_figures(results: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
    """All report figures as PNG bytes: ``{"proc.png", "pr.png", "counts.png", "reliability.png"}``.

    ``reliability.png`` only when some result carries a calibration.

    Parameters
    ----------
    results : mapping of str to dict
        Label -> :func:`~qsmrim.evaluation.evaluate.evaluate_predictions` result.
    """
    figures = {"proc.png": plot_roc(results), "pr.png": plot_pr(results), "counts.png": plot_counts(results)}
    if any(r.get("calibration") for r in results.values()):
        figures["reliability.png"] = plot_reliability(results)
    return figures


def plot_roc(results: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Fold-averaged partial ROC curves of every method on one plot, as PNG bytes.

    The curves are drawn as steps (right-continuous, as they were integrated), with the chance diagonal.
    """
    fig, ax = _figure((7.5, 4.5))
    max_fpr = 0.1
    for name, r in _per_method(results):
        c = r["proc"]
        max_fpr = c["x_max"]
        ax.plot(c["x"], c["y"], drawstyle="steps-post", label=f"{name} (AUC {c['auc']:.3f})")
    ax.plot([0, max_fpr], [0, max_fpr], ls=":", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, max_fpr), ylim=(0, 1.01), xlabel="False positive rate", ylabel="Sensitivity",
           title=f"Partial ROC (FPR <= {max_fpr:g}), fold average")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    return _png(fig)


def plot_pr(results: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Fold-averaged precision-recall curves of every method on one plot, as PNG bytes.

    Steps are left-continuous (precision at the first threshold reaching each recall), as integrated; the
    dotted line is the rim+ prevalence (a random ranking).
    """
    fig, ax = _figure((7.5, 4.5))
    prevalence = None
    for name, r in _per_method(results):
        c = r["pr"]
        prevalence = c.get("prevalence", prevalence)
        ax.plot(c["x"], c["y"], drawstyle="steps-pre", label=f"{name} (AUC {c['auc']:.3f})")
    if prevalence is not None:
        ax.axhline(prevalence, ls=":", color="grey", lw=1, label=f"prevalence {prevalence:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)",
           title="Precision-recall, fold average")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    return _png(fig)


def plot_counts(results: Mapping[str, Mapping[str, Any]], *, jitter: float = 0.15) -> bytes:
    """Predicted vs expert rim+ counts per subject, one panel per result, as PNG bytes.

    Parameters
    ----------
    results : mapping of str to dict
        Label -> :func:`~qsmrim.evaluation.evaluate.evaluate_predictions` result.
    jitter : float, default=0.15
        Half-width of the uniform jitter added to both axes so tied counts stay visible (seeded, so the
        figure is reproducible). The statistics in the titles use the unjittered counts.
    """
    n = len(results)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure((4.2 * ncols, 4.0 * nrows), nrows=nrows, ncols=ncols)
    axes = np.atleast_1d(axes).ravel()
    rng = np.random.default_rng(0)
    for ax, (label, r) in zip(axes, results.items(), strict=False):
        s = r["subject"]
        e = np.asarray(s["counts"]["expert"], dtype=float)
        p = np.asarray(s["counts"]["predicted"], dtype=float)
        ax.scatter(e + rng.uniform(-jitter, jitter, e.size), p + rng.uniform(-jitter, jitter, p.size),
                   s=12, alpha=0.6)
        top = max(float(e.max(initial=0)), float(p.max(initial=0)), 1.0) + 0.5
        ax.plot([0, top], [0, top], ls="--", color="grey", lw=1)
        ax.set(xlim=(-0.5, top), ylim=(-0.5, top), xlabel="Expert rim+ count", ylabel="Predicted rim+ count")
        ax.set_title(f"{display_name(label, r)}\nr = {_f(s['r'])} ({_f(s['ci_low'])}, {_f(s['ci_high'])}), "
                     f"MSE = {_f(s['mse'])}", fontsize="small")
    for ax in axes[n:]:
        ax.set_visible(False)
    return _png(fig)


def plot_reliability(results: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Reliability curves (observed rim+ fraction vs mean probability per bin) of every method, as PNG bytes.

    The lower panel shows how many lesions fall in each bin (log scale): with few rim+ lesions most of the
    cohort sits in the lowest bin, and a point from a handful of lesions deserves little weight.
    """
    fig, (ax, hist) = _figure((7.5, 5.5), nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="calibrated")
    for name, r in _per_method(results):
        c = r.get("calibration")
        if not c:
            continue
        rel = c["reliability"]
        keep = [i for i, n in enumerate(rel["count"]) if n]
        line, = ax.plot([rel["mean_prob"][i] for i in keep], [rel["fraction_rim"][i] for i in keep], marker="o",
                        ms=4, label=f"{name} (Brier {c['brier']:.3f})")  # fmt: skip
        edges = np.asarray(rel["edges"], dtype=float)
        hist.stairs(np.asarray(rel["count"], dtype=float), edges, color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="Observed rim+ fraction",
           title="Reliability of the ensemble probability, pooled out-of-fold lesions")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    hist.set(yscale="log", xlabel="Mean ensemble probability (bin)", ylabel="Lesions")
    return _png(fig)


def _per_method(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    seen: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for label, r in results.items():
        method = r.get("method") or label
        seen.setdefault(method, (display_name(method, r), r))
    return list(seen.values())


def _figure(size: tuple[float, float], nrows: int = 1, ncols: int = 1, **subplots_kw: Any) -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is installed with the project's extras
        raise ImportError("drawing the report figures needs matplotlib: pip install matplotlib") from err
    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True, **subplots_kw)
    return fig, axes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
