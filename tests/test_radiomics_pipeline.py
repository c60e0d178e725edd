"""Cohort radiomics on real Dask (LocalCluster, a killed worker), Ray, the Parquet cache and bad input."""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmrim.data import InputError, discover_cohort
from qsmrim.fanout.cli import add_features_parser
from qsmrim.fanout.features import extract_cohort
from qsmrim.radiomics import (
    FEATURE_NAMES,
    FEATURE_TABLE_COLUMNS,
    RadiomicsSettings,
    read_features,
)
from qsmrim.radiomics.cache import FEATURES_FILE, SUBJECTS_DIR


@pytest.fixture(scope="module")
def sync_run(synth_root, tmp_path_factory) -> Path:
    """The cohort's features computed in-process, one task after another (read-only output folder)."""
    out = tmp_path_factory.mktemp("sync") / "features"
    extract_cohort(synth_root, out, scheduler="sync")
    return out


@pytest.fixture(scope="module")
def sync_table(sync_run) -> pd.DataFrame:
    """What every scheduler must match."""
    return read_features(sync_run)


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_sync_table_layout(sync_table, synth_root):
    """Check the merged table: one row per lesion of every subject, the documented columns, NaN rows explained."""
    cohort = discover_cohort(synth_root)
    assert tuple(sync_table.columns) == FEATURE_TABLE_COLUMNS
    assert list(dict.fromkeys(sync_table["subject"])) == [s.subject for s in cohort.subjects]
    assert len(sync_table) >= 40
    nan_rows = sync_table[sync_table[list(FEATURE_NAMES)].isna().all(axis=1)]
    assert (nan_rows["status"] == "nan").all() and nan_rows["reason"].str.len().gt(0).all()
    assert (sync_table.loc[sync_table["status"] == "ok", list(FEATURE_NAMES)].notna().all(axis=1)).all()


@pytest.mark.slow
def test_extract_cohort_local_cluster_two_workers(synth_root, tmp_path, sync_table):
    """Check that a LocalCluster of 2 single-threaded worker processes gives the in-process table exactly."""
    seen: list[tuple[int, int]] = []
    result = extract_cohort(synth_root, tmp_path, workers=2, on_progress=lambda d, t: seen.append((d, t)))
    pd.testing.assert_frame_equal(result.table, sync_table)
    pd.testing.assert_frame_equal(read_features(tmp_path), sync_table)
    assert result.scheduler == "local" and len(result.computed) == 4 and result.cached == ()
    assert sorted(p.name for p in (tmp_path / SUBJECTS_DIR).iterdir()) == [
        f"{s}.parquet" for s in ("001", "002", "003", "004")
    ]
    assert seen and seen[-1][0] == seen[-1][1] == len(sync_table)
    assert not _leftovers(tmp_path)


