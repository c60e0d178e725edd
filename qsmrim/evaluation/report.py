"""The evaluation report: ``report.md`` and a self-contained ``report.html`` from in-memory results.

Input: a mapping ``label -> result`` where each result is the dict of
:func:`~qsmrim.evaluation.evaluate.evaluate_predictions` (``result["method"]`` is the model registry
name; the label is what the tables show, e.g. ``"qsmrimnet"`` or ``"qsmrimnet (honest)"``). The same
method may appear under several protocols; curves, which do not depend on the protocol, are drawn once per
method.

:func:`render_markdown` and :func:`render_html` are pure (strings in, string out);
:func:`~qsmrim.evaluation.figures.render_figures` makes the PNG bytes; :func:`write_report` writes
``report.md``, ``report.html``, the PNGs and ``evaluation.json`` into one folder.

Table 3 (ablation) rows are the results whose method is a key of :data:`ABLATION_VARIANTS`. The paper's
Table 3 marks "Image Fusion" only on its first row; with the text of section 3.3 ("the fusion technique in
QSMRim-Net outperformed the fusion technique for RimNet") that row is the RimNet-style per-modality
variant, so the column is printed here as the fusion kind rather than a tick.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsmrim.evaluation.names import display_name

if TYPE_CHECKING:
    import pandas as pd

    from qsmrim.data.cohort import SubjectVolumes
    from qsmrim.evaluation.gallery import GalleryConfig

logger = logging.getLogger(__name__)

ABLATION_VARIANTS: Mapping[str, tuple[str, bool, bool]] = {
    "image-rimnet": ("per-modality streams (RimNet)", False, False),
    "image-channel": ("channel concatenation", False, False),
    "image-radiomics": ("channel concatenation", True, False),
    "qsmrimnet": ("channel concatenation", True, True),
}
"""Table 3 rows in the paper's order: method -> (image fusion, radiomic fusion, DeepSMOTE)."""

FIGURES: tuple[str, ...] = ("proc.png", "pr.png", "counts.png", "reliability.png")
"""File names of the report's figures."""

Table = tuple[list[str], list[list[str]]]


def table2(results: Mapping[str, Mapping[str, Any]]) -> Table:
    """Lesion-wise Table 2: header and rows of formatted cells, one row per result."""
    header = ["Method", "Protocol", "Accuracy", "F1", "Sensitivity", "Specificity", "PPV", "TP", "FP", "FN", "TN"]
    rows = []
    for label, r in results.items():
        les = r["lesion"]
        rows.append(
            [display_name(label, r), r["protocol"]]
            + [_f(les[m]) for m in ("accuracy", "f1", "sensitivity", "specificity", "ppv")]
            + [str(les[c]) for c in ("tp", "fp", "fn", "tn")]
        )
    return header, rows


