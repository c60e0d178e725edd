"""The review page of one scan and the cohort's index page: self-contained HTML a reader opens offline.

A page lists a scan's lesions in review order: rim+ calls first, then lesions flagged ``review`` (probability
at or above the model's screening threshold), then the rest folded away in a ``<details>`` element. Each
lesion shows its thumbnail (:func:`qsmrim.review.thumbnails.render_thumbnails`, inlined as a base64 PNG),
probability, votes of N members, spread (member std), volume and centroid in mm. QSM input QC flags
(``qc_*`` fields of the lesion TSV's JSON sidecar) sit at the top when present. Pages reference nothing
outside themselves (no scripts, fonts, style sheets or images by URL), so they open inside a hospital
network with no internet, and a page can be mailed on its own.

The page reads the lesion TSV that ``qsmrim predict`` writes (:func:`read_lesion_table`), so the page and the
TSV never disagree. Without a ``review`` column the screening group is left out and lesions are ranked by
rim call and probability; without ``qc_*`` fields there is no QC block.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from qsmrim.atomic import write_text_atomic

__all__ = [
    "LESION_TSV_SUFFIX",
    "PAGE_CSS",
    "REVIEW_INDEX",
    "img_tag",
    "index_page",
    "page_path",
    "read_lesion_table",
    "read_sidecar",
    "review_order",
    "review_page",
    "write_index_page",
    "write_review_page",
]

log = logging.getLogger(__name__)

REVIEW_INDEX = "index.html"
"""File name of the cohort's index page at the top of a predictions folder."""

LESION_TSV_SUFFIX = "_desc-rim_lesions.tsv"
"""The end of a lesion TSV's name: ``<scan>_desc-rim_lesions.tsv`` gives the page ``<scan>.html``."""

GROUPS: tuple[tuple[str, str], ...] = (
    ("rim", "Rim+ calls"),
    ("review", "To review: at or above the screening threshold"),
    ("rest", "The rest"),
)
"""Review groups in page order: (key, heading)."""


