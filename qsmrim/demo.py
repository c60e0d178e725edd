"""The main job of ``make demo``: the whole pipeline on the embedded synthetic cohort, then one prediction
served over HTTP by the Ray Serve app (real request to 127.0.0.1, real ONNX ensemble)."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsmrim.config import ExperimentConfig

if TYPE_CHECKING:
    from qsmrim.data import SubjectFiles

__all__ = ["run_demo", "served_prediction"]

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def served_prediction(model: str, qsm: Path, flair: Path, lesions: Path, *, host: str = "127.0.0.1",
                      port: int | None = None, timeout_s: float = 300.0,
                      keep_serving: bool = False) -> dict[str, Any]:  # fmt: skip
    """Start the Serve app on ``model``, POST one subject to ``/v1/predict``, shut it down; return the JSON.

    With ``keep_serving`` the app stays up (printing its address) until Ctrl-C.
    """
    import httpx
    import ray
    from ray import serve

    from serving.app import AppArgs, build_app

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    port = port or _free_port(host)
    if not log.isEnabledFor(logging.INFO):  # the demo prints its own summary; Serve's start-up lines only with -v
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port},
                logging_config={"log_level": "INFO" if log.isEnabledFor(logging.INFO) else "WARNING"})
    try:
        serve.run(build_app(AppArgs(model=str(model))), name="qsmrim-demo", route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Serve app at {url} did not become healthy in {timeout_s:.0f} s")
            time.sleep(0.5)
        files = {name: (p.name, p.read_bytes(), "application/gzip") for name, p in
                 (("qsm", qsm), ("flair", flair), ("lesions", lesions))}  # fmt: skip
        r = httpx.post(f"{url}/v1/predict", files=files, timeout=timeout_s)
        r.raise_for_status()
        answer = {"url": f"{url}/v1/predict", **r.json()}
        if keep_serving:
            log.warning("serving %s at %s (docs: %s/docs); Ctrl-C to stop", model, url, url)
            try:
                while True:
                    time.sleep(1.0)
            except KeyboardInterrupt:
                pass
        return answer
    finally:
        serve.shutdown()


#: The held-out subject the demo sends shows at least this many rim+ lesions (so a reader sees them ranked).
HELD_OUT_MIN_RIM = 2


def held_out_subject(cfg: ExperimentConfig, run: Path):
    """One synthetic subject that is in no fold of the demo cohort: the first subject number after the cohort's
    (same seed) with at least :data:`HELD_OUT_MIN_RIM` rim+ lesions, so the served answer has some to rank."""
    from qsmrim.data import SynthConfig, discover_cohort
    from qsmrim.data.synth import synthesize_subject
    from qsmrim.pipeline import synthesize_once

    synth = SynthConfig(shape=cfg.data.synth_shape, difficulty=cfg.data.synth_difficulty)
    first = cfg.data.synth_subjects + 1
    number = next((n for n in range(first, first + 50)
                   if sum(t.rim for t in synthesize_subject(synth, cfg.data.synth_seed, n)[3]) >= HELD_OUT_MIN_RIM), first)  # fmt: skip
    root = synthesize_once(run / "heldout", 1, cfg.data.synth_seed, synth, first_subject=number)
    subjects = discover_cohort(root).subjects  # an earlier demo may have left another held-out subject here
    return next((s for s in subjects if s.subject.removeprefix("sub-") == f"{number:03d}"), subjects[0])


def run_demo(cfg: ExperimentConfig, run_dir: str | Path | None = None, *, keep_serving: bool = False,
             tracking_uri: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Pipeline (data -> features -> grid -> evaluation -> ONNX -> registry in ``tracking_uri``) and one served
    prediction of a held-out subject (a user's BIDS root is used as it is: its first subject is sent)."""
    from qsmrim.data import discover_cohort
    from qsmrim.pipeline import run_pipeline

    t0 = time.perf_counter()
    summary = run_pipeline(cfg, run_dir, tracking_uri=tracking_uri)
    if summary["grid"]["errors"]:
        return summary
    run = Path(summary["run_dir"])
    if cfg.data.root:
        subject = discover_cohort(cfg.data.root, lesions=cfg.data.lesion_source()).subjects[0]
    else:
        subject = held_out_subject(cfg, run)
    model = summary["export"]["onnx"]
    import ray

    if ray.is_initialized():
        # Serve on a fresh Ray: the grid's can keep its Train placement groups after the trials end (measured: 0.02
        # of 2 CPUs free for 13 min), and the Serve replicas then wait for CPUs forever.
        ray.shutdown()
    summary["served"] = served_prediction(Path(model), subject.qsm, subject.flair, subject.lesions,
                                          keep_serving=keep_serving)  # fmt: skip
    summary["served"]["subject"] = subject.subject
    if subject.labels is not None:  # the expert's (for the synthetic cohort: the generator's) label per lesion
        from qsmrim.data.cohort import read_labels

        labels, _problems = read_labels(subject.labels)
        summary["served"]["expert"] = {int(k): v for k, v in labels.items()}
    summary["review_page"] = str(review_page(Path(model), subject, run / "predictions"))
    summary["seconds"] = time.perf_counter() - t0
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def review_page(model: Path, subject: SubjectFiles, out_dir: Path) -> Path:
    """``qsmrim predict`` of the demo's scan into ``out_dir`` (BIDS derivatives); returns its review page.

    The scan's ``sub-<label>`` folder is predicted (every session of that subject); a manifest's scan, whose
    files sit anywhere, is predicted with the rest of its folder's cohort. ``out_dir`` is emptied first: it
    belongs to the demo, and a retrained model may not write into a folder of the previous one.
    """
    import shutil

    from qsmrim.review import page_path
    from serving.predict import predict_dataset

    source = next((p for p in subject.qsm.parents if p.name == f"sub-{subject.participant}"), subject.qsm.parent)
    shutil.rmtree(out_dir, ignore_errors=True)
    result = predict_dataset(model, source, out_dir)
    page = page_path(out_dir, subject.subject)
    if not page.exists():
        raise RuntimeError(f"qsmrim predict wrote no review page for sub-{subject.subject} into {out_dir}: "
                           f"{[str(p) for p in result.problems]}")  # fmt: skip
    return page


def closing_lines(summary: dict[str, Any]) -> list[str]:
    """What the demo prints last: where the CV report with its gallery and the scan's review page are."""
    run = Path(summary["run_dir"])
    lines = [f"  CV report      {run / 'evaluation' / 'report.html'} (tables, lesion gallery, errors, review queue)"]
    if summary.get("review_page"):
        scan = summary.get("served", {}).get("subject", "")
        lines.append(f"  review page    {summary['review_page']} (held-out sub-{scan}, lesions in review order)")
    return lines
