"""qsmrim.training.layout.RunLayout: every run path from one object."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsmrim.training.layout import RunLayout, member_dir, splits_path, stack_dir


def test_run_layout_paths_match_the_documented_tree():
    """Check each path against the tree in the module docstring, spelled out here independently."""
    run = RunLayout("runs/demo")
    root = Path("runs/demo")
    assert run.root == root
    assert run.config == root / "config.resolved.json"
    assert run.splits == splits_path(root) == root / "splits.json"
    assert (run.lesions, run.patches, run.patch_spec) == (
        root / "prepared" / "lesions.parquet", root / "prepared" / "patches.npy", root / "prepared" / "patches.json"
    )  # fmt: skip
    assert run.synth_cohort == root / "prepared" / "cohort"
    assert run.features == root / "features" / "features.parquet"
    assert (run.evaluation, run.evaluation_json) == (root / "evaluation", root / "evaluation" / "evaluation.json")
    assert run.export_onnx == root / "export" / "model.onnx"
    assert run.ray_storage == root / "ray"
    assert run.member("qsmrimnet", 2, 1) == member_dir(root, "qsmrimnet", 2, 1) == root / "qsmrimnet" / "fold_2" / "seed_1"
    assert run.stack("qsmrimnet", [(2, 0), (2, 1)]) == stack_dir(root, "qsmrimnet", [(2, 0), (2, 1)]) == root / "qsmrimnet" / "fold_2"
    assert run.stack("qsmrimnet", [(0, 0), (1, 0)]) == root / "qsmrimnet"


def test_run_layout_member_done_reads_member_json(tmp_path):
    """Check that a member counts as done only once its member.json exists."""
    run = RunLayout(tmp_path)
    run.member("aprl-nn", 0, 0).mkdir(parents=True)
    assert not run.member_done("aprl-nn", 0, 0)
    (run.member("aprl-nn", 0, 0) / "member.json").write_text("{}")
    assert run.member_done("aprl-nn", 0, 0)


def test_run_layout_unknown_path_names_the_known_ones():
    """Check that a misspelt path raises AttributeError listing the paths that exist."""
    with pytest.raises(AttributeError, match="no path 'confg'; it has config, evaluation"):
        RunLayout("r").confg  # noqa: B018
