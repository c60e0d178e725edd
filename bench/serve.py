"""Serving latency and throughput: Ray Serve over loopback HTTP vs a bare onnxruntime session (issue 8).

What is timed, one run:

* ``POST /v1/predict/lesions`` with one lesion (``.npz`` body and JSON), sequential: p50/p99 per request,
  and the same row through a bare ``InferenceSession.run`` in this process: Serve's overhead = difference.
* ``POST /v1/predict`` with a ~25-lesion synthetic subject (NIfTI trio, 160 x 160 x 40): p50/p99, and the
  same preprocessing + session in-process (``serving.preprocess.prepare_upload`` + ``RimModel.run``).
* ``GET /healthz`` (the same two Serve hops without a model run): Serve's floor on the same machine.
* Throughput at concurrency 16 (one lesion per request, ``@serve.batch`` on) in lesions/s, and bare
  onnxruntime on batches of 16.

The model is ``--model`` (any graph with the DESIGN section 5 interface) or, by default, the tests' tiny
ensemble (5 logistic members), which makes the figures Serve's own cost rather than the network's. A
paper-size ensemble adds its compute (FACTS.md: ~40 ms per member per lesion on 2 CPU cores).

Example::

    .venv/bin/python bench/serve.py --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Running as a script puts bench/ first on sys.path, where bench/radiomics.py would shadow pyradiomics.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def _row(name: str, serve_ms: list[float], bare_ms: list[float] | None) -> str:
    s50, s99 = _pct(serve_ms, 50), _pct(serve_ms, 99)
    if bare_ms is None:
        return f"| {name} | {s50:.1f} | {s99:.1f} | | | |"
    b50, b99 = _pct(bare_ms, 50), _pct(bare_ms, 99)
    return f"| {name} | {s50:.1f} | {s99:.1f} | {b50:.2f} | {b99:.2f} | {s50 - b50:.1f} |"


def _npz(patch: np.ndarray, radiomics: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, patch=patch, radiomics=radiomics)
    return buf.getvalue()


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="ONNX ensemble (default: build the tests' tiny ensemble)")
    p.add_argument("--requests", type=int, default=300, help="sequential single-lesion requests")
    p.add_argument("--subject-requests", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--results", type=Path, help="append a Markdown section to this file")
    args = p.parse_args()

    import httpx
    import nibabel as nib
    import ray
    from ray import serve

    sys.path.insert(0, str(REPO / "tests"))
    from test_serving_model import build_tiny_ensemble, cohort_arrays  # noqa: E402

    from qsmrim.data import discover_cohort, synthesize_cohort
    from serving.app import AppArgs, DeploymentArgs, build_app
    from serving.model import RimModel
    from serving.preprocess import SubjectUpload, prepare_upload

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="qsmrim-bench-"))  # removed at the end
    root = synthesize_cohort(tmp / "cohort", 4, seed=0)
    subjects = discover_cohort(root).subjects
    patch, radiomics = cohort_arrays(root)
    model_path = (
        Path(args.model)
        if args.model
        else build_tiny_ensemble(tmp / "model" / "model.onnx", patch, radiomics)
    )
    model = RimModel.load(model_path, providers="cpu")
    counts = {s.subject: len(np.unique(np.asarray(nib.load(str(s.lesions)).dataobj))) - 1 for s in subjects}
    sub = min(subjects, key=lambda s: abs(counts[s.subject] - 25))
    upload = SubjectUpload(sub.qsm.read_bytes(), sub.flair.read_bytes(), sub.lesions.read_bytes())
    files = {
        "qsm": ("q.nii.gz", upload.qsm),
        "flair": ("f.nii.gz", upload.flair),
        "lesions": ("l.nii.gz", upload.lesions),
    }

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = AppArgs(
        model=str(model_path),
        ingress=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=64),
        preprocess=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=4),
        ensemble=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=64),
    )
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    one = _npz(patch[:1], radiomics[:1])
    one_json = {
        "patch": patch[:1].tolist(),
        "radiomics": [[None if np.isnan(v) else float(v) for v in radiomics[0]]],
    }
    npz_headers = {"content-type": "application/x-npz"}
    feeds1 = {"patch": patch[:1], "radiomics": radiomics[:1]}

    def post_one() -> None:
        r = client.post("/v1/predict/lesions", content=one, headers=npz_headers)
        r.raise_for_status()

    for _ in range(20):
        post_one()
        model.session.run(None, feeds1)
    serve_one = _timed(post_one, args.requests)
    bare_one = _timed(lambda: model.session.run(None, feeds1), args.requests)
    serve_health = _timed(lambda: client.get("/healthz").raise_for_status(), args.requests // 3)
    serve_json = _timed(
        lambda: client.post("/v1/predict/lesions", json=one_json).raise_for_status(), args.requests // 3
    )
    client.post("/v1/predict", files=files).raise_for_status()
    serve_subject = _timed(
        lambda: client.post("/v1/predict", files=files).raise_for_status(), args.subject_requests
    )

    def bare_subject_run() -> None:
        prepared = prepare_upload(upload, model.info.patch_size)
        model.run(prepared.patch, prepared.radiomics)

    bare_subject = _timed(bare_subject_run, max(5, args.subject_requests // 2))

    total = args.concurrency * 25
    with ThreadPoolExecutor(args.concurrency) as pool:
        t = time.perf_counter()
        list(pool.map(lambda _: post_one(), range(total)))
        serve_tput = total / (time.perf_counter() - t)
    stats = client.get("/v1/model").json()["batch_stats"]
    feeds16 = {"patch": patch[: args.concurrency], "radiomics": radiomics[: args.concurrency]}
    t = time.perf_counter()
    for _ in range(25):
        model.session.run(None, feeds16)
    bare_tput = 25 * args.concurrency / (time.perf_counter() - t)
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    name = model.info.name if args.model else "tiny test ensemble (5 logistic members)"
    lines = [
        f"\n## Serving: Ray Serve HTTP vs bare onnxruntime (issue 8), {date}\n",
        f"Machine: {platform.node()} ({os.cpu_count()} CPU cores, {platform.python_version()}), CPU provider, "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after (shared machine: other engineers' "
        f"jobs ran too, so these are upper bounds). Model: {name}. Ray Serve on 127.0.0.1, deployments with 0.1 CPU "
        f"each, batching max_batch_size {app_args.batching.max_batch_size}, wait {app_args.batching.batch_wait_timeout_s} s.\n",
        f"Command: `.venv/bin/python bench/serve.py{' --model ' + args.model if args.model else ''} "
        f"--requests {args.requests} --subject-requests {args.subject_requests} --concurrency {args.concurrency}`\n",
        "| request (sequential) | Serve p50 ms | Serve p99 ms | bare p50 ms | bare p99 ms | overhead p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
        _row(f"`GET /healthz`: proxy -> Ingress -> RimEnsemble, no model run (n={args.requests // 3})", serve_health, None),
        _row(f"1 lesion, `.npz` body (n={args.requests})", serve_one, bare_one),
        _row(f"1 lesion, JSON body (n={args.requests // 3})", serve_json, bare_one),
        _row(f"subject, {counts[sub.subject]} lesions, NIfTI upload (n={args.subject_requests}; bare = "
             "same preprocessing + session in-process)", serve_subject, bare_subject),
        "",
        f"Throughput, 1 lesion per request at concurrency {args.concurrency}: **{serve_tput:.0f} lesions/s** through "
        f"Serve ({stats['requests']} requests in {stats['batches']} onnxruntime calls, largest batch "
        f"{stats['largest_batch']}); bare onnxruntime on batches of {args.concurrency}: {bare_tput:.0f} lesions/s.",
        "",
    ]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as fh:
            fh.write(text)
    print("median single-lesion serve latency:", statistics.median(serve_one) * 1e3, "ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
