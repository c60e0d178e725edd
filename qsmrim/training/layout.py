"""One function builds every path of a run (nnU-Net style), so resume and evaluation find the same files.

::

    <run>/config.resolved.json          the experiment config as run
    <run>/splits.json                   subject-level folds (made once, reused)
    <run>/<model>/fold_<k>/seed_<s>/    one member: model.safetensors | model.skops, member.json,
                                        predictions.parquet; checkpoint.pt while it trains
    <run>/<model>/fold_<k>/stack_checkpoint_seeds-<s,..>.pt   a stacked fit's resume point, while it trains
    <run>/evaluation/                   report.md, report.html, evaluation.json, PNGs
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["member_dir", "member_name", "iter_member_dirs", "splits_path", "stack_dir"]

_MEMBER_RE = re.compile(r"fold_(\d+)/seed_(\d+)$")


def member_dir(run_dir: str | Path, model: str, fold: int, seed: int) -> Path:
    """``<run>/<model>/fold_<k>/seed_<s>``."""
    return Path(run_dir) / model / f"fold_{fold}" / f"seed_{seed}"


def stack_dir(run_dir: str | Path, model: str, members: list[tuple[int, int]] | list[list[int]]) -> Path:
    """Where a stack of (fold, seed) members checkpoints: its fold's folder, or the model's folder for a stack
    across folds."""
    folds = {int(f) for f, _ in members}
    return Path(run_dir) / model / f"fold_{folds.pop()}" if len(folds) == 1 else Path(run_dir) / model


def member_name(model: str, fold: int, seed: int) -> str:
    """Stable trial name (no time stamps: resume relies on it)."""
    return f"{model}-fold={fold}-seed={seed}"


def splits_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "splits.json"


def iter_member_dirs(run_dir: str | Path) -> list[tuple[str, int, int, Path]]:
    """Every finished member under a run: (model, fold, seed, folder), sorted."""
    out = []
    for meta in Path(run_dir).glob("*/fold_*/seed_*/member.json"):
        m = _MEMBER_RE.search(meta.parent.relative_to(meta.parents[2]).as_posix())
        if m:
            out.append((meta.parents[2].name, int(m.group(1)), int(m.group(2)), meta.parent))
    return sorted(out)
