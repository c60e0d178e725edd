"""Tests of the per-scan review page and the cohort index (:mod:`qsmrim.review.page`), and of the pages
``qsmrim predict`` writes with a real ONNX ensemble.

Pages are parsed with the standard library's HTML parser; expected orders are worked out here from the
hand-made lesion TSV (:func:`review_fixtures.toy_lesion_tsv`), not with the code under test.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from review_fixtures import toy_lesion_tsv
from test_serving_model import build_tiny_ensemble, cohort_arrays

from qsmrim.data import discover_cohort
from qsmrim.review import read_lesion_table, review_order, write_index_page, write_review_page

QC = {  # as serving/predict.py writes the sidecar (qsmrim.data.qc entries), plus two plain flags
    "qc_units": {"value": 0.21, "limit": [0.05, 2.0], "flag": False, "message": "p1..p99 span in ppm"},
    "qc_brain_holes": {"value": 0.12, "limit": 0.05, "flag": True, "message": "12% of the brain is zero"},
    "qc_confluent": True,
    "qc_cropped": False,
    "Thresholds": {"rim": {"rule": "votes > members / 2"}, "screening": {"value": 0.4, "source": "model"}},
}


class _Page(HTMLParser):
    """Lesion card ids in document order, which of them sit inside <details>, every src/href, headings."""

    def __init__(self) -> None:
        super().__init__()
        self.lesions: list[int] = []
        self.folded: list[int] = []
        self.urls: list[str] = []
        self.text: list[str] = []
        self.images = 0
        self._details = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details":
            self._details += 1
        if a.get("id", "").startswith("lesion-"):
            i = int(a["id"].removeprefix("lesion-"))
            self.lesions.append(i)
            if self._details:
                self.folded.append(i)
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "img":
            self.images += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self._details -= 1

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


def _expected_order(tsv) -> tuple[list[int], list[int]]:
    t = pd.read_csv(tsv, sep="\t")
    key = lambda r: (-r.prob, r.index)  # noqa: E731
    rim = sorted((r for r in t.itertuples() if r.prob > 0.7), key=key)
    review = sorted((r for r in t.itertuples() if 0.4 <= r.prob <= 0.7), key=key)
    rest = sorted((r for r in t.itertuples() if r.prob < 0.4), key=key)
    return [r.index for r in rim + review + rest], [r.index for r in rest]


def test_review_order_groups_rim_then_review_then_rest(tmp_path):
    """Check the order: rim+ calls, then review-flagged, then the rest, each by probability, highest first."""
    tsv = toy_lesion_tsv(tmp_path, "01")
    table, qc = read_lesion_table(tsv)
    order = review_order(table)
    assert order["index"].tolist() == _expected_order(tsv)[0]
    assert qc == {}
    assert list(order["group"].unique()) == ["rim", "review", "rest"]


def test_review_page_lists_lesions_in_review_order_with_rest_folded(tmp_path):
    """Check the page's lesion cards follow the review order, only the rest inside <details>, a thumbnail
    for each lesion given one, votes shown of N members."""
    tsv = toy_lesion_tsv(tmp_path / "sub-01" / "anat", "01")
    thumbs = {i: _tiny_png() for i in range(1, 13)}
    page = write_review_page(tsv, thumbs, tmp_path, n_members=5, thresholds={"screening": 0.4}, model="toy version 1")
    assert page == tmp_path / "sub-01.html"
    parsed = _parse(page.read_text())
    order, rest = _expected_order(tsv)
    assert parsed.lesions == order
    assert parsed.folded == rest
    assert parsed.images == 12
    text = " ".join(parsed.text)
    assert "of 5" in text and "screening 0.400" in text and "model: toy version 1" in text
    assert "QSM input QC" not in text


def test_review_page_shows_qc_flags_first(tmp_path):
    """Check the QC block names every qc_* field of the sidecar, counts the two raised ones, and comes before
    the first lesion."""
    tsv = toy_lesion_tsv(tmp_path, "01", qc={**QC, "Description": "not a qc field"})
    html = write_review_page(tsv, {}, tmp_path).read_text()
    assert "QSM input QC: 2 flags raised" in html
    for name in QC:
        assert name in html or name == "Thresholds"
    assert "not a qc field" not in html
    assert html.index("QSM input QC") < html.index('id="lesion-')
    assert '<li class="raised">qc_brain_holes: 0.1200 (limit 0.05): 12% of the brain is zero</li>' in html
    assert '<li class="ok">qc_units: 0.2100 (limit [0.05, 2.0])</li>' in html
    assert '<li class="raised">qc_confluent: True</li>' in html
    assert "screening 0.400 (model)" in html  # the sidecar's Thresholds: what the prediction used
    assert "rim: votes &gt; members / 2" in html


def test_review_page_marks_cropped_and_confluent_lesions(tmp_path):
    """Check the per-lesion QC columns show on their lesion's card only."""
    tsv = toy_lesion_tsv(tmp_path, "01")
    t = pd.read_csv(tsv, sep="\t")
    t["qc_cropped"] = (t["index"] == 3).astype(int)
    t["qc_confluent"] = t["index"].isin([3, 4]).astype(int)
    t.to_csv(tsv, sep="\t", index=False)
    html = write_review_page(tsv, {}, tmp_path).read_text()
    cards = {int(m.group(1)): m.group(2) for m in re.finditer(r'id="lesion-(\d+)">(.*?)</div>', html)}
    assert "<dt>QC</dt><dd>cropped by the patch, confluent</dd>" in cards[3]
    assert "<dt>QC</dt><dd>confluent</dd>" in cards[4]
    assert all("<dt>QC</dt>" not in c for i, c in cards.items() if i not in (3, 4))


