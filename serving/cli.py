"""``qsmrim serve`` and ``qsmrim predict``: argument parsers and their thin command functions.

``qsmrim/cli.py`` adds these with :func:`add_serve_parser` and :func:`add_predict_parser`; each command
parses its arguments and calls one function (:func:`serve_forever`, :func:`serving.predict.predict_dataset`).
Ray is imported only by ``serve``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path
from typing import Any

from qsmrim.console import add_lesion_source_args
from qsmrim.data.qc import QC_POLICIES

__all__ = [
    "DEFAULT_SERVE_CONFIG",
    "LOCAL_RAY_OPTIONS",
    "add_predict_parser",
    "add_serve_parser",
    "cmd_predict",
    "cmd_serve",
    "load_serve_config",
    "serve_forever",
]

log = logging.getLogger(__name__)

DEFAULT_SERVE_CONFIG = Path("platform/serve.yaml")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
_DEPLOYMENT_KEYS = {"ingress": "Ingress", "preprocess": "Preprocess", "ensemble": "RimEnsemble"}

LOCAL_RAY_OPTIONS: dict[str, Any] = {"include_dashboard": False, "dashboard_host": "127.0.0.1"}
"""``ray.init`` options when ``qsmrim serve`` starts its own Ray: no dashboard, so no job-submission API
(which runs any code sent to it) and no REST API; were one started, it would bind loopback only.
Ray 2.60 has no option to bind its GCS, raylet and agent gRPC ports to loopback (``_node_ip_address``
"127.0.0.1" is replaced by the node's address); they use Ray's token authentication (on by default since
2.5x). serving/README.md lists what listens where."""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve``: start Ray Serve with the HTTP API and block until Ctrl-C."""
    s = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP with Ray Serve (blocks; Ctrl-C stops)",
        description="Start the Ray Serve application of platform/serve.yaml (routes: POST /v1/predict, "
        "POST /v1/predict/lesions, GET /healthz, GET /v1/model, docs at /docs). Binds to loopback by default.",
    )
    s.add_argument("--model", help="local .onnx path or models:/<name>@<alias> (default: the config's model)")
    s.add_argument("--host", help=f"bind address (default: the config's, else {DEFAULT_HOST})")
    s.add_argument("--port", type=int, help=f"port (default: the config's, else {DEFAULT_PORT})")
    s.add_argument(
        "--config", type=Path, help=f"Ray Serve config YAML (default {DEFAULT_SERVE_CONFIG} if present)"
    )
    s.add_argument("--tracking-uri", help="MLflow store of a models:/ URI (default: the config's args.tracking_uri, "
                   "else $MLFLOW_TRACKING_URI, else sqlite:///<current folder>/mlruns.db, where grid and export write)")  # fmt: skip
    s.add_argument("--precision", choices=("auto", "fp32", "fp16", "int8"),
                   help="which graph to serve (default: the config's args.precision, else auto = the model as given): "
                   "int8 for CPU-only nodes, fp16 for GPUs; a local model.onnx serves model.<precision>.onnx beside it")  # fmt: skip
    _add_review_args(s, "the config's args, else ")
    s.set_defaults(func=cmd_serve)
    return s


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``predict``: offline inference to a BIDS-derivatives dataset, without Ray."""
    s = subparsers.add_parser(
        "predict",
        help="predict rim+ lesions of a BIDS root, manifest or subject; write BIDS derivatives",
        description="Offline inference with the same preprocessing and ONNX model as the HTTP service; no Ray.",
    )
    s.add_argument(
        "source", metavar="ROOT|SUBJECT",
        help="BIDS root, CSV manifest, or a sub-<id> (or sub-<id>/ses-<id>) folder of a BIDS root",
    )
    s.add_argument("--model", required=True, help="local .onnx path or models:/<name>@<alias>")
    s.add_argument("--out", required=True, type=Path, help="derivatives folder, e.g. ROOT/derivatives/qsmrim")
    s.add_argument("--providers", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime execution provider (auto: CUDA when usable, else CPU)")  # fmt: skip
    s.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    s.add_argument("--tracking-uri", help="MLflow store of a models:/ URI (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///<current folder>/mlruns.db)")  # fmt: skip
    add_lesion_source_args(s)
    _add_review_args(s, "")
    s.set_defaults(func=cmd_predict)
    return s


def _add_review_args(s: argparse.ArgumentParser, default_from: str) -> None:
    """``--screening-threshold`` and ``--qc``, the same for ``serve`` and ``predict``."""
    s.add_argument("--screening-threshold", type=_probability, metavar="P",
                   help="flag lesions with prob >= P for review, instead of the model's screening threshold (CV's "
                   f"high-sensitivity point; default: {default_from}the model's)")  # fmt: skip
    s.add_argument("--qc", choices=QC_POLICIES, default=None,
                   help=f"QSM input QC: warn reports qc_* flags and predicts; strict refuses flagged scans "
                   f"(default: {default_from}warn)")  # fmt: skip


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], not {text}")
    return value


def cmd_predict(args: argparse.Namespace) -> int:
    """Run :func:`serving.predict.predict_dataset`; print one line per subject and every problem."""
    from qsmrim.console import lesion_source
    from qsmrim.tracking.mlflow_runs import resolve_tracking_uri
    from serving.predict import predict_dataset

    result = predict_dataset(
        args.model, args.source, args.out, providers=args.providers, threads=args.threads,
        tracking_uri=resolve_tracking_uri(args.tracking_uri), lesions=lesion_source(args),
        qc=args.qc or "warn", screening_threshold=args.screening_threshold,
    )  # fmt: skip
    for r in result.subjects:
        expert = f", expert {r.n_rim_expert}" if r.n_rim_expert is not None else ""
        qc = f"; QC flags: {', '.join(r.qc_flags)}" if r.qc_flags else ""
        print(f"  sub-{r.subject}: {r.n_lesions} lesion(s), {r.n_rim} predicted rim+{expert}, "
              f"{r.n_review} to review{qc}")  # fmt: skip
    print(f"wrote {len(result.subjects)} scan(s) to {result.out_dir}")
    if result.problems:
        from qsmrim.console import print_problems

        print_problems(result.problems, outcome="these subjects were not predicted")
        return 1
    return 0


def load_serve_config(path: Path | None) -> dict[str, Any]:
    """The Serve config (``serve deploy`` format); ``{}`` when no path is given and the default is absent."""
    import yaml

    if path is None:
        if not DEFAULT_SERVE_CONFIG.is_file():
            return {}
        path = DEFAULT_SERVE_CONFIG
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such Serve config")
    doc = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("applications", []), list):
        raise ValueError(f"{path}: expected a Ray Serve config with an 'applications:' list")
    return doc


def app_args_from_config(
    config: dict[str, Any], model: str | None = None, overrides: dict[str, Any] | None = None
) -> tuple[Any, str, str]:
    """``AppArgs`` of the config's first application with its ``deployments:`` overrides merged in.

    ``serve deploy`` applies a ``deployments:`` entry on top of what the builder set; this does the same for
    ``qsmrim serve`` so both ways of starting the app get the same replicas, resources and batching.
    ``overrides`` are args set by command-line flags (None = not given); they win over the file and are
    recorded in ``set_on_cli`` so answers say a value came from the CLI. Returns the args, the application
    name and its route prefix.
    """
    from serving.config import AppArgs

    apps = config.get("applications") or [{}]
    app_cfg = apps[0]
    raw: dict[str, Any] = dict(app_cfg.get("args") or {})
    if model:
        raw["model"] = model
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        raw.update(given, set_on_cli=sorted(given))
    for dep in app_cfg.get("deployments") or []:
        key = {v: k for k, v in _DEPLOYMENT_KEYS.items()}.get(dep.get("name"))
        if key is None:
            raise ValueError(
                f"unknown deployment {dep.get('name')!r}; expected one of {sorted(_DEPLOYMENT_KEYS.values())}"
            )
        knobs = dict(raw.get(key) or {})
        for opt in ("num_replicas", "autoscaling_config", "max_ongoing_requests"):
            if opt in dep:
                knobs[opt] = dep[opt]
        if "autoscaling_config" in dep and "num_replicas" not in dep:
            knobs.pop("num_replicas", None)
        actor = dep.get("ray_actor_options") or {}
        for opt in ("num_cpus", "num_gpus"):
            if opt in actor:
                knobs[opt] = actor[opt]
        raw[key] = knobs
        if key == "ensemble" and dep.get("user_config"):
            raw["batching"] = {**(raw.get("batching") or {}), **dep["user_config"]}
    return AppArgs.model_validate(raw), app_cfg.get("name", "qsmrim"), app_cfg.get("route_prefix", "/")


def serve_forever(
    app_args: Any,
    *,
    host: str,
    port: int,
    name: str = "qsmrim",
    route_prefix: str = "/",
    http_options: dict[str, Any] | None = None,
) -> None:
    """Start (or join, with ``RAY_ADDRESS``) Ray, run the app on ``host:port`` and block until SIGINT/SIGTERM.

    ``http_options`` are further Serve HTTP options from the config (e.g. ``request_timeout_s``).
    """
    import os

    import ray
    from ray import serve

    from serving.app import build_app

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    started_ray = not ray.is_initialized()
    if started_ray:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({} if address else LOCAL_RAY_OPTIONS))
    # after ray.init, which installs its own SIGTERM exit; SIGINT too, in case a launcher started us ignoring it
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        serve.start(http_options={**(http_options or {}), "host": host, "port": port})
        serve.run(build_app(app_args), name=name, route_prefix=route_prefix, blocking=False)
        url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
        print(f"serving {app_args.model} at {url} (docs: {url}/docs); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    """Resolve config, model, host and port (flag > config > default) and call :func:`serve_forever`."""
    config = load_serve_config(args.config)
    source = args.config or (DEFAULT_SERVE_CONFIG if config else "built-in defaults")
    app_args, name, prefix = app_args_from_config(
        config, args.model, {"screening_threshold": args.screening_threshold, "qc": args.qc,
                             "precision": args.precision},
    )  # fmt: skip
    if app_args.model.startswith("models:/"):  # the store grid and export wrote, not MLflow's own default
        from qsmrim.tracking.mlflow_runs import resolve_tracking_uri

        uri = resolve_tracking_uri(args.tracking_uri or app_args.tracking_uri)
        app_args = app_args.model_copy(update={"tracking_uri": uri})
    print(f"config: {source}; model: {app_args.model}"
          + (f" from {app_args.tracking_uri}" if app_args.tracking_uri else ""), flush=True)  # fmt: skip
    http = config.get("http_options") or {}
    host = args.host or http.get("host") or DEFAULT_HOST
    port = args.port or int(http.get("port") or DEFAULT_PORT)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s exposes the API beyond this machine; it has no authentication", host)
    serve_forever(app_args, host=host, port=port, name=name, route_prefix=prefix, http_options=http)
    return 0
