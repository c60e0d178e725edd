"""One tracking store, explicit data, results outside Ray's package copy (issue 19 items 5-7 and 9): fast checks.

The end-to-end runs are tests/test_readme_own_cohort.py (README sequences) and tests/test_job_results_persist.py
(a real `ray job submit`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from qsmrim.cli import build_parser
from qsmrim.config import ConfigError, load_config
from qsmrim.locations import locate_results, ray_package_copy
from qsmrim.tracking.mlflow_runs import artifact_root, default_tracking_uri, resolve_tracking_uri
from qsmrim.tracking.registry import describe_promotion

CI = REPO / "platform" / "experiments" / "ci.yaml"
PAPER = REPO / "platform" / "experiments" / "paper.yaml"


@pytest.fixture
def no_store_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_resolve_tracking_uri_precedence(no_store_env, monkeypatch, tmp_path):
    """Check flag > MLFLOW_TRACKING_URI > sqlite:///<cwd>/mlruns.db, relative SQLite paths made absolute."""
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert resolve_tracking_uri() == default_tracking_uri() == f"sqlite:///{here / 'mlruns.db'}"
    assert resolve_tracking_uri(base="/srv/x") == "sqlite:////srv/x/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////abs/other.db") == "sqlite:////abs/other.db"
    assert resolve_tracking_uri("sqlite:///rel/store.db") == f"sqlite:///{here / 'rel' / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == f"sqlite:///{here / 'env.db'}"


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:////srv/x/mlruns.db", Path("/srv/x/mlartifacts")),
    ("http://127.0.0.1:5000", None),
    ("databricks", None),
])  # fmt: skip
def test_artifact_root_sits_beside_the_sqlite_store(uri, expected):
    """Check a local store's artifacts go beside its database file and a server keeps its own."""
    assert artifact_root(uri) == expected


@pytest.mark.parametrize("argv", [
    ["grid", "--config", "c.yaml"],
    ["demo"],
    ["evaluate", "runs/x"],
    ["export", "runs/x", "--out", "m.onnx"],
    ["predict", "root", "--model", "models:/qsmrim@champion", "--out", "d"],
    ["serve"],
])  # fmt: skip
def test_every_mlflow_command_takes_tracking_uri(argv):
    """Check grid, demo, evaluate, export, predict and serve all accept --tracking-uri."""
    args = build_parser().parse_args([*argv, "--tracking-uri", "sqlite:////tmp/s.db"])
    assert args.tracking_uri == "sqlite:////tmp/s.db"


def test_config_without_data_refuses_and_says_how_to_choose():
    """Check paper.yaml (root null, synthesize false) refuses naming --data and data.synthesize, and loads with either."""
    with pytest.raises(ConfigError, match=r"paper\.yaml: no cohort: data\.root is null.*--data ROOT.*data\.synthesize: true"):
        load_config(PAPER)
    assert load_config(PAPER, {"data.root": "/data/bids"}).data.root == "/data/bids"
    assert load_config(PAPER, {"data.synthesize": True}).data.synth_subjects == 172
    for name in ("ci", "demo", "comparison"):
        assert load_config(REPO / "platform" / "experiments" / f"{name}.yaml").data.synthesize, name


def test_grid_refuses_a_config_without_data(no_store_env, tmp_path, capsys, monkeypatch):
    """Check `qsmrim grid --config paper.yaml` exits 1 with the message instead of synthesising 172 subjects."""
    from qsmrim.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["grid", "--config", str(PAPER)]) == 1
    err = capsys.readouterr().err
    assert "no cohort" in err and "--data ROOT" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_locate_results_makes_paths_absolute_against_the_base(no_store_env, tmp_path, monkeypatch):
    """Check runs_dir, --data and the default store resolve against --base-dir (default: the current folder)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CI, {"data.root": "bids"})
    located, where = locate_results(cfg, base=tmp_path / "proj")
    proj = (tmp_path / "proj").resolve()
    assert located.data.root == str(proj / "bids") and where.run_dir == proj / "runs" / "ci"
    assert where.tracking_uri == f"sqlite:///{proj / 'mlruns.db'}" and where.artifacts == proj / "mlartifacts"
    _, here = locate_results(cfg, run="elsewhere/r1")
    assert here.run_dir == tmp_path.resolve() / "elsewhere" / "r1"


def _package_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "platform").mkdir(parents=True)
    return copy


def test_ray_package_copy_is_recognised(tmp_path):
    """Check a path inside Ray's working_dir_files copy maps to the copy's root, and others to None."""
    copy = _package_copy(tmp_path)
    assert ray_package_copy(copy / "runs" / "ci") == copy.resolve()
    assert ray_package_copy(tmp_path / "runs") is None


def test_locate_results_refuses_results_inside_ray_copy(no_store_env, tmp_path, monkeypatch):
    """Check results that would land in Ray's package copy are refused, and --base-dir or absolute paths pass."""
    copy = _package_copy(tmp_path)
    monkeypatch.chdir(copy)
    cfg = load_config(CI)
    with pytest.raises(ConfigError, match=r"temporary copy .* run folder .*runs/ci.* MLflow store .*mlruns\.db.*--base-dir"):
        locate_results(cfg)
    _, where = locate_results(cfg, base=tmp_path / "user")
    assert ray_package_copy(where.run_dir) is None and str(tmp_path / "user") in where.tracking_uri
    _, where = locate_results(load_config(CI, {"runs_dir": str(tmp_path / "runs")}), tracking_uri="http://127.0.0.1:5000")
    assert where.run_dir == tmp_path / "runs" / "ci" and where.artifacts is None
    with pytest.raises(ConfigError, match="MLflow store"):  # the run folder is safe, the default store is not
        locate_results(load_config(CI, {"runs_dir": str(tmp_path / "runs")}))


