"""MLflow model registry for the exported ensemble: log, register, promote ``champion``, load (DESIGN §5).

* :func:`log_and_register` logs the ONNX graph with ``mlflow.onnx`` (signature, input example, the
  ``model.json`` sidecar, external weights carried with the graph), registers a version of ``qsmrim`` and
  tags it with what a consumer must check: feature names, patch spec, thresholds, config, git commit and the
  CV metrics (``cv_pr_auc``, ``cv_proc_auc``, ...).
* :func:`promote_champion` is the ONE place that moves the ``champion`` alias: only to a version whose CV
  PR AUC is at least the current champion's (``force=True`` overrides, and says so in its answer, a
  warning and a version tag).
* :func:`load_champion_session` downloads ``models:/qsmrim@champion`` and builds the onnxruntime session
  itself, choosing CUDA when installed and reporting the provider actually in use: MLflow's ONNX flavour can
  fall back to CPU silently (mlflow#13388). It first compares the sha256 of the downloaded graph (and its
  external weights) with the version's ``onnx_sha256`` (``onnx_data_sha256``) tags, recorded from the files
  exactly as stored, and refuses a mismatch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qsmrim.model_sidecar import file_sha256, read_sidecar, write_sidecar
from qsmrim.onnx_runtime import (
    CPU,
    DEFAULT_MAX_RIM_FLIP_SHARE,
    check_precision_parity,
    choose_providers,
    open_session,
    precision_of,
)

__all__ = [
    "CHAMPION_ALIAS",
    "DEFAULT_METRIC",
    "MODEL_NAME",
    "choose_providers",
    "describe_promotion",
    "load_champion_session",
    "log_and_register",
    "promote_champion",
]

log = logging.getLogger(__name__)

MODEL_NAME = "qsmrim"
CHAMPION_ALIAS = "champion"
DEFAULT_METRIC = "cv_pr_auc"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))/?$")


@contextlib.contextmanager
def _tracking(uri: str | None) -> Iterator[None]:
    """Use ``uri`` as tracking (and so registry) URI for the block; restore the caller's state afterwards.

    The environment is saved and restored by hand: MLflow's ``_use_tracking_uri`` helper deletes
    ``MLFLOW_TRACKING_URI`` when its block ends, so a later ``models:/`` load in the same process would
    silently fall back to a store in the working folder.
    """
    import os

    import mlflow

    from qsmrim.tracking.mlflow_runs import resolve_tracking_uri

    uri = resolve_tracking_uri(uri)  # never MLflow's own default (./mlflow.db): the store the grid wrote
    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if env is None else env
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    from qsmrim.tracking.mlflow_runs import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def log_and_register(
    onnx_path: str | Path,
    sidecar: str | Path | dict[str, Any],
    *,
    cv_metrics: dict[str, float | None],
    config: dict[str, Any],
    git_commit: str | None,
    name: str = MODEL_NAME,
    force: bool = False,
    tracking_uri: str | None = None,
    experiment: str = "qsmrim-models",
    artifact_location: str | None = None,
    promote: bool = True,
    max_rim_flip_share: float = DEFAULT_MAX_RIM_FLIP_SHARE,
) -> dict[str, Any]:
    """Log the graph in one MLflow run, register it as a version of ``name`` and (by default) promote it.

    Parameters
    ----------
    onnx_path : path
        The exported graph (its ``.onnx.data`` weights, if any, are read from beside it).
    sidecar : path or dict
        The ``model.json`` written by :func:`qsmrim.export.export_ensemble`.
    cv_metrics : dict
        Cross-validated metrics of this ensemble, e.g. ``{"cv_pr_auc": 0.71, "cv_proc_auc": 0.64}``; logged
        as run metrics and version tags. ``None``/NaN values are skipped.
    config : dict
        The resolved training config (logged as ``config.json`` and the version tag ``config``).
    git_commit : str or None
        Commit of the code that trained the run (tag ``git_commit``; ``unknown`` when None).
    name : str
        Registered model name.
    force : bool
        Promote even when the CV PR AUC is below the current champion's.
    tracking_uri : str, optional
        MLflow tracking/registry URI (a database-backed store); default: MLflow's current one.
    experiment : str
        Experiment of the logging run; created with ``artifact_location`` when missing.
    promote : bool
        Call :func:`promote_champion` after registering.
    max_rim_flip_share : float
        A fp16/int8 graph (sidecar ``precision``) is refused when its rim calls differ from fp32 on more than
        this share of the out-of-fold lesions (:func:`qsmrim.onnx_runtime.check_precision_parity`).

    Returns
    -------
    dict
        ``name``, ``version``, ``run_id``, ``model_uri`` (``models:/<name>/<version>``), ``logged_model_uri``,
        ``tags`` and ``promotion`` (the :func:`promote_champion` answer, or None).
    """
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX graph not found")
    if isinstance(sidecar, dict):
        content = sidecar
        sidecar_file = None
    else:
        sidecar_file = Path(sidecar)
        content = read_sidecar(sidecar_file)
    check_precision_parity(content, max_rim_flip_share, where=str(onnx_path))
    metrics = _clean_metrics(cv_metrics)
    external = "external_data" in content.get("onnx", {}).get("files", {})

    # Signature and example from a real run of the graph (so the dtypes are what a client gets back).
    session = open_session(onnx_path, [CPU])
    example = _input_example(session)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, example), strict=True))
    del session
    signature = infer_signature(example, outputs)
    tags = _version_tags(content, metrics, config, git_commit, onnx_path)

    with _tracking(tracking_uri), contextlib.ExitStack() as stack:
        if mlflow.active_run() is not None:
            raise RuntimeError(
                f"an MLflow run is active ({mlflow.active_run().info.run_id}); end it before logging"
            )
        exp = mlflow.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else mlflow.create_experiment(experiment, artifact_location=artifact_location)
        )
        tmp = Path(stack.enter_context(_tempdir()))
        save_kwargs = {"location": "model.onnx.data", "all_tensors_to_one_file": True, "size_threshold": 1024} if external else {}  # fmt: skip
        # Stage the graph as MLflow stores it (same name and external-data layout; the round trip is byte-
        # identical), so the version records the sha256 of exactly the files a download gives back.
        staged = tmp / "staged" / "model.onnx"
        staged.parent.mkdir()
        onnx.save_model(onnx.load(str(onnx_path)), str(staged), save_as_external_data=external, **save_kwargs)
        tags.update(_stored_hashes(staged))
        proto = onnx.load(str(staged))  # with its external weights, re-saved by MLflow beside the graph
        if sidecar_file is None or sidecar_file.name != "model.json":
            sidecar_file = write_sidecar(content, tmp / "model.json")
        run_name = f"export-{content.get('model', 'model')}-{content.get('protocol', 'paper')}"
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
            mlflow.set_tags({k: v for k, v in tags.items() if len(v) <= 5000})
            mlflow.log_params({"model": content.get("model"), "protocol": content.get("protocol"),
                               "n_members": content.get("n_members"), "weights_dtype": content["onnx"]["weights_dtype"]})  # fmt: skip
            if metrics:
                mlflow.log_metrics(metrics)
            mlflow.log_dict(config, "config.json")
            with _quiet_without_gpu():  # MLflow opens the graph, CUDA first, to check the input example
                info = mlflow.onnx.log_model(
                    proto,
                    name="model",
                    signature=signature,
                    input_example=example,
                    metadata={
                        "qsmrim_sidecar": "extra_files/model.json",
                        "protocol": content.get("protocol"),
                        "n_members": content.get("n_members"),
                        "feature_names_sha256": content.get("feature_names_sha256"),
                    },
                    extra_files=[str(sidecar_file)],
                    pip_requirements=_pip_requirements(),
                    save_as_external_data=external,
                    **save_kwargs,
                )
            del proto
            version = mlflow.register_model(info.model_uri, name, tags=tags)
        log.info("registered %s version %s from run %s", name, version.version, run.info.run_id)
        promotion = promote_champion(name, version.version, force=force) if promote else None
    return {
        "name": name,
        "version": int(version.version),
        "run_id": run.info.run_id,
        "model_uri": f"models:/{name}/{version.version}",
        "logged_model_uri": info.model_uri,
        "tags": tags,
        "promotion": promotion,
    }



@contextlib.contextmanager
def _quiet_without_gpu() -> Iterator[None]:
    """On a machine without a GPU, hide onnxruntime's and MLflow's complaints that CUDA could not start while
    MLflow checks a logged graph (it asks for CUDA first): the graph runs on the CPU there, as expected."""
    from qsmrim.onnx_runtime import gpu_device_present

    if gpu_device_present():
        yield
        return
    import onnxruntime as ort

    logger = logging.getLogger("mlflow.onnx")
    level = logger.level
    ort.set_default_logger_severity(4)  # fatal only: "cannot load libonnxruntime_providers_cuda.so" is an error
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        logger.setLevel(level)

def promote_champion(
    name: str,
    version: int | str,
    *,
    metric: str = DEFAULT_METRIC,
    force: bool = False,
    tracking_uri: str | None = None,
    alias: str = CHAMPION_ALIAS,
) -> dict[str, Any]:
    """Move ``alias`` to ``version`` only if its ``metric`` tag is >= the current champion's.

    The rule: no champion yet -> move; the new version equals or beats the champion -> move; it is worse, or
    has no value for ``metric`` -> stay, unless ``force``. Every decision is written to the version tags
    ``champion_decision`` and ``validation_status`` and returned.

    Returns
    -------
    dict
        ``name``, ``version``, ``alias``, ``moved``, ``forced`` (True only when ``force`` changed the outcome),
        ``metric``, ``value``, ``previous_version``, ``previous_value``, ``reason``.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    version = str(version)
    try:
        new = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ValueError(f"registered model {name!r} has no version {version}: {exc.message}") from exc
    value = _metric_tag(new.tags, metric)
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    prev_version = int(current.version) if current is not None else None
    prev_value = _metric_tag(current.tags, metric) if current is not None else None

    holds = current is not None and str(current.version) == version
    forced = False
    if holds:
        moved, reason = False, f"version {version} already holds @{alias}"
    elif current is None:
        moved, reason = True, f"no @{alias} yet"
    elif value is None:
        moved, reason = False, f"version {version} has no {metric} tag to compare with version {prev_version}"
    elif prev_value is None:
        moved, reason = True, f"current @{alias} (version {prev_version}) has no {metric} tag"
    elif value >= prev_value:
        moved, reason = True, f"{metric} {value:.4g} >= {prev_value:.4g} of version {prev_version}"
    else:
        moved, reason = False, f"{metric} {value:.4g} < {prev_value:.4g} of version {prev_version}"
    if not moved and force and not holds:
        moved, forced = True, True
        reason = f"forced: {reason}"
        log.warning("%s version %s: @%s moved by force (%s)", name, version, alias, reason)
    if moved:
        client.set_registered_model_alias(name, alias, version)
        log.info("%s: @%s -> version %s (%s)", name, alias, version, reason)
    else:
        log.info("%s: @%s stays on version %s (%s)", name, alias, prev_version, reason)
    status = alias if moved or holds else "not_promoted"
    client.set_model_version_tag(name, version, "validation_status", status)
    client.set_model_version_tag(name, version, "champion_decision", reason)
    return {
        "name": name,
        "version": int(version),
        "alias": alias,
        "moved": moved,
        "forced": forced,
        "metric": metric,
        "value": value,
        "previous_version": prev_version,
        "previous_value": prev_value,
        "reason": reason,
    }


