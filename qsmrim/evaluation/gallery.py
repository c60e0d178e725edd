"""The lesions behind the CV numbers: a Fig. 8-style gallery, every error, and the review queue.

From the per-lesion out-of-fold table (``oof.parquet``, docs/evaluation.md), per method and with the paper
protocol's decisions (``rim_pred``):

* :func:`gallery_cases`: the most confident TP, FP, FN and TN (paper Fig. 8: a rim+ lesion found, a rim-
  lesion called rim+, a rim+ lesion missed, a rim- lesion passed);
* :func:`error_table`: every FP and FN, the most confidently wrong first;
* :func:`review_queue`: the labelled lesions an expert reviews at the high-sensitivity threshold
  (:func:`~qsmrim.evaluation.operating_point.high_sensitivity_point`), highest probability first.

"Confidence" is the probability of the call made: ``prob`` for a rim+ call, ``1 - prob`` for a rim- call.
:func:`gallery_sections` turns these into report HTML and Markdown with a thumbnail per lesion
(:func:`qsmrim.review.render_thumbnails`), drawn once per lesion even when several methods show it.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from qsmrim.data.cohort import SubjectVolumes
from qsmrim.review.page import img_tag
from qsmrim.review.thumbnails import ThumbnailConfig, render_thumbnails

__all__ = ["GalleryConfig", "LesionImages", "error_table", "gallery_cases", "gallery_sections", "review_queue"]

log = logging.getLogger(__name__)

KINDS: tuple[tuple[str, str], ...] = (
    ("TP", "true positive: rim+ lesion called rim+"),
    ("FP", "false positive: rim- lesion called rim+"),
    ("FN", "false negative: rim+ lesion called rim-"),
    ("TN", "true negative: rim- lesion called rim-"),
)
"""Gallery cells in paper Fig. 8 order (A-D)."""

COLUMNS: tuple[str, ...] = ("subject", "lesion", "fold", "kind", "prob", "votes", "n_members", "spread")
"""Columns of the error and queue tables, as the report shows them."""

LesionImages = dict[tuple[str, int], bytes]
"""``(subject, lesion) -> PNG`` thumbnails."""


@dataclass(frozen=True)
class GalleryConfig:
    """How many lesions the report draws: thumbnails are about 20 KB each, and a paper-size cohort has
    hundreds of errors and a queue of about 700, so only the first of each list get a picture; the tables
    list them all."""

    errors_drawn: int = 12
    queue_drawn: int = 12
    thumbnails: ThumbnailConfig = field(default_factory=ThumbnailConfig)

    def __post_init__(self) -> None:
        for name in ("errors_drawn", "queue_drawn"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"GalleryConfig.{name} must be an int >= 0, not {value!r}")


def _labelled(oof: pd.DataFrame) -> pd.DataFrame:
    """Labelled lesions with their outcome ``kind`` (TP/FP/FN/TN) and the ``confidence`` of the call."""
    need = {"subject", "lesion", "fold", "rim", "prob", "rim_pred"}
    missing = sorted(need - set(oof.columns))
    if missing:
        raise ValueError(f"the out-of-fold table lacks the column(s) {missing} (see docs/evaluation.md)")
    t = oof[oof["rim"].notna()].copy()
    rim = t["rim"].astype(int).to_numpy()
    pred = t["rim_pred"].astype(int).to_numpy()
    t["kind"] = np.select([(rim == 1) & (pred == 1), (rim == 0) & (pred == 1), (rim == 1) & (pred == 0)],
                          ["TP", "FP", "FN"], "TN")  # fmt: skip
    prob = t["prob"].astype(float).to_numpy()
    t["confidence"] = np.where(pred == 1, prob, 1.0 - prob)
    return t


def _by_confidence(t: pd.DataFrame) -> pd.DataFrame:
    """Most confident first; ties: lower spread (members agree), then subject and lesion."""
    spread = t["spread"] if "spread" in t.columns else pd.Series(0.0, index=t.index)
    return (t.assign(_c=-t["confidence"], _s=spread.fillna(np.inf))
            .sort_values(["_c", "_s", "subject", "lesion"], kind="stable").drop(columns=["_c", "_s"]))  # fmt: skip


def gallery_cases(oof: pd.DataFrame) -> dict[str, pd.Series | None]:
    """The most confident TP, FP, FN and TN of one method's out-of-fold lesions (``None`` when none).

    Parameters
    ----------
    oof : DataFrame
        One model's rows of ``oof.parquet`` (needs ``subject, lesion, fold, rim, prob, rim_pred``).
    """
    t = _by_confidence(_labelled(oof))
    out: dict[str, pd.Series | None] = {}
    for kind, _ in KINDS:
        rows = t[t["kind"] == kind]
        out[kind] = rows.iloc[0] if len(rows) else None
    return out


def error_table(oof: pd.DataFrame) -> pd.DataFrame:
    """Every FP and FN of one method, the most confidently wrong first (columns :data:`COLUMNS` + ``confidence``)."""
    t = _labelled(oof)
    t = _by_confidence(t[t["kind"].isin(["FP", "FN"])])
    return t[[c for c in (*COLUMNS, "confidence") if c in t.columns]].reset_index(drop=True)


def review_queue(oof: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The labelled lesions with ``prob >= threshold``, highest probability first: the expert's review list
    at that screening threshold. Its length is ``lesions_to_review`` of the high-sensitivity point."""
    t = _labelled(oof)
    t = t[t["prob"].astype(float) >= threshold]
    t = t.assign(_p=-t["prob"].astype(float)).sort_values(["_p", "subject", "lesion"], kind="stable")
    return t[[c for c in COLUMNS if c in t.columns]].reset_index(drop=True)


