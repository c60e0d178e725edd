"""MLflow registry of the exported ensemble: real MLflow on a fresh sqlite store per test, real onnxruntime."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from test_export_fixtures import external_export, tiny_run

from qsmrim.export import sidecar_path_for
from qsmrim.export.cli import add_export_parser, cv_metrics_of_run
from qsmrim.radiomics import FEATURE_NAMES
from qsmrim.tracking.registry import (
    choose_providers,
    load_champion_session,
    log_and_register,
    promote_champion,
)

CONFIG = {"name": "tiny", "training": {"epochs": 1, "model_kwargs": {"base_channels": 2}}}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_root):
    return tiny_run(tmp_path_factory, synth_root)


def _register(run, store, pr_auc, *, onnx_path=None, force=False, promote=True):
    path = onnx_path or run.onnx
    return log_and_register(path, sidecar_path_for(path), cv_metrics={"cv_pr_auc": pr_auc, "cv_proc_auc": 0.5},
                            config=CONFIG, git_commit=COMMIT, force=force, tracking_uri=store, promote=promote)  # fmt: skip


def test_log_and_register_tags_signature_and_sidecar(run, store):
    """Check the version carries feature names, patch spec, thresholds, config, commit and CV metrics."""
    res = _register(run, store, 0.7)
    assert res["version"] == 1 and res["model_uri"] == "models:/qsmrim/1"
    assert res["promotion"]["moved"] and res["promotion"]["reason"] == "no @champion yet"
    client = MlflowClient(store)
    mv = client.get_model_version("qsmrim", "1")
    tags = mv.tags
    assert tags["feature_count"] == "527" and json.loads(tags["feature_names"]) == list(FEATURE_NAMES)
    assert json.loads(tags["patch_spec"])["size"] == [16, 32, 32]
    assert json.loads(tags["thresholds"]) == [m.thresholds["paper"] for m in run.members]
    assert json.loads(tags["config"]) == CONFIG and tags["git_commit"] == COMMIT
    assert float(tags["cv_pr_auc"]) == 0.7 and float(tags["cv_proc_auc"]) == 0.5
    assert (
        tags["protocol"] == "paper" and tags["n_members"] == "6" and tags["validation_status"] == "champion"
    )
    assert str(client.get_model_version_by_alias("qsmrim", "champion").version) == "1"
    r = client.get_run(res["run_id"])
    assert r.data.metrics["cv_pr_auc"] == 0.7 and r.info.status == "FINISHED"
    model = mlflow.models.get_model_info(res["model_uri"])
    inputs = {s.name: (str(s.type), s.shape) for s in model.signature.inputs.inputs}
    assert inputs == {"patch": ("float32", (-1, 2, 16, 32, 32)), "radiomics": ("float32", (-1, 527))}
    outputs = {s.name: str(s.type) for s in model.signature.outputs.inputs}
    assert outputs == {"prob": "float32", "votes": "int64", "rim": "bool", "spread": "float32"}
    assert model.saved_input_example_info is not None


def test_champion_moves_when_better_or_equal_not_when_worse(run, store):
    """Check the alias rule: first -> champion; worse stays; equal moves; force overrides and says so."""
    assert _register(run, store, 0.7)["promotion"]["moved"]
    worse = _register(run, store, 0.6)["promotion"]
    assert worse == {**worse, "moved": False, "forced": False, "previous_version": 1, "version": 2}
    assert worse["reason"] == "cv_pr_auc 0.6 < 0.7 of version 1"
    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias("qsmrim", "champion").version) == "1"
    assert client.get_model_version("qsmrim", "2").tags["validation_status"] == "not_promoted"

    # More versions of the same logged model, tagged directly, exercise the rule without re-logging.
    source = client.get_model_version("qsmrim", "1").source

    def version(pr_auc):
        mv = client.create_model_version(
            "qsmrim", source, tags={"cv_pr_auc": repr(pr_auc)} if pr_auc else None
        )
        return mv.version

    equal = promote_champion("qsmrim", version(0.7), tracking_uri=store)
    assert equal["moved"] and not equal["forced"] and equal["reason"] == "cv_pr_auc 0.7 >= 0.7 of version 1"
    better = promote_champion("qsmrim", version(0.75), tracking_uri=store)
    assert better["moved"] and better["previous_version"] == 3
    low = version(0.1)
    assert not promote_champion("qsmrim", low, tracking_uri=store)["moved"]
    forced = promote_champion("qsmrim", low, force=True, tracking_uri=store)
    assert (
        forced["moved"] and forced["forced"] and forced["reason"].startswith("forced: cv_pr_auc 0.1 < 0.75")
    )
    assert str(client.get_model_version_by_alias("qsmrim", "champion").version) == str(low)
    again = promote_champion("qsmrim", low, tracking_uri=store)
    assert not again["moved"] and "already holds @champion" in again["reason"]
    untagged = version(None)
    assert not promote_champion("qsmrim", untagged, tracking_uri=store)["moved"]
    assert promote_champion("qsmrim", untagged, force=True, tracking_uri=store)["forced"]
    with pytest.raises(ValueError, match="has no version 99"):
        promote_champion("qsmrim", 99, tracking_uri=store)


def test_champion_session_gives_the_same_outputs(run, store, tmp_path):
    """Check models:/qsmrim@champion (external weights) downloads to a session with the graph's outputs."""
    ext = external_export(run)
    assert ext.with_name("model.onnx.data").exists()
    res = _register(run, store, 0.8, onnx_path=ext)
    session, provider, meta = load_champion_session(tracking_uri=store, dst_path=tmp_path / "dl")
    assert provider == session.get_providers()[0] and provider == meta["provider"]
    assert meta["providers_requested"] == choose_providers()
    assert (meta["name"], meta["version"], meta["alias"]) == ("qsmrim", res["version"], "champion")
    assert meta["sidecar"]["feature_names"] == list(FEATURE_NAMES) and meta["tags"]["cv_pr_auc"] == "0.8"
    # The weights travelled with the graph, once (mlflow#11684 logged them twice).
    folder = Path(meta["model_path"]).parent
    data_files = [p.name for p in folder.rglob("*") if p.is_file() and p.suffix == ".data"]
    assert data_files == ["model.onnx.data"]
    assert (folder / "model.onnx.data").stat().st_size >= ext.with_name(
        "model.onnx.data"
    ).stat().st_size - 1024
    onnx.checker.check_model(meta["model_path"])
    patch, radiomics = run.inputs()
    import onnxruntime as ort

    local = ort.InferenceSession(str(run.onnx), providers=["CPUExecutionProvider"])
    feeds = {"patch": patch, "radiomics": radiomics}
    names = [o.name for o in session.get_outputs()]
    assert names == ["prob", "votes", "rim", "spread"]
    for name, a, b in zip(names, session.run(None, feeds), local.run(names, feeds), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6 if name in ("prob", "spread") else 0, err_msg=name)