def describe_promotion(promotion: dict[str, Any]) -> str:
    """One line saying which version holds the alias after :func:`promote_champion` and why, e.g.
    ``@champion: moved to version 1 (no @champion yet)`` or ``@champion: stays on version 2 (cv_pr_auc 0.7 <
    0.8 of version 2); version 3 not promoted``."""
    alias, version, prev = promotion["alias"], promotion["version"], promotion.get("previous_version")
    reason = promotion["reason"]
    if promotion["moved"]:
        return f"@{alias}: moved to version {version} ({reason})"
    if prev == version:
        return f"@{alias}: stays on version {version} ({reason})"
    held = f"version {prev}" if prev is not None else "no version"
    return f"@{alias}: stays on {held} ({reason}); version {version} not promoted"


def load_champion_session(
    uri: str = f"models:/{MODEL_NAME}@{CHAMPION_ALIAS}",
    providers: list[str] | None = None,
    *,
    threads: int = 0,
    tracking_uri: str | None = None,
    dst_path: str | Path | None = None,
) -> tuple[Any, str, dict[str, Any]]:
    """Download a registered graph and open it with onnxruntime, choosing the provider ourselves.

    ``threads`` > 0 caps onnxruntime's intra-op threads, as for a local graph (:func:`qsmrim.onnx_runtime.open_session`).

    ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` even without a usable GPU and then quietly runs on
    CPU; the provider returned is the one the session *uses* (``session.get_providers()[0]``), and a warning
    is logged when CUDA was asked for and not obtained.

    Returns
    -------
    (onnxruntime.InferenceSession, str, dict)
        The session, the provider in use, and metadata: ``uri``, ``name``, ``version``, ``alias``,
        ``providers_requested``, ``provider``, ``tags`` (version tags), ``sidecar`` (``model.json``),
        ``model_path``.
    """
    import mlflow
    from mlflow.models import Model

    with _tracking(tracking_uri):
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst_path) if dst_path else None
            )
        )
        meta: dict[str, Any] = {"uri": uri, "name": None, "version": None, "alias": None, "tags": {}}
        match = _MODELS_URI.match(uri)
        if match:
            client = _client(tracking_uri)
            mv = (client.get_model_version_by_alias(match["name"], match["alias"]) if match["alias"]
                  else client.get_model_version(match["name"], match["version"]))  # fmt: skip
            meta.update(name=mv.name, version=int(mv.version), alias=match["alias"], tags=dict(mv.tags))
    mlmodel = Model.load(str(local))
    flavor = mlmodel.flavors.get("onnx")
    if flavor is None:
        raise ValueError(f"{uri}: not an ONNX model (flavours: {sorted(mlmodel.flavors)})")
    model_path = local / flavor["data"]
    if match:
        _verify_download(uri, model_path, meta["tags"])
    sidecar_file = local / "extra_files" / "model.json"
    meta["sidecar"] = json.loads(sidecar_file.read_text()) if sidecar_file.exists() else None
    requested = choose_providers(providers)
    session = open_session(model_path, requested, threads)
    in_use = session.get_providers()[0]
    if requested[0] != in_use:
        log.warning("%s: asked onnxruntime for %s but the session runs on %s (no usable GPU/driver?)", uri,
                    requested[0], in_use)  # fmt: skip
    meta.update(providers_requested=requested, provider=in_use, model_path=str(model_path))
    log.info("loaded %s (version %s) on %s", uri, meta["version"], in_use)
    return session, in_use, meta


