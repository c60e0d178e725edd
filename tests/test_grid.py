"""The Ray grid on a real local Ray: every member trained, MLflow parent/child runs, resume, killed worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from qsmrim.config import load_config  # noqa: E402
from qsmrim.training.layout import iter_member_dirs  # noqa: E402

CI = REPO / "platform" / "experiments" / "ci.yaml"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False)  # dashboard on: Train V2 needs the state API
    yield
    ray.shutdown()


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri


def _children(uri: str, parent: str):
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_grid_trains_every_member_and_tracks_them(local_ray, tracking, tmp_path):
    """Check that the tiny grid fits fold x seed members, logs a parent + one child per trial, and evaluates."""
    from qsmrim.grid.ray_grid import run_grid

    cfg = load_config(CI, {"runs_dir": str(tmp_path / "runs")})
    result = run_grid(cfg, progress=False)
    assert result["errors"] == []
    run = Path(result["run_dir"])
    members = iter_member_dirs(run)
    assert [(m, f, s) for m, f, s, _ in members] == [("qsmrimnet", f, s) for f in (0, 1) for s in (0, 1)]
    assert not list(run.rglob(".report-*")), "checkpoint hand-off folders must be gone once Ray has stored them"
    splits = json.loads((run / "splits.json").read_text())
    for _, fold, _, folder in members:
        preds = __import__("pandas").read_parquet(folder / "predictions.parquet")
        assert set(preds["subject"]) == set(splits[fold]["test"])
    client = mlflow.tracking.MlflowClient(tracking)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dataset_hash"] and parent.data.params["training.epochs"] == "2"
    assert "cv_qsmrimnet_pr_auc" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"splits.json", "report.html", "report.md"} <= artifacts
    children = _children(tracking, result["parent_run_id"])
    assert sorted(c.data.tags["qsmrim.member"] for c in children) == sorted(
        f"qsmrimnet-fold={f}-seed={s}" for f in (0, 1) for s in (0, 1)
    )
    for c in children:
        assert c.info.status == "FINISHED"
        losses = client.get_metric_history(c.info.run_id, "train_loss")
        assert [m.step for m in losses] == [1, 2]
        assert "test_roc_auc" in c.data.metrics or "test_paper_f1" in c.data.metrics
    assert (run / "evaluation" / "report.html").exists()

    # resume: the same run folder again redoes nothing and reuses the parent run
    before = {f: (f / "member.json").stat().st_mtime_ns for *_, f in members}
    again = run_grid(cfg, progress=False, evaluate=False)
    assert again["parent_run_id"] == result["parent_run_id"]
    assert {f: (f / "member.json").stat().st_mtime_ns for *_, f in iter_member_dirs(run)} == before


def _checkpoint_epoch(path: Path) -> int | None:
    """The epoch a stack checkpoint holds, or None while it is being replaced or already removed."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # noqa: BLE001  (a probe: a file mid-replace may fail to unpickle in several ways)
        return None


def _kill_a_train_worker_then_watch(run_dir: Path, seen: dict, stop: threading.Event, min_epoch: int = 2) -> None:
    """Once the stack checkpoint holds epoch >= ``min_epoch``: record that epoch and splits.json, SIGKILL the
    Train worker, then record every epoch the checkpoint holds afterwards (a resume writes E+1, E+2, ...; a
    restart from scratch would write 1 again).

    What it saw before the kill (largest epoch, Train worker processes found, a worker gone before its kill)
    stays in ``seen["looked"]`` so that a run without a kill says why."""
    import psutil

    looked = seen.setdefault("looked", {"max_epoch": None, "workers": 0, "gone": 0})
    while not stop.is_set() and "pid" not in seen:
        try:
            # the trial's own checkpoint in the model's folder, not Ray's stored copies under ray/ (never rewritten)
            found = [c for c in run_dir.glob("*/**/stack_checkpoint_*.pt") if "ray" not in c.relative_to(run_dir).parts]
        except OSError:  # a checkpoint hand-off folder (.report-*) removed during the walk: look again
            found = []
        for ckpt in found:
            epoch = _checkpoint_epoch(ckpt)
            if epoch is None or epoch < min_epoch:
                continue
            looked["max_epoch"] = max(epoch, looked["max_epoch"] or 0)
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "RayTrainWorker" not in " ".join(p.info["cmdline"] or []) or p.info["pid"] == os.getpid():
                    continue
                looked["workers"] += 1
                splits = (run_dir / "splits.json").read_text()
                try:
                    os.kill(p.info["pid"], signal.SIGKILL)
                except ProcessLookupError:  # a worker of an earlier fit, gone between the listing and the kill
                    looked["gone"] += 1
                    continue
                time.sleep(0.2)  # a write in flight lands (rename) or is gone with the process
                seen.update(pid=p.info["pid"], checkpoint=ckpt, epoch=_checkpoint_epoch(ckpt), splits=splits,
                            after=[])  # fmt: skip
                break
            break
        time.sleep(0.02)
    last = seen["checkpoint"].stat().st_mtime_ns if "pid" in seen else None
    while not stop.is_set() and "pid" in seen:
        try:
            stamp = seen["checkpoint"].stat().st_mtime_ns
        except OSError:  # between a removal and the rename that replaces it
            stamp = None
        if stamp is not None and stamp != last:
            epoch = _checkpoint_epoch(seen["checkpoint"])
            if epoch is not None and (not seen["after"] or seen["after"][-1] != epoch):
                seen["after"].append(epoch)
            last = stamp
        time.sleep(0.02)