@pytest.mark.parametrize("tampered", ["model.onnx", "model.onnx.data"])
def test_champion_download_that_differs_from_the_registered_graph_is_refused(run, store, tmp_path, tampered):
    """Check a graph or its external weights changed in the artifact store after registration is refused:
    the version's onnx_sha256/onnx_data_sha256 tags (in the database) no longer match what downloads."""
    from qsmrim.model_sidecar import file_sha256

    ext = external_export(run)
    res = _register(run, store, 0.8, onnx_path=ext)
    _, _, meta = load_champion_session(tracking_uri=store, dst_path=tmp_path / "ok")
    path = Path(meta["model_path"])
    assert res["tags"]["onnx_sha256"] == meta["tags"]["onnx_sha256"] == file_sha256(path)
    assert meta["tags"]["onnx_data_sha256"] == file_sha256(path.with_name("model.onnx.data"))
    stored = [p for p in (tmp_path / "artifacts").rglob(tampered) if p.is_file()]
    assert len(stored) == 1, stored
    raw = bytearray(stored[0].read_bytes())
    raw[-5] ^= 0x01  # one bit of the last initializer (graph) or weight (data)
    stored[0].write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"downloaded {tampered} has sha256 [0-9a-f]{{64}}, but the registered "
                                         r"version records [0-9a-f]{64}; refusing to load"):  # fmt: skip
        load_champion_session(tracking_uri=store, dst_path=tmp_path / "bad")


def test_inline_graph_hash_matches_the_exported_file(run, store, tmp_path):
    """Check an inline graph is stored byte for byte as exported: its tag is the sidecar's graph sha256."""
    res = _register(run, store, 0.8)
    sidecar = json.loads(sidecar_path_for(run.onnx).read_text())
    assert res["tags"]["onnx_sha256"] == sidecar["onnx"]["files"]["graph"]["sha256"]
    assert "onnx_data_sha256" not in res["tags"]
    load_champion_session(tracking_uri=store, dst_path=tmp_path / "dl")