# --------------------------------------------------------------------------------------------------- helpers


def _stored_hashes(graph: Path) -> dict[str, str]:
    """Version tags ``onnx_sha256`` (and ``onnx_data_sha256`` for external weights) of the files as stored."""
    tags = {"onnx_sha256": file_sha256(graph)}
    data = graph.with_name(graph.name + ".data")
    if data.exists():
        tags["onnx_data_sha256"] = file_sha256(data)
    return tags


def _verify_download(uri: str, model_path: Path, tags: dict[str, str]) -> None:
    """Refuse a downloaded graph (or its external weights) whose sha256 differs from the version's tags.

    The tags live in the tracking database, the files in the artifact store: a file replaced in the store
    (a writable bucket, a copied folder) no longer matches and is not run.
    """
    expected = tags.get("onnx_sha256")
    if not expected or expected == "None":
        raise ValueError(f"{uri}: the registered version has no onnx_sha256 tag; re-register the graph "
                         "(qsmrim export --register) so what is downloaded can be checked")  # fmt: skip
    files = {model_path: expected}
    data = model_path.with_name(model_path.name + ".data")
    if "onnx_data_sha256" in tags:
        files[data] = tags["onnx_data_sha256"]
    elif data.exists():
        log.warning("%s: external weights %s unchecked (registered before onnx_data_sha256 was recorded)",
                    uri, data.name)  # fmt: skip
    for path, want in files.items():
        got = file_sha256(path) if path.exists() else "missing"
        if got != want:
            raise ValueError(
                f"{uri}: downloaded {path.name} has sha256 {got}, but the registered version records {want}; "
                "refusing to load a graph that is not the one registered (artifact store tampered or corrupt?)"
            )