def test_grid_survives_a_killed_worker(local_ray, tracking, tmp_path):
    """Check that SIGKILL of a trial's Train worker at checkpoint epoch E resumes from E: the checkpoint then
    holds E+1, E+2, ... (never an epoch <= E again), every member ends with epochs 1..6, and the split is the
    one written before the kill.

    The grid is one trial stacking both folds (grid.stack_folds): the stack across folds, its checkpoint in
    the model's folder and its resume after the kill all run under Ray here."""
    from qsmrim.grid.ray_grid import run_grid
    from qsmrim.prepare import prepare_cohort  # noqa: F401  (import before the clock starts)

    cfg = load_config(CI, {"runs_dir": str(tmp_path / "runs"), "training.epochs": 6, "training.seeds": [0],
                           "training.checkpoint_every": 1, "grid.stack_folds": True,
                           "training.stack_on_cpu": True})  # fmt: skip
    run = tmp_path / "runs" / "ci"
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_a_train_worker_then_watch, args=(run, seen, stop), daemon=True)
    watcher.start()
    try:
        result = run_grid(cfg, progress=False, evaluate=False)
    finally:
        stop.set()
        watcher.join(10)
    assert "pid" in seen, f"no Train worker was killed: the fault was not injected ({seen.get('looked')})"
    assert result["errors"] == []
    assert not list(run.rglob(".report-*")), "the killed worker's checkpoint hand-off folder must be cleaned up"
    killed_at = seen["epoch"]
    assert 2 <= killed_at < 6
    assert seen["after"], "no checkpoint was written after the kill"
    assert seen["after"][0] == killed_at + 1 and min(seen["after"]) > killed_at, (killed_at, seen["after"])
    members = iter_member_dirs(run)
    assert [(f, s) for _, f, s, _ in members] == [(0, 0), (1, 0)]
    for *_, folder in members:
        hist = json.loads((folder / "member.json").read_text())["history"]
        assert [int(h["epoch"]) for h in hist] == [1, 2, 3, 4, 5, 6]
    assert (run / "splits.json").read_text() == seen["splits"]
    assert json.loads(seen["splits"])[0]["test"]
    children = _children(tracking, result["parent_run_id"])
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)


def test_grid_trials_stack_the_seeds_of_a_fold():
    """Check the trial list: one stacked trial per fold for QSMRim-Net, one trial per seed otherwise, one per
    model with stack_folds, one per member with stacking off."""
    from qsmrim.grid.ray_grid import grid_trials, trial_name

    cfg = load_config(CI, {"models": ["qsmrimnet", "aprl-nn"], "training.seeds": [0, 1, 2]})
    trials = grid_trials(cfg, n_folds=2)
    assert [(t.model, t.members, t.stacked) for t in trials] == [
        ("qsmrimnet", ((0, 0), (0, 1), (0, 2)), True), ("qsmrimnet", ((1, 0), (1, 1), (1, 2)), True),
        *[("aprl-nn", ((f, s),), False) for f in (0, 1) for s in (0, 1, 2)],
    ]  # fmt: skip
    assert trial_name("qsmrimnet", [[1, 0], [1, 1], [1, 2]]) == "qsmrimnet-fold=1-seeds=0,1,2"
    assert trial_name("aprl-nn", [[0, 2]]) == "aprl-nn-fold=0-seed=2"
    whole = grid_trials(load_config(CI, {"grid.stack_folds": True}), n_folds=2)
    assert [t.members for t in whole] == [((0, 0), (0, 1), (1, 0), (1, 1))]
    assert trial_name("qsmrimnet", whole[0].members) == "qsmrimnet-folds=0,1-seeds=0,1"
    flat = grid_trials(load_config(CI, {"grid.stack_seeds": False}), n_folds=2)
    assert [(t.members, t.stacked) for t in flat] == [(((f, s),), False) for f in (0, 1) for s in (0, 1)]


def test_trials_per_model_splits_members_evenly():
    """Check grid.trials_per_model: each model's members in that many consecutive trials of nearly equal size
    (the demo's 15 members as 8 + 7 on 2 cores), every member once, and a bad value refused by name."""
    from qsmrim.config import ConfigError
    from qsmrim.experiment import member_groups

    cfg = load_config(CI, {"training.seeds": [0, 1, 2], "grid.trials_per_model": 2})
    stacked, groups = member_groups(cfg, "qsmrimnet", 5)
    assert stacked and [len(g) for g in groups] == [8, 7]
    assert [m for g in groups for m in g] == [(f, s) for f in range(5) for s in (0, 1, 2)]
    many = member_groups(load_config(CI, {"grid.trials_per_model": 99}), "qsmrimnet", 2)[1]
    assert [len(g) for g in many] == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="trials_per_model"):
        load_config(CI, {"grid.trials_per_model": 0})