def test_providers_are_chosen_and_reported():
    """Check CUDA is asked for only when onnxruntime lists it and a GPU device exists, CPU always last,
    explicit lists kept."""
    import onnxruntime as ort

    from qsmrim.onnx_runtime import gpu_device_present

    chosen = choose_providers()
    assert chosen[-1] == "CPUExecutionProvider"
    want_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and gpu_device_present()
    assert ("CUDAExecutionProvider" in chosen) == want_cuda
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_cli_export_register_reads_cv_metrics(run, store, tmp_path, capsys):
    """Check `qsmrim export RUN --out ... --register` tags the CV metrics of evaluation.json and promotes."""
    run_copy = tmp_path / "run"
    shutil.copytree(
        run.run_dir / "qsmrimnet" / "fold_0", run_copy / "qsmrimnet" / "fold_0"
    )  # 3 members: quicker
    (run_copy / "evaluation").mkdir()
    point = {"threshold": 0.3125, "sensitivity": 0.9, "specificity": 0.8, "ppv": 0.4, "tp": 9, "fp": 14, "fn": 1,
             "tn": 56, "n_lesions": 80, "lesions_to_review": 23, "review_saved": 0.7125, "max_sensitivity": 0.95}
    results = {"qsmrimnet": {"pr": {"auc": 0.42}, "proc": {"auc": 0.31}, "lesion": {"f1": 0.5},
                             "high_sensitivity": point},
               "qsmrimnet [honest]": {"pr": {"auc": 0.4}, "proc": {"auc": 0.3}}}  # fmt: skip
    (run_copy / "evaluation" / "evaluation.json").write_text(json.dumps(results))
    assert cv_metrics_of_run(run_copy, "qsmrimnet") == {"cv_pr_auc": 0.42, "cv_proc_auc": 0.31, "cv_f1": 0.5}
    with pytest.raises(ValueError, match=r"no results for 'rimnet'"):
        cv_metrics_of_run(run_copy, "rimnet")

    parser = argparse.ArgumentParser(prog="qsmrim")
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli" / "model.onnx"
    args = parser.parse_args(
        ["export", str(run_copy), "--out", str(out), "--register", "--tracking-uri", store]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert (
        f"wrote {out}" in printed
        and "registered models:/qsmrim/1" in printed
        and "@champion: moved to version 1" in printed
    )
    assert "screening threshold 0.3125: CV sensitivity 0.900, 23 of 80 lesions to review" in printed
    tags = MlflowClient(store).get_model_version("qsmrim", "1").tags
    assert float(tags["cv_pr_auc"]) == 0.42 and float(tags["cv_f1"]) == 0.5
    assert float(tags["screening_threshold"]) == 0.3125  # the screening threshold travels to the registry
    screening = json.loads(sidecar_path_for(out).read_text())["screening"]
    assert screening["threshold"] == 0.3125 and screening["lesions_to_review"] == 23
    assert screening["source"] == str(run_copy / "evaluation" / "evaluation.json")
    from qsmrim.export import graph_metadata

    assert float(graph_metadata(out)["qsmrim.screening_threshold"]) == 0.3125  # the graph alone carries it too
    assert json.loads(tags["config"]) == {}  # this copy has no config.resolved.json
    assert tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40
    assert os.environ["MLFLOW_TRACKING_URI"] == store


def test_register_errors(run, store, tmp_path):
    """Check a missing graph, a bad sidecar and a non-numeric metric fail naming the file or field."""
    with pytest.raises(FileNotFoundError, match="ONNX graph not found"):
        log_and_register(
            tmp_path / "none.onnx", {}, cv_metrics={}, config={}, git_commit=None, tracking_uri=store
        )
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a qsmrim model sidecar"):
        log_and_register(run.onnx, bad, cv_metrics={}, config={}, git_commit=None, tracking_uri=store)
    with pytest.raises(ValueError, match=r"cv_metrics\['cv_pr_auc'\] must be a number"):
        log_and_register(run.onnx, sidecar_path_for(run.onnx), cv_metrics={"cv_pr_auc": "high"}, config={},
                         git_commit=None, tracking_uri=store)  # fmt: skip


def test_screening_threshold_is_cvs_high_sensitivity_point():
    """Check the sidecar's screening entry carries evaluate_predictions' high-sensitivity threshold unchanged."""
    import pandas as pd

    from qsmrim.evaluation import evaluate_predictions, high_sensitivity_point
    from qsmrim.export.sidecar import screening_from_evaluation

    rng = np.random.default_rng(0)
    rim = (rng.random(120) < 0.25).astype(int)
    prob = np.clip(0.35 * rim + rng.random(120) * 0.65, 0, 1)
    df = pd.DataFrame({"subject": np.arange(120) // 10, "lesion": np.arange(120), "fold": np.arange(120) // 10 % 3,
                       "rim": rim, "prob": prob})  # fmt: skip
    expected = high_sensitivity_point(rim, prob)
    screening = screening_from_evaluation(evaluate_predictions(df, method="m"), "eval.json")
    assert screening["threshold"] == expected["threshold"]
    assert (screening["sensitivity"], screening["lesions_to_review"]) == (
        expected["sensitivity"],
        expected["lesions_to_review"],
    )
    assert screening["sensitivity"] < 0.95
    json.dumps(screening, allow_nan=False)  # goes into model.json as is
    # a point that flags nothing carries no threshold
    assert screening_from_evaluation({"high_sensitivity": {"threshold": None}}, "eval.json") is None
    assert screening_from_evaluation({}, "eval.json") is None