def table3(results: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """Ablation Table 3 over the :data:`ABLATION_VARIANTS` present, or ``None`` when fewer than 2 are."""
    present = [(label, r) for label, r in results.items() if _method(label, r) in ABLATION_VARIANTS]
    if len({_method(label, r) for label, r in present}) < 2:
        return None
    order = list(ABLATION_VARIANTS)
    present.sort(key=lambda lr: order.index(_method(*lr)))
    header = ["Variant", "Image fusion", "Radiomic fusion", "DeepSMOTE", "Protocol"]
    header += ["Accuracy", "F1", "Sensitivity", "Specificity", "PPV", "TP", "FP", "FN", "TN"]
    rows = []
    for label, r in present:
        fusion, radiomic, smote = ABLATION_VARIANTS[_method(label, r)]
        les = r["lesion"]
        rows.append(
            [display_name(label, r), fusion, _tick(radiomic), _tick(smote), r["protocol"]]
            + [_f(les[m]) for m in ("accuracy", "f1", "sensitivity", "specificity", "ppv")]
            + [str(les[c]) for c in ("tp", "fp", "fn", "tn")]
        )
    return header, rows


def curve_table(results: Mapping[str, Mapping[str, Any]]) -> Table:
    """pROC and PR AUC per method (once per method), ranked by PR AUC."""
    first = _first_per_method(results)
    first.sort(key=lambda lr: -(lr[1]["pr"]["auc"] if lr[1]["pr"]["auc"] is not None else -1.0))
    max_fpr = first[0][1]["proc"]["x_max"] if first else 0.1
    header = ["Rank", "Method", f"pROC AUC (FPR <= {max_fpr:g})", "McClish", "PR AUC", "pROC AUC per fold"]
    rows = []
    for i, (label, r) in enumerate(first, start=1):
        per_fold = ", ".join(_f(v) for v in r["proc"]["fold_auc"])
        rows.append([str(i), display_name(_method(label, r), r), _f(r["proc"]["auc"]), _f(r["proc"]["mcclish"]),
                     _f(r["pr"]["auc"]), per_fold])
    return header, rows


def subject_table(results: Mapping[str, Mapping[str, Any]]) -> Table:
    """Subject-level agreement of rim+ counts: Pearson r with CI and MSE, one row per result."""
    header = ["Method", "Protocol", "Pearson r", "95% CI", "MSE", "Subjects"]
    rows = []
    for label, r in results.items():
        s = r["subject"]
        level = f"{100 * s['confidence']:g}%"
        rows.append([display_name(label, r), r["protocol"], _f(s["r"], 2),
                     f"{_f(s['ci_low'], 2)}, {_f(s['ci_high'], 2)} ({level})", _f(s["mse"], 2), str(s["n_subjects"])])
    return header, rows


def high_sensitivity_table(results: Mapping[str, Mapping[str, Any]]) -> Table:
    """The high-sensitivity operating point per method (once per method)."""
    header = ["Method", "Threshold", "Sensitivity", "TP", "FP", "Lesions to review", "Of lesions", "Review saved"]
    rows = []
    for label, r in _first_per_method(results):
        h = r["high_sensitivity"]
        rows.append([display_name(_method(label, r), r), _f(h["threshold"], 4), _f(h["sensitivity"]), str(h["tp"]),
                     str(h["fp"]), str(h["lesions_to_review"]), str(h["n_lesions"]), _pct(h["review_saved"])])
    return header, rows


def calibration_table(results: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """Brier score, its prevalence reference and skill, and ECE per method (once per method).

    ``None`` when no result carries a calibration (e.g. scores outside [0, 1], or results written before
    calibration was added)."""
    header = ["Method", "Brier", "Brier (prevalence)", "Brier skill", "ECE", "Bins"]
    rows = []
    for label, r in _first_per_method(results):
        c = r.get("calibration")
        if not c:
            continue
        rel = c["reliability"]
        rows.append([display_name(_method(label, r), r), _f(c["brier"], 4), _f(c["brier_reference"], 4),
                     _f(c["brier_skill"]), _f(c["ece"], 4), f"{rel['n_bins']} {rel['strategy']}"])
    return (header, rows) if rows else None


def reliability_table(results: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """Reliability bins: mean predicted probability / observed rim+ fraction (lesions) per bin and method.

    One row per bin and one column per method when all methods share their bin edges (equal-width bins);
    otherwise one row per (method, bin). ``None`` when no result carries a calibration.
    """
    present = [(display_name(_method(label, r), r), r["calibration"]["reliability"])
               for label, r in _first_per_method(results) if r.get("calibration")]
    if not present:
        return None

    def cell(rel: Mapping[str, Any], b: int) -> str:
        if not rel["count"][b]:
            return "-"
        return f"{_f(rel['mean_prob'][b])} / {_f(rel['fraction_rim'][b])} ({rel['count'][b]})"

    def span(rel: Mapping[str, Any], b: int) -> str:
        return f"{rel['edges'][b]:.2f}-{rel['edges'][b + 1]:.2f}"

    if len({tuple(rel["edges"]) for _, rel in present}) == 1:
        rel0 = present[0][1]
        header = ["Probability bin"] + [name for name, _ in present]
        rows = [[span(rel0, b)] + [cell(rel, b) for _, rel in present] for b in range(rel0["n_bins"])]
        return header, rows
    header = ["Method", "Probability bin", "Mean prob / rim+ fraction (lesions)"]
    rows = [[name, span(rel, b), cell(rel, b)] for name, rel in present for b in range(rel["n_bins"])
            if rel["count"][b]]  # fmt: skip
    return header, rows


def uncertainty_table(results: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """AUROC of the member spread for the lesions each result gets wrong, one row per result with a spread."""
    header = ["Method", "Protocol", "Errors", "Lesions", "Spread AUROC", "Mean spread (errors)",
              "Mean spread (correct)"]  # fmt: skip
    rows = []
    for label, r in results.items():
        u = r.get("uncertainty")
        if not u:
            continue
        rows.append([display_name(label, r), r["protocol"], str(u["n_errors"]), str(u["n_lesions"]),
                     _f(u["auroc"]), _f(u["mean_spread_errors"], 4), _f(u["mean_spread_correct"], 4)])
    return (header, rows) if rows else None


def render_markdown(
    results: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "QSMRim evaluation",
    figures: Sequence[str] = FIGURES,
    extra: Sequence[str] = (),
) -> str:
    """The report as Markdown, with the figures referenced by relative file name.

    Parameters
    ----------
    results : mapping of str to dict
        Label -> :func:`~qsmrim.evaluation.evaluate.evaluate_predictions` result.
    title : str, default="QSMRim evaluation"
        First heading.
    figures : sequence of str, default=FIGURES
        File names of ``proc.png``, ``pr.png``, ``counts.png`` and ``reliability.png`` beside
        ``report.md``; an empty sequence leaves the figures out.
    extra : sequence of str, default=()
        Markdown blocks appended after the tables (the lesion gallery, :mod:`qsmrim.evaluation.gallery`).

    Returns
    -------
    str
    """
    _check_results(results)
    parts = [f"# {title}", "", _summary(results), ""]
    for heading, intro, table, figs in _sections(results):
        parts += [f"## {heading}", "", intro, "", _md_table(table), ""]
        parts += [f"![{fig}]({fig})\n" for fig in figs if fig in figures]
    parts += list(extra)
    return "\n".join(parts)


def render_html(
    results: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "QSMRim evaluation",
    figures: Mapping[str, bytes] | None = None,
    extra: Sequence[str] = (),
) -> str:
    """The report as one self-contained HTML page (PNG figures inlined as base64, no external files).

    Parameters
    ----------
    results : mapping of str to dict
        Label -> :func:`~qsmrim.evaluation.evaluate.evaluate_predictions` result.
    title : str, default="QSMRim evaluation"
        Page title and first heading.
    figures : mapping of str to bytes, default=None
        File name (``proc.png``, ``pr.png``, ``counts.png``, ``reliability.png``) -> PNG bytes; missing
        figures are left out.
    extra : sequence of str, default=()
        HTML blocks appended after the tables (the lesion gallery, :mod:`qsmrim.evaluation.gallery`).

    Returns
    -------
    str
    """
    _check_results(results)
    figures = figures or {}
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", f"<p>{esc(_summary(results))}</p>"]
    for heading, intro, table, figs in _sections(results):
        body += [f"<h2>{esc(heading)}</h2>", f"<p>{esc(intro)}</p>", _html_table(table)]
        for fig in figs:
            if fig in figures:
                data = base64.b64encode(figures[fig]).decode("ascii")
                body.append(f'<img alt="{esc(fig)}" src="data:image/png;base64,{data}">')
    body += list(extra)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    title: str = "QSMRim evaluation",
    with_figures: bool = True,
    oof: pd.DataFrame | None = None,
    volumes: Callable[[str], SubjectVolumes] | None = None,
    gallery: GalleryConfig | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, the PNGs and ``evaluation.json`` into ``out_dir``.

    With ``oof`` (the run's ``oof.parquet``) the report ends with each method's lesion gallery, errors and
    review queue (:func:`qsmrim.evaluation.gallery.gallery_sections`), with thumbnails drawn from
    ``volumes`` (scan id -> volumes) into ``lesions/`` and inlined in the HTML.

    Parameters
    ----------
    results : mapping of str to dict
        Label -> :func:`~qsmrim.evaluation.evaluate.evaluate_predictions` result.
    out_dir : str or Path
        Created if missing; existing report files in it are overwritten.
    title : str, default="QSMRim evaluation"
        Report title.
    with_figures : bool, default=True
        Draw the PNGs (needs matplotlib); without figures no thumbnails either.
    oof : DataFrame, default=None
        The per-lesion out-of-fold table; None leaves the gallery out.
    volumes : callable, default=None
        Scan id -> :class:`~qsmrim.data.SubjectVolumes` for the thumbnails.
    gallery : GalleryConfig, default=None
        How many lesions get thumbnails (default ``GalleryConfig()``).

    Returns
    -------
    dict
        File name -> path written.
    """
    _check_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, bytes] = {}
    if with_figures:
        from qsmrim.evaluation.figures import render_figures

        figures = render_figures(results)
    written: dict[str, Path] = {}
    for name, png in figures.items():
        (out / name).write_bytes(png)
        written[name] = out / name
    extra_html: list[str] = []
    extra_md: list[str] = []
    if oof is not None:
        from qsmrim.evaluation.gallery import GalleryConfig, gallery_sections, image_name

        names = {r.get("method") or label: display_name(r.get("method") or label, r) for label, r in results.items()}
        extra_html, extra_md, images = gallery_sections(results, oof, names, volumes=volumes if with_figures else None,
                                                        config=gallery or GalleryConfig())  # fmt: skip
        if images:
            (out / "lesions").mkdir(exist_ok=True)
        for (subject, lesion), png in images.items():
            (out / "lesions" / image_name(subject, lesion)).write_bytes(png)
    (out / "report.md").write_text(render_markdown(results, title=title, figures=list(figures), extra=extra_md),
                                   encoding="utf-8")
    (out / "report.html").write_text(render_html(results, title=title, figures=figures, extra=extra_html),
                                     encoding="utf-8")
    (out / "evaluation.json").write_text(json.dumps(results, indent=1, allow_nan=False), encoding="utf-8")
    for name in ("report.md", "report.html", "evaluation.json"):
        written[name] = out / name
    logger.info("wrote the evaluation report of %d results to %s", len(results), out)
    return written


def _sections(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, Table, tuple[str, ...]]]:
    max_fpr = next(iter(results.values()))["proc"]["x_max"]
    sections: list[tuple[str, str, Table, tuple[str, ...]]] = [
        ("Lesion-wise results (Table 2)",
         "Thresholded decisions on the concatenation of the folds. " + _protocol_notes(results),
         table2(results), ()),
    ]
    t3 = table3(results)
    if t3 is not None:
        sections.append(("Ablation (Table 3)", "QSMRim-Net and its variants, same protocol columns as Table 2.",
                         t3, ()))
    sections += [
        ("pROC and PR AUC",
         f"Per-fold curves, step-interpolated on a common grid and averaged; pROC AUC is the area up to "
         f"FPR {max_fpr:g} divided by {max_fpr:g}, McClish the standardised partial AUC. Ranked by PR AUC.",
         curve_table(results), ("proc.png", "pr.png")),
        ("Subject level: rim+ counts",
         "Predicted vs expert rim+ lesions per subject: Pearson r with Fisher-z interval, MSE of the counts.",
         subject_table(results), ("counts.png",)),
        ("High-sensitivity operating point",
         "One threshold on the pooled scores with the largest sensitivity below "
         f"{_max_sens(results)}: the lesions an expert still reviews, and the share of review saved.",
         high_sensitivity_table(results), ()),
    ]
    cal, rel = calibration_table(results), reliability_table(results)
    if cal is not None and rel is not None:
        sections.append(
            ("Calibration",
             "Brier score: mean squared difference of the ensemble probability and the label (lower is better); "
             "Brier (prevalence) is the score of giving every lesion the rim+ prevalence, and Brier skill "
             "1 - Brier / Brier (prevalence). ECE: expected calibration error over the reliability bins.",
             cal, ("reliability.png",)))
        sections.append(
            ("Reliability",
             "Per probability bin: mean ensemble probability / observed rim+ fraction (lesions). A calibrated "
             "model's two numbers agree; '-' is an empty bin.",
             rel, ()))
    unc = uncertainty_table(results)
    if unc is not None:
        sections.append(
            ("Does spread flag errors?",
             "AUROC of the member spread (population std of the member probabilities) for the lesions the "
             "row's decisions get wrong (misclassified at that protocol's operating point); 0.5 is no better "
             "than chance, n/a when there are no errors or only errors.",
             unc, ()))
    return sections


def _summary(results: Mapping[str, Mapping[str, Any]]) -> str:
    cohorts = {(r["n_lesions"], r.get("n_rim"), r.get("n_subjects"), len(r.get("folds", []))) for r in results.values()}
    if len(cohorts) > 1:
        logger.warning("the %d results do not share one cohort: %s", len(results), sorted(cohorts))
        return f"{len(results)} results on different lesion sets; compare rows with care."
    n, n_rim, n_subjects, n_folds = cohorts.pop()
    return f"{n} lesions ({n_rim} rim+) of {n_subjects} subjects, {n_folds} folds; {len(results)} results."


def _protocol_notes(results: Mapping[str, Mapping[str, Any]]) -> str:
    notes = {r["protocol"]: r.get("protocol_note", "") for r in results.values()}
    return " ".join(f"Protocol '{p}': {n}." for p, n in notes.items())


def _max_sens(results: Mapping[str, Mapping[str, Any]]) -> str:
    return f"{next(iter(results.values()))['high_sensitivity']['max_sensitivity']:g}"


def _first_per_method(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    seen: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for label, r in results.items():
        seen.setdefault(_method(label, r), (label, r))
    return list(seen.values())


def _method(label: str, r: Mapping[str, Any]) -> str:
    return r.get("method") or label


def _check_results(results: Mapping[str, Mapping[str, Any]]) -> None:
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping of label -> evaluate_predictions result")
    needed = ("protocol", "lesion", "proc", "pr", "subject", "high_sensitivity", "n_lesions")
    for label, r in results.items():
        missing = [k for k in needed if k not in r]
        if missing:
            raise ValueError(f"results[{label!r}] lacks {missing}; pass evaluate_predictions results")


def _md_table(table: Table) -> str:
    header, rows = table
    if not header:
        return ""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    header, rows = table
    if not header:
        return ""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _tick(flag: bool) -> str:
    return "yes" if flag else "no"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
    "th,td{border:1px solid #bbb;padding:0.25em 0.6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#eee}"
    "img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
    ".lesion{display:flex;gap:1em;align-items:flex-start;border-top:1px solid #ddd;padding:0.5em 0}"
    ".lesion dl{display:grid;grid-template-columns:auto auto;gap:0 0.6em;margin:0;min-width:16em}"
    ".lesion dt{color:#666}.lesion dd{margin:0}img.thumb{display:inline;margin:0;image-rendering:pixelated}"
)
