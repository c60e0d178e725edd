"""Finding a BIDS root's scans: qsmrim's own parser against pybids (the decision in docs/data.md).

Writes a session cohort (``qsmrim synth --sessions``, small volumes: only names matter), then times
``qsmrim.data.discover_cohort`` in this process and, when ``--pybids-python`` names an interpreter with pybids
installed (kept out of the project's environment), ``import bids``, ``from bids import BIDSLayout`` and
``BIDSLayout(root, derivatives=True, validate=False)`` in fresh processes of that interpreter, after importing the
libraries qsmrim.data imports anyway (numpy, pandas, nibabel, scipy), so the figure is what pybids adds.

    .venv/bin/python bench/bids_discovery.py --subjects 12 --sessions 2 --pybids-python /tmp/pybids_venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

_PYBIDS = """
import json, sys, time
t = time.perf_counter(); import numpy, pandas, nibabel, scipy.ndimage; t0 = time.perf_counter()
import bids; t1 = time.perf_counter()
from bids import BIDSLayout; t2 = time.perf_counter()
layout = BIDSLayout(sys.argv[1], derivatives=True, validate=False); t3 = time.perf_counter()
n = len(layout.get(suffix="Chimap", extension=[".nii", ".nii.gz"], return_type="filename"))
print(json.dumps({"import_numpy_pandas_nibabel_scipy_s": t0 - t, "import_bids_after_those_s": t1 - t0, "import_layout_s": t2 - t0, "index_s": t3 - t2, "chimap": n,
                  "version": bids.__version__}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=12)
    p.add_argument("--sessions", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pybids-python", help="an interpreter with pybids installed")
    args = p.parse_args()

    from qsmrim.data import discover_cohort, synthesize_cohort

    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize_cohort(Path(tmp) / "bids", args.subjects, 0, shape=(32, 32, 8), sessions=args.sessions)
        ours = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            n = len(discover_cohort(root))
            ours.append(time.perf_counter() - t)
        result: dict = {"scans": n, "qsmrim_discover_s": ours}
        if args.pybids_python:
            runs = [json.loads(subprocess.run([args.pybids_python, "-c", _PYBIDS, str(root)], capture_output=True,
                                              text=True, check=True).stdout) for _ in range(args.repeat)]  # fmt: skip
            result["pybids"] = runs
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