def gallery_sections(
    results: Mapping[str, Mapping[str, Any]],
    oof: pd.DataFrame,
    names: Mapping[str, str],
    *,
    volumes: Callable[[str], SubjectVolumes] | None = None,
    config: GalleryConfig = GalleryConfig(),
) -> tuple[list[str], list[str], LesionImages]:
    """HTML blocks, Markdown blocks and the thumbnails of the gallery, errors and review queue per method.

    Parameters
    ----------
    results : mapping
        Label -> :func:`~qsmrim.evaluation.evaluate.evaluate_predictions` result; one block per method that
        has rows in ``oof`` (its first result, the paper protocol's).
    oof : DataFrame
        ``oof.parquet`` of the run (column ``model`` names the method).
    names : mapping of str to str
        Method -> display name.
    volumes : callable, default=None
        Scan id -> its volumes; without it (or when a scan cannot be loaded) lesions are listed without
        thumbnails.
    config : GalleryConfig, default=GalleryConfig()

    Returns
    -------
    (html_blocks, markdown_blocks, images)
        ``images`` maps ``(subject, lesion)`` to PNG bytes; Markdown links them as
        ``lesions/sub-<subject>_lesion-<lesion>.png`` (:func:`image_name`).
    """
    per_method: list[tuple[str, str, dict, pd.DataFrame, pd.DataFrame, Mapping[str, Any]]] = []
    seen: set[str] = set()
    for label, r in results.items():
        method = r.get("method") or label
        if method in seen or "model" not in oof.columns:
            continue
        rows = oof[oof["model"] == method]
        if rows.empty or rows["rim"].notna().sum() == 0:
            continue
        seen.add(method)
        hs = r["high_sensitivity"]
        queue = review_queue(rows, float(hs["threshold"]))
        per_method.append((method, names.get(method, method), gallery_cases(rows), error_table(rows), queue, hs))
    wanted: dict[str, set[int]] = {}
    for _m, _n, cases, errors, queue, _hs in per_method:
        for row in [c for c in cases.values() if c is not None]:
            wanted.setdefault(str(row["subject"]), set()).add(int(row["lesion"]))
        for table, n in ((errors, config.errors_drawn), (queue, config.queue_drawn)):
            for s, i in table[["subject", "lesion"]].head(n).itertuples(index=False):
                wanted.setdefault(str(s), set()).add(int(i))
    images = _draw(wanted, volumes, config.thumbnails)
    html_blocks, md_blocks = [], []
    for _method, name, cases, errors, queue, hs in per_method:
        html_blocks.append(_html_method(name, cases, errors, queue, hs, images, config))
        md_blocks.append(_md_method(name, cases, errors, queue, hs, images))
    if per_method and volumes is None:
        note = ("Thumbnails are left out: figures were not drawn (--no-figures), or the run's cohort "
                "(config.resolved.json data.root, else prepared/cohort) was not found.")  # fmt: skip
        html_blocks.insert(0, f"<p>{html.escape(note)}</p>")
        md_blocks.insert(0, note + "\n")
    return html_blocks, md_blocks, images


def image_name(subject: str, lesion: int) -> str:
    """File name of a lesion's thumbnail beside the report (in ``lesions/``)."""
    return f"sub-{subject}_lesion-{lesion}.png"