def test_review_page_without_review_column_ranks_by_call_and_prob(tmp_path):
    """Check that a TSV without the review column gives rim+ calls then every other lesion by probability,
    with no screening section."""
    tsv = toy_lesion_tsv(tmp_path, "01", review=False)
    html = write_review_page(tsv, {}, tmp_path).read_text()
    t = pd.read_csv(tsv, sep="\t")
    want = t.assign(r=-(t["rim"]), p=-t["prob"]).sort_values(["r", "p"])["index"].tolist()
    assert _parse(html).lesions == want
    assert 'id="review"' not in html and "screening threshold" not in html


def test_review_page_refers_to_nothing_outside_itself(tmp_path):
    """Check that every src is a data: URI and there is no href at all on a scan's page."""
    tsv = toy_lesion_tsv(tmp_path, "01")
    parsed = _parse(write_review_page(tsv, {1: _tiny_png()}, tmp_path).read_text())
    assert parsed.urls and all(u.startswith("data:image/png;base64,") for u in parsed.urls)


def test_review_page_bad_tsv_is_refused_naming_the_file(tmp_path):
    """Check that a TSV without a prob column is refused with the file's name."""
    bad = tmp_path / "sub-01_desc-rim_lesions.tsv"
    bad.write_text("index\tvotes\trim\n1\t2\t0\n")
    with pytest.raises(ValueError, match=r"sub-01_desc-rim_lesions.tsv: lesion TSV lacks the column\(s\) \['prob'\]"):
        read_lesion_table(bad)


def test_index_page_links_every_scan(tmp_path):
    """Check the index lists each scan under the folder with a relative link, its counts and raised QC flags."""
    toy_lesion_tsv(tmp_path / "sub-01" / "anat", "01", qc=QC)
    tsv2 = toy_lesion_tsv(tmp_path / "sub-02" / "ses-1" / "anat", "02_ses-1", n=5, review=False)
    write_review_page(tsv2, {}, tmp_path)
    html = write_index_page(tmp_path).read_text()
    parsed = _parse(html)
    assert parsed.urls == ["sub-02_ses-1.html"]  # sub-01 has no page yet: listed without a link
    assert "sub-01" in html and "qc_brain_holes, qc_confluent" in html
    assert "<td>5</td><td>1</td><td>n/a</td>" in html  # 5 lesions, 1 rim+ (prob 5/6 > 0.7), no review column


@pytest.fixture(scope="module")
def model(tmp_path_factory, synth_root):
    return build_tiny_ensemble(tmp_path_factory.mktemp("model") / "model.onnx", *cohort_arrays(synth_root))


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, synth_root, model):
    from serving.predict import predict_dataset

    out = tmp_path_factory.mktemp("deriv") / "qsmrim"
    result = predict_dataset(model, synth_root / "sub-001", out, providers="cpu")
    assert result.ok
    return out, result


def test_predict_writes_a_review_page_per_scan_and_an_index(predicted):
    """Check that qsmrim predict writes sub-001.html with one thumbnail per lesion of the TSV, in review
    order, and an index linking to it."""
    out, result = predicted
    page = out / "sub-001.html"
    assert result.subjects[0].files["review"] == page
    tsv = out / "sub-001" / "anat" / "sub-001_desc-rim_lesions.tsv"
    table = pd.read_csv(tsv, sep="\t", na_values="n/a", keep_default_na=False)
    parsed = _parse(page.read_text())
    assert sorted(parsed.lesions) == sorted(table["index"].tolist())
    assert parsed.images == len(table)
    ranked = table.assign(r=-table["rim"], p=-table["prob"])
    if "review" in table.columns:
        ranked = ranked.assign(v=-table["review"]).sort_values(["r", "v", "p", "index"])
    else:
        ranked = ranked.sort_values(["r", "p", "index"])
    assert parsed.lesions == ranked["index"].tolist()
    assert "of 5" in " ".join(parsed.text)  # the tiny ensemble's 5 members
    assert _parse((out / "index.html").read_text()).urls == ["sub-001.html"]


def test_demo_ends_with_the_report_and_the_review_page(model, synth_root, tmp_path):
    """Check the demo's last step: predict the held-out scan's folder into <run>/predictions (emptied first, so a
    retrained model is never refused there), and the closing lines name the CV report and that review page."""
    from qsmrim.demo import closing_lines, review_page

    scan = discover_cohort(synth_root).subjects[1]
    out = tmp_path / "predictions"
    (out / "stale").mkdir(parents=True)
    page = review_page(model, scan, out)
    assert page == out / f"sub-{scan.subject}.html" and page.exists()
    assert not (out / "stale").exists() and sorted(p.name for p in out.glob("sub-*") if p.is_dir()) == ["sub-002"]
    lines = closing_lines({"run_dir": str(tmp_path), "review_page": str(page), "served": {"subject": scan.subject}})
    assert lines[0].split()[:2] == ["CV", "report"] and str(tmp_path / "evaluation" / "report.html") in lines[0]
    assert lines[-1].split()[:2] == ["review", "page"] and str(page) in lines[-1] and "sub-002" in lines[-1]


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