def _clean_metrics(cv_metrics: dict[str, float | None]) -> dict[str, float]:
    out = {}
    for key, value in (cv_metrics or {}).items():
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"cv_metrics[{key!r}] must be a number, not {value!r}") from None
        if math.isfinite(number):
            out[key] = number
    return out


def _metric_tag(tags: dict[str, str], metric: str) -> float | None:
    raw = tags.get(metric)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


#: Parity figures of a fp16/int8 graph against fp32 stored as version tags ``precision_<key>``.
_PRECISION_TAGS = (
    "lesions",
    "max_prob_diff",
    "vote_flips",
    "rim_flips",
    "rim_flip_share",
    "cv_pr_auc",
    "cv_pr_auc_fp32",
)


def _version_tags(content: dict[str, Any], metrics: dict[str, float], config: dict[str, Any],
                  git_commit: str | None, onnx_path: Path) -> dict[str, str]:  # fmt: skip
    config_json = json.dumps(config, sort_keys=True, default=str)
    names = content["feature_names"]
    graph = content.get("onnx", {}).get("files", {}).get("graph", {})
    tags = {
        "qsmrim_version": str(content.get("qsmrim_version")),
        "model": str(content.get("model")),
        "protocol": str(content["protocol"]),
        "n_members": str(content["n_members"]),
        "members": json.dumps([[m["model"], m["fold"], m["seed"]] for m in content["members"]]),
        "thresholds": json.dumps([m["threshold"] for m in content["members"]]),
        "feature_count": str(len(names)),
        "feature_names_sha256": str(content.get("feature_names_sha256")),
        "feature_names": json.dumps(names),
        "patch_spec": json.dumps(content["patch_spec"], sort_keys=True),
        "weights_dtype": str(content.get("onnx", {}).get("weights_dtype")),
        "onnx_sha256": str(graph.get("sha256")),
        "onnx_file": onnx_path.name,
        "config": config_json,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "git_commit": git_commit or "unknown",
    }
    screening = content.get("screening") or {}
    if screening.get("threshold") is not None:
        tags["screening_threshold"] = repr(float(screening["threshold"]))
    parity = content.get("parity") or {}
    if "max_prob_diff" in parity:
        tags["parity_max_prob_diff"] = f"{parity['max_prob_diff']:.3g}"
    tags["precision"] = precision_of(content)
    figures = (content.get("precision") or {}).get("parity") or {}
    for key in _PRECISION_TAGS:
        if figures.get(key) is not None:
            tags[f"precision_{key}"] = repr(figures[key])
    tags.update({key: repr(value) for key, value in metrics.items()})
    return tags


def _input_example(session: Any) -> dict[str, Any]:
    """One seeded lesion: random patch, zero radiomics (finite, so it survives JSON)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        feeds[inp.name] = (rng.normal(size=shape) if inp.name == "patch" else np.zeros(shape)).astype(
            np.float32
        )
    return feeds


def _pip_requirements() -> list[str]:
    """Pinned runtime needs, given explicitly so MLflow does not load the model in a subprocess to infer them."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("onnx", "onnxruntime-gpu", "onnxruntime", "numpy"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qsmrim-register-") as tmp:
        yield tmp