@pytest.mark.slow
def test_extract_cohort_survives_a_killed_worker(synth_root, tmp_path, sync_table):
    """Check that killing a worker process mid-run (SIGKILL) still completes with identical results."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        box: dict[str, object] = {}

        def run() -> None:
            try:
                box["result"] = extract_cohort(synth_root, tmp_path, scheduler=client, chunk_lesions=3)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
                box["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        victim, deadline = None, time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and thread.is_alive():
            busy = [w for w, keys in client.processing().items() if any("radiomics-" in str(k) for k in keys)]
            victim = busy[0] if busy else None
            time.sleep(0.005)
        assert victim is not None and thread.is_alive(), "the run ended before a worker could be killed"
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    pd.testing.assert_frame_equal(box["result"].table, sync_table)  # type: ignore[attr-defined]
    assert not _leftovers(tmp_path)


@pytest.mark.slow
def test_extract_cohort_on_ray(synth_root, tmp_path, sync_table):
    """Check that the same graph on Ray (Dask-on-Ray scheduler) gives the same table."""
    pytest.importorskip("ray")
    result = extract_cohort(synth_root, tmp_path, scheduler="ray", workers=2)
    pd.testing.assert_frame_equal(result.table, sync_table)
    assert result.scheduler == "ray"


def test_cache_resume_and_invalidation(cohort_copy, tmp_path, sync_run, sync_table):
    """Check that a re-run reuses every subject (the key is the inputs' content, not their path), a lost subject
    file is recomputed alone (resume), and a changed setting or input recomputes."""
    shutil.copytree(sync_run, tmp_path, dirs_exist_ok=True)  # computed from another copy of the same cohort
    again = extract_cohort(cohort_copy, tmp_path, scheduler="sync")
    assert again.computed == () and len(again.cached) == 4
    pd.testing.assert_frame_equal(again.table, sync_table)

    (tmp_path / SUBJECTS_DIR / "002.parquet").unlink()  # as if the run had crashed before subject 002
    resumed = extract_cohort(cohort_copy, tmp_path, scheduler="sync")
    assert resumed.computed == ("002",)
    pd.testing.assert_frame_equal(resumed.table, sync_table)

    changed = extract_cohort(
        cohort_copy, tmp_path, scheduler="sync", settings=RadiomicsSettings(bin_width=20)
    )
    assert len(changed.computed) == 4
    assert not np.allclose(
        changed.table["original_glcm_Contrast"].fillna(0), sync_table["original_glcm_Contrast"].fillna(0)
    )

    import nibabel as nib

    qsm_path = discover_cohort(cohort_copy).subjects[2].qsm
    img = nib.load(qsm_path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * np.float32(1.01), img.affine), qsm_path)
    edited = extract_cohort(cohort_copy, tmp_path, scheduler="sync", settings=RadiomicsSettings(bin_width=20))
    assert edited.computed == ("003",)


def test_bad_subject_is_named_and_leaves_no_partial_output(cohort_copy, tmp_path):
    """Check that an unreadable QSM fails its subject with a clear error, the others finish, nothing partial."""
    files = discover_cohort(cohort_copy).subjects[1]
    data = files.qsm.read_bytes()
    files.qsm.write_bytes(gzip.compress(gzip.decompress(data)[:2000]))  # a truncated image
    with pytest.raises(InputError) as info:
        extract_cohort(cohort_copy, tmp_path, scheduler="sync")
    text = str(info.value)
    assert f"subject {files.subject}" in text and files.qsm.name in text
    written = sorted(p.name for p in (tmp_path / SUBJECTS_DIR).iterdir())
    assert written == ["001.parquet", "003.parquet", "004.parquet"]
    assert not (tmp_path / FEATURES_FILE).exists()
    assert not _leftovers(tmp_path)


def test_lesion_missing_from_map_is_named(cohort_copy, tmp_path):
    """Check that a lesion listed in the label TSV but absent from the map names subject and lesion."""
    files = discover_cohort(cohort_copy).subjects[0]
    tsv = files.labels
    header = tsv.read_text().splitlines()[0].split("\t")
    tsv.write_text(tsv.read_text() + "\t".join("99" if h == "index" else "0" for h in header) + "\n")
    with pytest.raises(
        InputError, match=rf"subject {files.subject}, lesion 99: lesion index not found in the lesion map"
    ):
        extract_cohort(cohort_copy, tmp_path, scheduler="sync")
    assert not (tmp_path / SUBJECTS_DIR / f"{files.subject}.parquet").exists()


@pytest.mark.parametrize(
    "kwargs, err_type, err_msg",
    [
        ({"scheduler": "spark"}, ValueError, "scheduler must be None, 'local', 'sync', 'ray'"),
        ({"workers": 0}, ValueError, "workers must be an int >= 1"),
        ({"chunk_lesions": 0}, ValueError, "chunk_lesions must be an int >= 1"),
    ],
)
def test_extract_cohort_invalid_arguments(synth_root, tmp_path, kwargs, err_type, err_msg):
    """Check that bad arguments fail before any work with a message naming them."""
    with pytest.raises(err_type, match=err_msg):
        extract_cohort(synth_root, tmp_path, **kwargs)


def _features_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsmrim")
    add_features_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_features_cli(synth_root, tmp_path, capsys, sync_table):
    """Check `qsmrim features ROOT --out DIR`: exit 0, a summary, the same table; exit 1 on a bad root."""
    args = _features_parser().parse_args(
        ["features", str(synth_root), "--out", str(tmp_path), "--scheduler", "sync"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {len(sync_table)} lesion(s) x 527 features of 4 subject(s)" in out
    pd.testing.assert_frame_equal(read_features(tmp_path), sync_table)
    bad = _features_parser().parse_args(["features", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert bad.func(bad) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_subject_files_round_trip_to_the_merged_rows(sync_run, sync_table):
    """Check that each per-subject file (one list column of 527 values) holds exactly its rows of the merged table."""
    from qsmrim.radiomics import read_subject_features

    for path in sorted((sync_run / SUBJECTS_DIR).iterdir()):
        features = read_subject_features(path)
        rows = sync_table[sync_table["subject"] == features.subject].reset_index(drop=True)
        assert len(rows) == len(features) > 0
        np.testing.assert_array_equal(features.values, rows[list(FEATURE_NAMES)].to_numpy())
        assert features.lesions.tolist() == rows["lesion"].tolist()
        pd.testing.assert_frame_equal(features.to_frame(), rows, check_dtype=False)
