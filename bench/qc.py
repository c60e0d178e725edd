"""What QSM input QC costs next to the rest of a scan's preprocessing (issue 15).

Per scan of a synthetic cohort: ``load_subject`` (read + validate), ``run_qc`` (the six qc_* checks) and
``prepare_volumes`` (lesion rows, patches, 527 radiomic features per lesion), each timed once; also the
QC values, to show how far a clean cohort sits from each limit.

    .venv/bin/python -m bench.qc --subjects 4 --shape 160 160 40   # -m: bench/radiomics.py would shadow pyradiomics
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=(160, 160, 40))
    p.add_argument("--root", type=Path, help="an existing BIDS root instead of a synthetic one")
    args = p.parse_args()

    from qsmrim.data import discover_cohort, load_subject, synthesize_cohort
    from qsmrim.data.qc import QC_CHECKS, run_qc
    from serving.preprocess import prepare_volumes

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or synthesize_cohort(Path(tmp) / "c", args.subjects, seed=0, shape=tuple(args.shape))
        times: dict[str, list[float]] = {"load": [], "qc": [], "prepare": []}
        values: dict[str, list[float]] = {c: [] for c in QC_CHECKS}
        n_lesions = []
        for files in discover_cohort(root).subjects:
            t0 = time.perf_counter()
            vol = load_subject(files)
            t1 = time.perf_counter()
            report = run_qc(vol)
            t2 = time.perf_counter()
            prepare_volumes(vol)
            t3 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[key].append(dt)
            for c in report.checks:
                values[c.name].append(np.nan if c.value is None else c.value)
            n_lesions.append(len(vol.lesion_indices))
            print(f"sub-{files.subject}: {n_lesions[-1]} lesions, load {t1 - t0:.2f} s, qc {t2 - t1:.2f} s, "
                  f"prepare {t3 - t2:.2f} s, flags {report.flags or 'none'}")  # fmt: skip
    qc, prep = np.array(times["qc"]), np.array(times["prepare"])
    print(f"median per scan: load {np.median(times['load']):.2f} s, qc {np.median(qc):.2f} s, "
          f"prepare {np.median(prep):.2f} s; qc / prepare {np.median(qc / prep):.3f}")  # fmt: skip
    for name, v in values.items():
        print(f"{name}: {np.nanmin(v):.4g} .. {np.nanmax(v):.4g}")


if __name__ == "__main__":
    main()
