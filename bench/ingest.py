"""Cohort preparation: validation + lesion table + patch cache, reading every NIfTI twice against once.

Synthesizes a cohort (default 8 subjects of 160x160x40, paper voxel size), then times
``qsmrim.prepare.prepare_cohort`` from an empty folder each time, in the same run: as it is (patches cut
while validation holds the volumes) and with that switched off (the patch cache reads every subject
again). Reports lesions/s and the ratio.

    python bench/ingest.py --subjects 8 --repeats 2 --json bench/results/ingest_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from qsmrim.config import load_config
    from qsmrim.data import synthesize_cohort
    from qsmrim.prepare import prepare_cohort

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = synthesize_cohort(tmp / "cohort", args.subjects, seed=0, shape=(160, 160, 40))
        cfg = load_config(REPO / "platform/experiments/ci.yaml", {"data.root": str(root)})
        rows = {"two_pass_s": [], "one_pass_s": []}
        n = 0
        import qsmrim.prepare as pipeline

        validate = pipeline.validate_cohort
        two_pass = lambda root, progress=False, on_subject=None: validate(root, progress=progress)  # noqa: E731
        for _ in range(args.repeats):
            for label, check in (("two_pass_s", two_pass), ("one_pass_s", validate)):
                pipeline.validate_cohort = check  # two passes: validation cuts no patches
                out = tmp / label
                t = time.perf_counter()
                res = prepare_cohort(cfg, out)
                rows[label].append(time.perf_counter() - t)
                n = int(res.summary["patches"]["shape"][0])
                shutil.rmtree(out)
        pipeline.validate_cohort = validate
    best = {k: min(v) for k, v in rows.items()}
    res = {"subjects": args.subjects, "lesions": n, **rows, "two_pass_lesions_per_s": n / best["two_pass_s"],
           "one_pass_lesions_per_s": n / best["one_pass_s"], "ratio": best["two_pass_s"] / best["one_pass_s"]}  # fmt: skip
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