def _job(*args: str, cwd: Path, python: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([*(python or [sys.executable]), "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_job_in_ray_copy_refuses_before_writing(tmp_path):
    """Check `python -m jobs.pipeline` run from a Ray package copy exits 1 with the message and writes nothing."""
    copy = _package_copy(tmp_path)
    (copy / "platform" / "experiments").mkdir()
    (copy / "platform" / "experiments" / "ci.yaml").write_text(CI.read_text())
    res = _job("jobs.pipeline", "--config", "platform/experiments/ci.yaml", cwd=copy)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Ray deletes" in res.stderr and "--base-dir" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in copy.iterdir()) == ["platform"]


def test_job_on_an_interpreter_without_torch_says_what_to_do(tmp_path):
    """Check a job started by a Python without the project's packages (here: -S, no site-packages) says to start
    Ray from the venv instead of dying with `No module named 'torch'`."""
    res = _job("jobs.pipeline", "--config", str(CI), cwd=tmp_path, python=[sys.executable, "-S"])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "missing module(s) torch" in res.stderr and "ray start --head" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("promotion, expected", [
    ({"moved": True, "previous_version": None, "reason": "no @champion yet"},
     "@champion: moved to version 1 (no @champion yet)"),
    ({"moved": False, "previous_version": 1, "reason": "version 1 already holds @champion"},
     "@champion: stays on version 1 (version 1 already holds @champion)"),
    ({"moved": False, "previous_version": 2, "reason": "cv_pr_auc 0.5 < 0.7 of version 2"},
     "@champion: stays on version 2 (cv_pr_auc 0.5 < 0.7 of version 2); version 1 not promoted"),
])  # fmt: skip
def test_describe_promotion_names_the_champion_and_why(promotion, expected):
    """Check the registry line names the version that holds @champion and the reason."""
    assert describe_promotion({"alias": "champion", "version": 1, **promotion}) == expected


def test_find_grid_run_and_cv_metrics(no_store_env, tmp_path):
    """Check `qsmrim evaluate`'s MLflow side: the grid run of a run folder is found in any experiment, a missing
    local store is not created by asking, and cv_* metric names follow the grid's."""
    from qsmrim.tracking import mlflow_runs as mr

    missing = f"sqlite:///{tmp_path / 'none' / 'mlruns.db'}"
    assert mr.find_grid_run(missing, tmp_path / "runs" / "ci") is None
    assert not (tmp_path / "none").exists()
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    exp = mr.ensure_experiment(uri, "qsmrim-x", mr.artifact_root(uri))
    parent = mr.start_parent_run(uri, exp, tmp_path / "runs" / "ci", name="grid-ci", params={}, tags={}, artifacts=[])
    assert mr.find_grid_run(uri, tmp_path / "runs" / "ci") == parent
    assert mr.find_grid_run(uri, tmp_path / "runs" / "other") is None
    ev = {"qsmrimnet": {"pr": {"auc": 0.5}, "proc": {"auc": 0.25}, "lesion": {"f1": 0.4}, "subject": {"r": None}},
          "aprl-rf [honest]": {"pr": {"auc": 0.3}, "proc": {"auc": 0.2}, "lesion": {"f1": 0.1}, "subject": {"r": 0.9}}}
    assert mr.cv_metrics(ev) == {"cv_qsmrimnet_pr_auc": 0.5, "cv_qsmrimnet_proc_auc": 0.25, "cv_qsmrimnet_f1": 0.4,
                                 "cv_aprl_rf_honest_pr_auc": 0.3, "cv_aprl_rf_honest_proc_auc": 0.2,
                                 "cv_aprl_rf_honest_f1": 0.1, "cv_aprl_rf_honest_subject_r": 0.9}
    mr.log_results(uri, parent, metrics=mr.cv_metrics(ev))
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(parent)
    assert run.data.metrics["cv_qsmrimnet_pr_auc"] == 0.5 and run.info.status == "RUNNING"


@pytest.mark.parametrize("argv", [
    ["grid", "--config", str(PAPER), "--data", "bids"],
    ["demo", "--data", "bids"],
])  # fmt: skip
def test_data_flag_names_the_cohort(argv, no_store_env, tmp_path, monkeypatch):
    """Check `qsmrim grid|demo --data ROOT` sets data.root (absolute, against the current folder), so paper.yaml
    loads and the demo's synthetic settings give way to the user's cohort."""
    from qsmrim.locations import config_from_args

    monkeypatch.chdir(REPO)
    args = build_parser().parse_args(argv)
    monkeypatch.chdir(tmp_path)
    args.config = str(REPO / args.config) if not Path(args.config).is_absolute() else args.config
    cfg, where = config_from_args(args)
    assert cfg.data.root == str(tmp_path.resolve() / "bids")
    assert where.run_dir == tmp_path.resolve() / "runs" / cfg.name
