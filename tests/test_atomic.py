"""qsmrim.atomic: a file is replaced whole or not at all."""

from __future__ import annotations

import pytest

from qsmrim.atomic import atomic_path, write_text_atomic


def test_atomic_path_replaces_the_target_and_leaves_no_temporary(tmp_path):
    """Check that a successful write replaces the old content, creates the folder and leaves only the target."""
    target = tmp_path / "deep" / "a.json"
    write_text_atomic(target, "old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_text() == "old"  # nobody sees the new file before the rename
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """Check that an exception mid-write re-raises, keeps the previous file intact and removes the temporary."""
    target = tmp_path / "a.txt"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_path_gives_each_writer_its_own_temporary(tmp_path):
    """Check that two writers of one file get different temporary files, and the last rename wins."""
    target = tmp_path / "a.txt"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer context exits (renames) last


def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path):
    """Check a file written through atomic_path is readable by others as open() would leave it (umask), not
    mkstemp's owner-only 0600: predictions and review pages are read by colleagues on shared drives."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.tsv", "x")
        (tmp_path / "b.tsv").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.tsv").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.tsv").stat().st_mode) == 0o644, oct(mode)
