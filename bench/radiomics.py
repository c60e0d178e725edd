"""Benchmark: qsmrim's radiomics fast path vs a default pyradiomics call, and Dask scaling 1 -> 2 workers.

    python bench/radiomics.py                        # synthesize a cohort in a temp dir, print a report
    python bench/radiomics.py --json out.json --record bench/RESULTS.md

Per core: for the same lesions, in the same process, interleaved lesion by lesion, the CPU time
(``time.process_time``, single-threaded BLAS) of

* the reference: ``RadiomicsFeatureExtractor.execute(image, mask)`` with pyradiomics defaults (Original +
  Wavelet, firstorder/glcm/glrlm/shape, bin width 25) on the whole image; the SimpleITK image is built
  once per subject, the mask per lesion;
* the fast path: ``LesionExtractor.extract`` on the subject's scaled image (median of ``--repeats`` runs);
* the fast path end to end: ``extract_subject`` (reading the NIfTI files included) per lesion.

Values are compared on every timed lesion (max relative difference; NaN must match NaN).

Scaling: ``extract_cohort`` on the whole cohort with a warm ``LocalCluster`` of 1, then 2 single-threaded
worker processes (cache off: a fresh output folder each run), wall time, best of ``--scaling-repeats``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

# This file is called radiomics.py: keep its folder off the import path so `import radiomics` finds pyradiomics.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core means one thread
    os.environ.setdefault(_var, "1")

import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    both = np.isfinite(a) & np.isfinite(b)
    diff, scale = np.abs(a[both] - b[both]), np.maximum(np.abs(a[both]), np.abs(b[both]))
    return float(np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0).max(initial=0.0))


def per_core(root: Path, max_lesions: int, repeats: int) -> dict:
    """Fast path vs default pyradiomics on the same lesions, CPU seconds per lesion."""
    import radiomics

    from qsmrim.data import discover_cohort, load_subject
    from qsmrim.radiomics import DEFAULT_SETTINGS, LesionExtractor, extract_subject
    from qsmrim.radiomics.extract import scale_qsm
    from qsmrim.radiomics.reference import default_extractor, to_sitk

    radiomics.setVerbosity(40)
    reference = default_extractor()
    fast = LesionExtractor.for_settings(DEFAULT_SETTINGS)
    from scipy import ndimage

    ref_cpu, fast_cpu, ref_wall, fast_wall, sizes = [], [], [], [], []
    worst, nan_mismatch, n_nan = 0.0, 0, 0
    e2e_cpu, e2e_lesions = 0.0, 0
    for files in discover_cohort(root).subjects:
        if len(ref_cpu) >= max_lesions:
            break
        t0 = time.process_time()
        table = extract_subject(files)
        e2e_cpu += time.process_time() - t0
        e2e_lesions += len(table)

        vol = load_subject(files)
        image = scale_qsm(vol.qsm)
        image_sitk = to_sitk(image, vol.spacing)
        boxes = ndimage.find_objects(vol.instances)
        for index in vol.lesion_indices:
            if len(ref_cpu) >= max_lesions:
                break
            mask = vol.instances == index
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                result = reference.execute(image_sitk, to_sitk(mask.astype(np.uint8), vol.spacing))
                ref = np.array([float(result[n]) for n in _names()])
            except ValueError:  # pyradiomics refuses 1-voxel / 1-D lesions
                ref = np.full(527, np.nan)
            ref_cpu.append(time.process_time() - c0)
            ref_wall.append(time.perf_counter() - w0)

            runs_cpu, runs_wall = [], []
            for _ in range(repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                box = boxes[index - 1]
                out = fast.extract(image, vol.instances[box] == index, vol.spacing, box)
                runs_cpu.append(time.process_time() - c0)
                runs_wall.append(time.perf_counter() - w0)
            fast_cpu.append(statistics.median(runs_cpu))
            fast_wall.append(statistics.median(runs_wall))
            sizes.append(int(mask.sum()))
            nan_mismatch += int(not np.array_equal(np.isnan(out.values), np.isnan(ref)))
            n_nan += int(out.status == "nan")
            worst = max(worst, _rel_diff(out.values, ref))
            row = table[table["lesion"] == index].iloc[0]
            worst = max(worst, _rel_diff(row[list(_names())].to_numpy(dtype=float), ref))
    n = len(ref_cpu)
    return {
        "lesions": n,
        "lesions_all_nan": n_nan,
        "lesion_voxels": {"min": min(sizes), "median": int(np.median(sizes)), "max": max(sizes)},
        "reference_cpu_s_per_lesion": sum(ref_cpu) / n,
        "fast_cpu_s_per_lesion": sum(fast_cpu) / n,
        "reference_wall_s_per_lesion": sum(ref_wall) / n,
        "fast_wall_s_per_lesion": sum(fast_wall) / n,
        "reference_lesions_per_s_per_core": n / sum(ref_cpu),
        "fast_lesions_per_s_per_core": n / sum(fast_cpu),
        "speedup_per_core": sum(ref_cpu) / sum(fast_cpu),
        "fast_end_to_end_cpu_s_per_lesion": e2e_cpu / e2e_lesions,
        "speedup_end_to_end": (sum(ref_cpu) / n) / (e2e_cpu / e2e_lesions),
        "max_rel_diff": worst,
        "nan_pattern_mismatches": nan_mismatch,
    }


def _names() -> tuple[str, ...]:
    from qsmrim.radiomics import FEATURE_NAMES

    return FEATURE_NAMES


def scaling(root: Path, repeats: int) -> dict:
    """Wall time of extract_cohort with a warm LocalCluster of 1 and of 2 workers."""
    from distributed import Client, LocalCluster

    from qsmrim.radiomics import extract_cohort

    out: dict = {}
    for workers in (1, 2):
        walls, startup = [], 0.0
        t0 = time.perf_counter()
        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            client.run(lambda: __import__("qsmrim.radiomics.cohort"))  # warm imports, as a long run would be
            startup = time.perf_counter() - t0
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    t1 = time.perf_counter()
                    result = extract_cohort(root, tmp, scheduler=client)
                    walls.append(time.perf_counter() - t1)
        out[f"workers_{workers}"] = {"wall_s": min(walls), "all_s": walls, "startup_s": startup, "lesions": result.n_lesions}
    t1, t2 = out["workers_1"]["wall_s"], out["workers_2"]["wall_s"]
    out["speedup_2_vs_1"] = t1 / t2
    out["efficiency_per_added_core"] = t1 / (2 * t2)
    out["lesions_per_s_2_workers"] = out["workers_2"]["lesions"] / t2
    return out


def _machine() -> dict:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "load_avg_start": os.getloadavg(),
    }


def _versions() -> dict:
    import dask
    import pywt
    import radiomics

    return {"pyradiomics": radiomics.__version__, "pywavelets": pywt.__version__, "numpy": np.__version__, "dask": dask.__version__}


def _markdown(report: dict, command: str) -> str:
    pc, sc, m = report["per_core"], report.get("scaling"), report["machine"]
    lines = [
        "",
        "## Radiomics (issue 4): fast path vs default pyradiomics, Dask scaling",
        "",
        f"- Date: {report['date']}; command: `{command}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; shared with other jobs "
        f"(load average {m['load_avg_start'][0]:.1f} at start, {report['load_avg_end'][0]:.1f} at end)",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- Cohort: {report['cohort']['subjects']} synthetic subjects, shape {tuple(report['cohort']['shape'])}, "
        f"0.75 x 0.75 x 3 mm, {report['cohort']['lesions']} lesions",
        "",
        f"Per core, same {pc['lesions']} lesions ({pc['lesion_voxels']['min']}-{pc['lesion_voxels']['max']} voxels, "
        f"median {pc['lesion_voxels']['median']}; {pc['lesions_all_nan']} all-NaN), interleaved, CPU time:",
        "",
        "| path | s / lesion | lesions / s / core |",
        "|---|---|---|",
        f"| default pyradiomics call, whole image | {pc['reference_cpu_s_per_lesion']:.3f} | "
        f"{pc['reference_lesions_per_s_per_core']:.2f} |",
        f"| qsmrim fast path (per lesion, image in memory) | {pc['fast_cpu_s_per_lesion']:.4f} | "
        f"{pc['fast_lesions_per_s_per_core']:.1f} |",
        f"| qsmrim `extract_subject` end to end (NIfTI read included) | {pc['fast_end_to_end_cpu_s_per_lesion']:.4f} | "
        f"{1 / pc['fast_end_to_end_cpu_s_per_lesion']:.1f} |",
        "",
        f"- **Speed-up per core: {pc['speedup_per_core']:.1f}x** (end to end incl. file reading "
        f"{pc['speedup_end_to_end']:.1f}x); values: max relative difference {pc['max_rel_diff']:.3g}, "
        f"NaN-pattern mismatches {pc['nan_pattern_mismatches']}.",
    ]
    if sc:
        w1, w2 = sc["workers_1"], sc["workers_2"]
        lesions = w2["lesions"]
        per_lesion_2 = w2["wall_s"] / lesions
        lines += [
            f"- Dask `extract_cohort`, warm LocalCluster, {lesions} lesions, best of {len(w1['all_s'])}: "
            f"1 worker {w1['wall_s']:.2f} s, 2 workers {w2['wall_s']:.2f} s -> speed-up {sc['speedup_2_vs_1']:.2f}x, "
            f"**efficiency {sc['efficiency_per_added_core']:.2f} per added core** "
            f"(cluster start-up {w1['startup_s']:.1f} s / {w2['startup_s']:.1f} s, not included).",
            f"- **4,000-lesion cohort (extrapolated** from the 2-worker rate {sc['lesions_per_s_2_workers']:.1f} lesions/s "
            f"on this 2-core machine): {4000 * per_lesion_2:.0f} s of features + ~{w2['startup_s']:.0f} s cluster start-up; "
            f"the default pyradiomics call would need {4000 * pc['reference_cpu_s_per_lesion'] / 2:.0f} s on 2 cores "
            f"(also extrapolated).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="existing BIDS root (default: synthesize one)")
    parser.add_argument("--subjects", type=int, default=10, help="synthetic subjects (default 10)")
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 40))
    parser.add_argument("--max-lesions", type=int, default=60, help="lesions timed against the reference")
    parser.add_argument("--repeats", type=int, default=3, help="fast-path runs per lesion (median)")
    parser.add_argument("--scaling-repeats", type=int, default=2)
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--record", type=Path, help="append a markdown section to this file (e.g. bench/RESULTS.md)")
    args = parser.parse_args(argv)

    report: dict = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": _machine(), "versions": _versions()}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from qsmrim.data import synthesize_cohort

            root = synthesize_cohort(Path(tmp) / "cohort", args.subjects, seed=0, shape=tuple(args.shape))
        from qsmrim.data import discover_cohort, load_subject

        cohort = discover_cohort(root)
        n_lesions = sum(len(load_subject(s).lesion_indices) for s in cohort.subjects)
        report["cohort"] = {"subjects": len(cohort.subjects), "shape": list(args.shape), "lesions": n_lesions}
        report["per_core"] = per_core(root, args.max_lesions, args.repeats)
        print(json.dumps(report["per_core"], indent=2), flush=True)
        if not args.no_scaling:
            report["scaling"] = scaling(root, args.scaling_repeats)
            print(json.dumps(report["scaling"], indent=2), flush=True)
    report["load_avg_end"] = os.getloadavg()
    command = "python bench/radiomics.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    text = _markdown(report, command.strip())
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.record:
        if not args.record.exists():
            args.record.write_text("# Benchmark results\n")
        with args.record.open("a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