def _draw(wanted: dict[str, set[int]], volumes, config: ThumbnailConfig) -> LesionImages:
    images: LesionImages = {}
    if volumes is None:
        return images
    for subject, lesions in sorted(wanted.items()):
        try:
            vol = volumes(subject)
            pngs = render_thumbnails(vol, sorted(lesions), config)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("no thumbnails for sub-%s: %s", subject, exc)
            continue
        images.update({(subject, i): png for i, png in pngs.items()})
    return images


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return "n/a"
    if isinstance(v, float | np.floating):
        return f"{float(v):.{digits}f}"
    return str(v)


def _votes(row: Mapping[str, Any]) -> str:
    n = row.get("n_members")
    return f"{_fmt(row.get('votes'))} of {_fmt(n)}" if n is not None and n is not pd.NA else _fmt(row.get("votes"))


def _facts(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [("subject", f"sub-{row['subject']}"), ("lesion", _fmt(row["lesion"])), ("fold", _fmt(row["fold"])),
            ("prob", _fmt(row["prob"])), ("votes", _votes(row)), ("spread", _fmt(row.get("spread")))]  # fmt: skip


def _html_card(row: Mapping[str, Any], images: LesionImages, heading: str) -> str:
    esc = html.escape
    facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _facts(row))
    png = images.get((str(row["subject"]), int(row["lesion"])))
    pic = img_tag(png, f"sub-{row['subject']} lesion {row['lesion']}") if png else ""
    return (f'<div class="lesion"><dl><dt>case</dt><dd>{esc(heading)}</dd>{facts}</dl>{pic}</div>')


def _html_table(table: pd.DataFrame) -> str:
    esc = html.escape
    cols = [c for c in COLUMNS if c in table.columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in table[cols].itertuples(index=False))  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _queue_line(name: str, queue: pd.DataFrame, hs: Mapping[str, Any]) -> str:
    return (f"{name}: at the high-sensitivity threshold {_fmt(hs['threshold'], 4)} (sensitivity "
            f"{_fmt(hs['sensitivity'])}) an expert reviews {len(queue)} of {hs['n_lesions']} labelled lesions "
            f"({hs['tp']} rim+ among them), saving {100 * hs['review_saved']:.1f}% of the review.")  # fmt: skip


def _html_method(name, cases, errors, queue, hs, images: LesionImages, config: GalleryConfig) -> str:
    esc = html.escape
    parts = [f'<h2 id="gallery-{esc(name)}">Gallery: {esc(name)}</h2>',
             "<p>The most confident lesion of each outcome (paper Fig. 8, paper-protocol decisions): confidence "
             "is the probability of the call made.</p>"]  # fmt: skip
    for kind, text in KINDS:
        row = cases[kind]
        parts.append(_html_card(row, images, f"{kind}, {text}") if row is not None
                     else f'<p class="none">{esc(kind)}: none</p>')  # fmt: skip
    parts.append(f"<h3>Errors: {esc(name)} ({len(errors)})</h3>")
    parts.append("<p>Every false positive and false negative, the most confidently wrong first; the first "
                 f"{config.errors_drawn} with thumbnails.</p>")
    parts.append(_html_table(errors))
    parts += [_html_card(r, images, r["kind"]) for r in errors.head(config.errors_drawn).to_dict("records")]
    parts.append(f"<h3>Review queue: {esc(name)} ({len(queue)})</h3>")
    parts.append(f"<p>{esc(_queue_line(name, queue, hs))} Highest probability first; the first "
                 f"{config.queue_drawn} with thumbnails.</p>")
    parts.append(_html_table(queue))
    parts += [_html_card(r, images, r["kind"]) for r in queue.head(config.queue_drawn).to_dict("records")]
    return "\n".join(parts)


def _md_table(table: pd.DataFrame) -> str:
    cols = [c for c in COLUMNS if c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table[cols].itertuples(index=False)]
    return "\n".join(lines)


def _md_method(name, cases, errors, queue, hs, images: LesionImages) -> str:
    parts = [f"## Gallery: {name}", ""]
    for kind, text in KINDS:
        row = cases[kind]
        if row is None:
            parts.append(f"- {kind}: none")
            continue
        facts = ", ".join(f"{k} {v}" for k, v in _facts(row))
        key = (str(row["subject"]), int(row["lesion"]))
        pic = f" ![{kind}](lesions/{image_name(*key)})" if key in images else ""
        parts.append(f"- {kind} ({text}): {facts}{pic}")
    parts += ["", f"### Errors: {name} ({len(errors)})", "", _md_table(errors), "",
              f"### Review queue: {name} ({len(queue)})", "", _queue_line(name, queue, hs), "", _md_table(queue), ""]  # fmt: skip
    return "\n".join(parts)