def read_lesion_table(tsv: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A lesion TSV of ``qsmrim predict`` and the ``qc_*`` fields of its JSON sidecar (``{}`` if none).

    The sidecar is the TSV's name with ``.json`` (BIDS); only its keys starting with ``qc_`` are returned.

    Raises
    ------
    ValueError
        When the TSV lacks a column the page needs (``index``, ``prob``, ``votes``, ``rim``), or the sidecar
        is not a JSON object; the message names the file.
    """
    tsv = Path(tsv)
    table = pd.read_csv(tsv, sep="\t", na_values="n/a", keep_default_na=False)
    missing = [c for c in ("index", "prob", "votes", "rim") if c not in table.columns]
    if missing:
        raise ValueError(f"{tsv}: lesion TSV lacks the column(s) {missing}; is it a qsmrim predict lesion table?")
    return table, {k: v for k, v in read_sidecar(tsv).items() if k.startswith("qc_")}


def read_sidecar(tsv: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a lesion TSV (``qc_*`` entries, ``Thresholds``, ``QCPolicy``), ``{}`` when absent.

    Raises
    ------
    ValueError
        When the sidecar is not readable JSON or not an object; the message names the file.
    """
    sidecar = Path(tsv).with_suffix(".json")
    if not sidecar.exists():
        return {}
    try:
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{sidecar}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{sidecar}: must hold a JSON object, not {type(doc).__name__}")
    return doc


def review_order(table: pd.DataFrame) -> pd.DataFrame:
    """Lesions in review order with a ``group`` column (``"rim"``, ``"review"``, ``"rest"``).

    Rim+ calls first, then lesions whose ``review`` flag is set (when the column exists), then the rest;
    within a group by probability, highest first, ties by lesion index.
    """
    rim = table["rim"].fillna(0).astype(int) == 1
    review = table["review"].fillna(0).astype(int) == 1 if "review" in table.columns else pd.Series(False, table.index)
    group = pd.Series("rest", index=table.index)
    group[review & ~rim] = "review"
    group[rim] = "rim"
    order = {key: k for k, (key, _) in enumerate(GROUPS)}
    out = table.assign(group=group, _g=group.map(order), _p=-table["prob"].fillna(-1.0))
    return out.sort_values(["_g", "_p", "index"], kind="stable").drop(columns=["_g", "_p"]).reset_index(drop=True)


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` inline (``data:`` URI), so the page needs no file beside it."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="thumb" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def review_page(
    scan: str,
    table: pd.DataFrame,
    thumbnails: Mapping[int, bytes],
    *,
    qc: Mapping[str, Any] | None = None,
    n_members: int | None = None,
    thresholds: Mapping[str, Any] | None = None,
    model: str | None = None,
) -> str:
    """One scan's review page as a self-contained HTML string.

    Parameters
    ----------
    scan : str
        Scan id without ``sub-`` (``"01"`` or ``"01_ses-02"``).
    table : DataFrame
        The lesion TSV as :func:`read_lesion_table` returns it.
    thumbnails : mapping of int to bytes
        Lesion index -> PNG; lesions without one are listed without a picture.
    qc : mapping, default=None
        ``qc_*`` fields; each value a flag, a number, or an object (``{"flag": ..., "value": ...}``).
    n_members : int, default=None
        Ensemble members, shown as "votes of N".
    thresholds : mapping, default=None
        The thresholds the prediction used, shown in the header: a number per name (``{"screening": 0.12}``) or
        the sidecar's ``Thresholds`` (``{"screening": {"value": 0.12, "source": "model"}, ...}``).
    model : str, default=None
        Which model predicted (name, version), shown in the header.
    """
    esc = html.escape
    ordered = review_order(table)
    n_rim = int((ordered["group"] == "rim").sum())
    n_review = int((ordered["group"] == "review").sum())
    title = f"sub-{scan}: lesion review"
    facts = [f"{len(ordered)} lesions", f"{n_rim} rim+ calls"]
    if "review" in table.columns:
        facts.append(f"{n_review} more at or above the screening threshold")
    body = [f"<h1>{esc(title)}</h1>", f'<p class="facts">{esc("; ".join(facts))}.</p>']
    meta = []
    if model:
        meta.append(f"model: {model}")
    if n_members:
        meta.append(f"{n_members} members (rim+ when more than half vote for it)")
    if thresholds:
        meta.append("thresholds: " + ", ".join(_threshold(k, v) for k, v in thresholds.items()))
    if meta:
        body.append(f'<p class="meta">{esc("; ".join(meta))}.</p>')
    if qc:
        body.append(_qc_block(qc))
    for key, heading in GROUPS:
        rows = ordered[ordered["group"] == key]
        if key == "review" and "review" not in table.columns:
            continue
        cards = "\n".join(_card(r, thumbnails.get(int(r["index"])), n_members) for r in rows.to_dict("records"))
        if key == "rest":
            body.append(f'<details id="rest"><summary>{esc(heading)}: {len(rows)} lesions '
                        f'(click to show)</summary>\n{cards}\n</details>')  # fmt: skip
        else:
            body.append(f'<h2 id="{key}">{esc(heading)}: {len(rows)}</h2>')
            body.append(cards or '<p class="none">none</p>')
    body.append(f'<p class="legend">{esc(_LEGEND)}</p>')
    return _document(title, body)


def write_review_page(
    tsv: str | Path,
    thumbnails: Mapping[int, bytes],
    out_dir: str | Path,
    **kwargs: Any,
) -> Path:
    """Read a lesion TSV (and its sidecar), write ``<out_dir>/<scan>.html``; returns the path.

    ``kwargs`` go to :func:`review_page` (``n_members``, ``model``; ``qc`` and ``thresholds`` override the
    sidecar's ``qc_*`` entries and ``Thresholds``). Written to a temporary name and renamed, so a reader never
    opens half a page.
    """
    tsv = Path(tsv)
    table, qc = read_lesion_table(tsv)
    kwargs.setdefault("qc", qc)
    kwargs.setdefault("thresholds", read_sidecar(tsv).get("Thresholds"))
    scan = _scan_of(tsv)
    path = page_path(out_dir, scan)
    _atomic_write(path, review_page(scan, table, thumbnails, **kwargs))
    return path


def page_path(out_dir: str | Path, scan: str) -> Path:
    """Where a scan's page lives: ``<out_dir>/sub-<scan>.html`` (as fMRIPrep places its reports)."""
    return Path(out_dir) / f"sub-{scan}.html"


def index_page(rows: list[Mapping[str, Any]], *, title: str = "qsmrim lesion review") -> str:
    """The cohort's index: one row per scan with a relative link to its page.

    Each row: ``scan``, ``page`` (a relative file name, or None), ``n_lesions``, ``n_rim``, ``n_review``
    (None without a ``review`` column) and ``qc_flags`` (names of the raised QC flags).
    """
    esc = html.escape
    head = "".join(f"<th>{h}</th>" for h in ("Scan", "Lesions", "Rim+ calls", "To review", "QC flags"))
    lines = []
    for r in rows:
        name = f"sub-{r['scan']}"
        link = f'<a href="{esc(str(r["page"]))}">{esc(name)}</a>' if r.get("page") else esc(name)
        flags = ", ".join(r.get("qc_flags") or ()) or "-"
        review = "n/a" if r.get("n_review") is None else str(r["n_review"])
        lines.append(f"<tr><td>{link}</td><td>{r['n_lesions']}</td><td>{r['n_rim']}</td><td>{review}</td>"
                     f"<td>{esc(flags)}</td></tr>")  # fmt: skip
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="facts">{len(rows)} scans; each page lists its lesions in review order.</p>',
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"]  # fmt: skip
    return _document(title, body)


def write_index_page(out_dir: str | Path, *, title: str = "qsmrim lesion review") -> Path:
    """Write ``<out_dir>/index.html`` over every lesion TSV under ``out_dir`` (earlier runs into the same
    folder included) and return its path."""
    out_dir = Path(out_dir)
    rows = []
    for tsv in sorted(out_dir.glob(f"sub-*/**/*{LESION_TSV_SUFFIX}")):
        try:
            table, qc = read_lesion_table(tsv)
        except ValueError as exc:
            log.warning("index page skips %s: %s", tsv, exc)
            continue
        scan = _scan_of(tsv)
        page = page_path(out_dir, scan)
        rows.append({
            "scan": scan,
            "page": page.name if page.exists() else None,
            "n_lesions": len(table),
            "n_rim": int((table["rim"].fillna(0).astype(int) == 1).sum()),
            "n_review": int((table["review"].fillna(0).astype(int) == 1).sum()) if "review" in table else None,
            "qc_flags": [k for k, v in qc.items() if _raised(v)],
        })  # fmt: skip
    path = out_dir / REVIEW_INDEX
    _atomic_write(path, index_page(rows, title=title))
    return path


# -- pieces -------------------------------------------------------------------------------------------------


_LEGEND = (
    "Thumbnails: axial, coronal and sagittal slices through the lesion centroid, QSM (black -0.15 to white "
    "+0.15 ppm) left and FLAIR (brain 1st to 99.5th percentile) right of each pair, drawn at the true voxel "
    "size; red outline: this lesion, cyan: other lesions, both one pixel outside the lesion. prob: mean member "
    "probability; votes: members at or above their own threshold; spread: standard deviation of the member "
    "probabilities (high: the members disagree)."
)


def _card(r: Mapping[str, Any], png: bytes | None, n_members: int | None) -> str:
    esc = html.escape
    idx = int(r["index"])
    votes = f"{_int(r.get('votes'))}" + (f" of {n_members}" if n_members else "")
    call = "rim+" if _int(r.get("rim")) == 1 else "rim-"
    cells = [("lesion", str(idx)), ("prob", _num(r.get("prob"))), ("votes", votes),
             ("spread", _num(r.get("spread"))), ("call", call)]  # fmt: skip
    if "review" in r:
        cells.append(("review", "yes" if _int(r.get("review")) == 1 else "no"))
    marks = [name for col, name in (("qc_cropped", "cropped by the patch"), ("qc_confluent", "confluent"))
             if _int(r.get(col)) == 1]  # fmt: skip
    if marks:
        cells.append(("QC", ", ".join(marks)))
    if r.get("volume_mm3") is not None:
        cells.append(("volume", f"{_num(r.get('volume_mm3'), 1)} mm\u00b3"))
    if all(f"centroid_mm_{a}" in r for a in "xyz"):
        cells.append(("centroid", "(" + ", ".join(_num(r[f"centroid_mm_{a}"], 1) for a in "xyz") + ") mm"))
    facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in cells)
    picture = img_tag(png, f"lesion {idx}") if png else '<p class="none">no thumbnail</p>'
    return f'<div class="lesion {esc(str(r.get("group", "")))}" id="lesion-{idx}"><dl>{facts}</dl>{picture}</div>'


def _qc_block(qc: Mapping[str, Any]) -> str:
    esc = html.escape
    items = []
    for name, value in qc.items():
        raised = _raised(value)
        if isinstance(value, Mapping) and "value" in value:  # qsmrim.data.qc: value, limit, flag, message
            shown = _num(value["value"], 4) + (f" (limit {value['limit']})" if value.get("limit") is not None else "")
            shown += f": {value['message']}" if raised and value.get("message") else ""
        elif isinstance(value, Mapping):
            shown = ", ".join(f"{k} {_num(v) if isinstance(v, float) else v}" for k, v in value.items())
        else:
            shown = _num(value) if isinstance(value, float) else str(value)
        items.append(f'<li class="{"raised" if raised else "ok"}">{esc(name)}: {esc(shown)}</li>')
    n = sum(_raised(v) for v in qc.values())
    head = f"QSM input QC: {n} flag{'s' if n != 1 else ''} raised" if n else "QSM input QC: no flag raised"
    return f'<div class="qc"><h2>{esc(head)}</h2><ul>{"".join(items)}</ul></div>'


def _raised(value: Any) -> bool:
    """Whether a QC field is a raised flag: ``true``, or an object whose ``flag`` (or ``raised``) is true."""
    if isinstance(value, Mapping):
        return bool(value.get("flag", value.get("raised", False)))
    return value is True


def _threshold(name: str, value: Any) -> str:
    """``screening 0.120 (model)`` from a number or a sidecar entry ``{"value", "source", ...}``; an entry
    without a value shows its ``rule`` (the rim call's vote rule), else its scalar fields (no member lists)."""
    if isinstance(value, Mapping):
        source = f" ({value['source']})" if value.get("source") else ""
        if "value" in value:
            return f"{name} {_num(value['value'])}{source}"
        if value.get("rule"):
            return f"{name}: {value['rule']}"
        return f"{name} " + ", ".join(f"{k} {_num(v) if isinstance(v, float) else v}" for k, v in value.items()
                                      if isinstance(v, str | int | float))  # fmt: skip
    return f"{name} {_num(value)}"


def _scan_of(tsv: Path) -> str:
    name = tsv.name
    if not (name.startswith("sub-") and name.endswith(LESION_TSV_SUFFIX)):
        raise ValueError(f"{tsv}: not a lesion TSV name (sub-<scan>{LESION_TSV_SUFFIX})")
    return name[len("sub-"):-len(LESION_TSV_SUFFIX)]


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{float(v):.{digits}f}" if isinstance(v, int | float) else str(v)


def _int(v: Any) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(v)


def _document(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{PAGE_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")  # fmt: skip


def _atomic_write(path: Path, text: str) -> None:
    write_text_atomic(path, text)


PAGE_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:72em;color:#222}"
    "h2{margin-top:1.2em}.facts{font-size:1.1em}.meta,.legend{color:#555;font-size:0.9em}"
    ".lesion{display:flex;gap:1em;align-items:flex-start;border-top:1px solid #ddd;padding:0.5em 0}"
    ".lesion dl{display:grid;grid-template-columns:auto auto;gap:0 0.6em;margin:0;min-width:14em}"
    ".lesion dt{color:#666}.lesion dd{margin:0;font-variant-numeric:tabular-nums}"
    ".lesion.rim dl{border-left:4px solid #d22;padding-left:0.4em}"
    ".lesion.review dl{border-left:4px solid #e90;padding-left:0.4em}"
    "img.thumb{image-rendering:pixelated;max-width:100%}"
    ".qc{border:1px solid #bbb;padding:0 1em;margin:1em 0}.qc .raised{color:#b00;font-weight:bold}"
    "details{margin-top:1.5em}summary{cursor:pointer;font-size:1.2em;font-weight:bold}"
    "table{border-collapse:collapse}th,td{border:1px solid #bbb;padding:0.25em 0.6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#eee}"
)
"""Style of the review pages (inline: no style sheet by URL); the CV report's gallery uses it too."""
