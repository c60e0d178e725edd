"""How long a 40-lesion scan's review page takes to write and how large it is (issue 15).

A synthetic scan at the demo's geometry (160 x 160 x 40 voxels of 0.75 x 0.75 x 3 mm) with exactly 40 lesions
(the first subject number of a cohort drawn with more lesions per subject that has 40), a lesion TSV like
``qsmrim predict`` writes (real centroids and volumes, seeded made-up probabilities, a ``review`` column), then
the page as predict makes it: ``render_thumbnails`` for every lesion and ``write_review_page``. Loading the NIfTI
files and running the model are not part of it (they are the same with or without a page). Optionally the
page is opened in headless Chromium (``--browser``) to time what a reader waits for.

    .venv/bin/python bench/review_page.py [--lesions 40] [--repeat 3] [--browser] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from qsmrim.data import SubjectVolumes, SynthConfig
from qsmrim.data.lesions import lesion_rows
from qsmrim.data.synth import synthesize_subject
from qsmrim.review import render_thumbnails, write_review_page


def scan_with(n_lesions: int, seed: int = 0) -> SubjectVolumes:
    cfg = SynthConfig(mean_rim_neg_lesions=n_lesions)
    for number in range(1, 500):
        qsm, flair, inst, truth = synthesize_subject(cfg, seed, number)[:4]
        if len(np.unique(inst)) - 1 == n_lesions:
            affine = np.diag([*cfg.spacing, 1.0])
            return SubjectVolumes(f"{number:03d}", qsm, flair, inst, affine, {t.index: t.rim for t in truth})
    raise SystemExit(f"no synthetic subject with exactly {n_lesions} lesions in 500 draws")


def lesion_tsv(vol: SubjectVolumes, folder: Path) -> Path:
    rows = pd.DataFrame(lesion_rows(vol))
    rng = np.random.default_rng(0)
    prob = rng.beta(0.6, 3.0, len(rows)).round(4)
    table = pd.DataFrame({"index": rows["lesion"], **{f"centroid_mm_{a}": rows[f"centroid_mm_{a}"] for a in "xyz"},
                          "volume_mm3": rows["volume_mm3"], "prob": prob, "votes": np.round(prob * 15).astype(int),
                          "spread": rng.uniform(0, 0.2, len(rows)).round(4), "rim": (prob > 0.5).astype(int),
                          "review": (prob >= 0.1).astype(int)})  # fmt: skip
    tsv = folder / f"sub-{vol.subject}" / "anat" / f"sub-{vol.subject}_desc-rim_lesions.tsv"
    tsv.parent.mkdir(parents=True)
    table.to_csv(tsv, sep="\t", index=False)
    return tsv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lesions", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--browser", action="store_true", help="also time headless Chromium opening the page")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    vol = scan_with(args.lesions)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tsv = lesion_tsv(vol, out)
        thumbs_s, page_s = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            thumbs = render_thumbnails(vol)
            t1 = time.perf_counter()
            page = write_review_page(tsv, thumbs, out, n_members=15, thresholds={"screening": 0.1})
            t2 = time.perf_counter()
            thumbs_s.append(t1 - t0)
            page_s.append(t2 - t1)
        sizes = [len(p) for p in thumbs.values()]
        result = {
            "scan": f"sub-{vol.subject}", "lesions": len(thumbs), "volume_shape": list(vol.qsm.shape),
            "thumbnails_s_median": statistics.median(thumbs_s), "html_s_median": statistics.median(page_s),
            "total_s_median": statistics.median(a + b for a, b in zip(thumbs_s, page_s, strict=True)),
            "per_lesion_ms": 1000 * statistics.median(thumbs_s) / len(thumbs),
            "page_bytes": page.stat().st_size, "thumbnail_bytes_mean": float(np.mean(sizes)),
            "thumbnail_bytes_max": max(sizes), "repeat": args.repeat,
        }  # fmt: skip
        chromium = shutil.which("chromium-headless-shell")
        if args.browser and chromium:
            runs = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                subprocess.run([chromium, "--no-sandbox", "--disable-gpu", f"--user-data-dir={out / 'profile'}",
                                f"--screenshot={out / 'shot.png'}", "--window-size=1200,2000", page.as_uri()],
                               capture_output=True, check=True, timeout=120)  # fmt: skip
                runs.append(time.perf_counter() - t0)
            result["chromium_screenshot_s_median"] = statistics.median(runs)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
