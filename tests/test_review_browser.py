"""The CV report and a review page as a reader sees them: rendered by headless Chromium, offline.

Each page is copied alone into an empty folder (so anything it needed beside it would be missing) with a
small checker script appended that, once the page has loaded, writes into the DOM how many images it holds,
which did not decode (``naturalWidth == 0``) and every resource the page fetched (Resource Timing; ``data:``
URIs are not fetches). Chromium dumps that DOM (``--dump-dom``) while its network log
(``--log-net-log``) records every URL request; a second run takes a screenshot that must not be blank.
``test_browser_check_catches_an_external_image`` proves the checks fail on a page that breaks the rule.

Needs the Debian package ``chromium-headless-shell`` (``.ci/install-system-deps.sh`` installs it); without it
these tests fail and say what to install.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from review_fixtures import toy_lesion_tsv, toy_run

from qsmrim.data import discover_cohort
from qsmrim.data.cohort import load_subject
from qsmrim.review import render_thumbnails, write_index_page, write_review_page
from qsmrim.training.evaluate_run import evaluate_run

CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser")
INSTALL = "install chromium-headless-shell (apt-get install chromium-headless-shell)"
TIMEOUT_S = 60

_CHECKER = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = document.createElement('pre');
  out.id = 'qsmrim-check';
  out.textContent = JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
    fetched: performance.getEntriesByType('resource').map(e => e.name),
  });
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"no headless Chromium on PATH: {INSTALL}")


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           "--virtual-time-budget=5000", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def browse(page: Path, tmp: Path) -> dict:
    """Load ``page`` alone in Chromium; return the checker's findings, the URLs of the network log and the
    screenshot as a grey array."""
    tmp.mkdir(parents=True, exist_ok=True)
    alone = tmp / "alone" / page.name
    alone.parent.mkdir()
    text = page.read_text(encoding="utf-8")
    assert text.count("</body>") == 1, f"{page}: no single </body>"
    alone.write_text(text.replace("</body>", _CHECKER + "</body>"), encoding="utf-8")
    net = tmp / "net.json"
    res = _run([f"--log-net-log={net}", "--dump-dom", alone.as_uri()], tmp)
    m = re.search(r'<pre id="qsmrim-check">(.*?)</pre>', res.stdout, re.S)
    assert m, f"Chromium did not run the page's load event (rc {res.returncode}): {res.stderr[-2000:]}"
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    events = json.loads(net.read_text())["events"]
    found["net_urls"] = sorted({e["params"]["url"] for e in events if "url" in e.get("params", {})})
    shot = tmp / "shot.png"
    res = _run([f"--screenshot={shot}", "--window-size=1200,1600", alone.as_uri()], tmp)
    assert shot.exists(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    found["screenshot"] = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"))
    return found


def _assert_seen(found: dict, min_images: int) -> None:
    assert found["broken"] == [], f"images that did not load: {found['broken']}"
    assert found["images"] >= min_images
    assert found["fetched"] == [], f"the page fetched {found['fetched']}"
    remote = [u for u in found["net_urls"] if not u.startswith(("file:", "data:"))]
    assert remote == [], f"network requests: {remote}"
    grey = found["screenshot"]
    assert grey.std() > 20, "the screenshot is blank"
    assert (grey < 200).mean() > 0.01, "the screenshot is almost all white"  # text and tables: a few %


@pytest.fixture(scope="module")
def report(tmp_path_factory, synth_root) -> Path:
    run = toy_run(tmp_path_factory.mktemp("browser-run"), synth_root)
    evaluate_run(run)
    return run / "evaluation" / "report.html"


@pytest.fixture(scope="module")
def review(tmp_path_factory, synth_root) -> Path:
    """A review page of the first synthetic subject with its real thumbnails and a QC sidecar."""
    vol = load_subject(discover_cohort(synth_root).subjects[0])
    out = tmp_path_factory.mktemp("browser-review")
    tsv = toy_lesion_tsv(out / f"sub-{vol.subject}" / "anat", vol.subject, n=len(vol.lesion_indices),
                         qc={"qc_confluent": {"value": 2, "flag": True}})  # fmt: skip
    assert vol.lesion_indices == list(range(1, len(vol.lesion_indices) + 1))
    page = write_review_page(tsv, render_thumbnails(vol), out, n_members=15)
    write_index_page(out)
    return page


def test_browser_renders_the_cv_report_offline(report, tmp_path):
    """Check the CV report in Chromium: every figure and thumbnail decodes, nothing is fetched, not blank."""
    found = browse(report, tmp_path)
    _assert_seen(found, min_images=4 + 4)  # 4 figures, at least the 4 gallery thumbnails


def test_browser_renders_a_review_page_offline(review, tmp_path):
    """Check a review page in Chromium: one thumbnail per lesion decodes, nothing is fetched, not blank."""
    found = browse(review, tmp_path)
    n_lesions = review.read_text().count('id="lesion-')
    _assert_seen(found, min_images=n_lesions)
    assert found["images"] == n_lesions


def test_browser_renders_the_index_page_offline(review, tmp_path):
    """Check the cohort index loads without any request (it holds links, no images)."""
    found = browse(review.parent / "index.html", tmp_path)
    assert found["fetched"] == [] and found["broken"] == []
    assert [u for u in found["net_urls"] if not u.startswith(("file:", "data:"))] == []


def test_browser_check_catches_an_external_image(review, tmp_path):
    """Check the checks can fail: a page with an image by URL shows it as fetched, broken and in the net log."""
    bad = tmp_path / "bad.html"
    bad.write_text(review.read_text().replace("</body>", '<img alt="remote" src="http://192.0.2.1/x.png"></body>'))
    found = browse(bad, tmp_path / "b")
    assert "remote" in found["broken"]
    assert found["fetched"] == ["http://192.0.2.1/x.png"]
    assert "http://192.0.2.1/x.png" in found["net_urls"]
