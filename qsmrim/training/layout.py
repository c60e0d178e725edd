"""One object builds every path of a run (nnU-Net's one output-folder function), so resume, evaluation and
export find the same files.

::

    <run>/config.resolved.json          the experiment config as run
    <run>/splits.json                   subject-level folds (made once, reused)
    <run>/prepared/                     lesions.parquet, patches.npy + patches.json (qsmrim.prepare);
                                        cohort/ when the cohort is synthetic
    <run>/features/features.parquet     the radiomics of every lesion (qsmrim.fanout.features)
    <run>/<model>/fold_<k>/seed_<s>/    one member: model.safetensors | model.skops, member.json,
                                        predictions.parquet; checkpoint.pt while it trains
    <run>/<model>/fold_<k>/stack_checkpoint_seeds-<s,..>.pt   a stacked fit's resume point, while it trains
    <run>/evaluation/                   report.md, report.html, evaluation.json, oof.parquet, PNGs
    <run>/export/model.onnx             the exported ensemble (+ model.json) of run_pipeline
    <run>/ray/                          Ray Tune/Train storage (unless grid.storage_path says otherwise)

:class:`RunLayout` names each of these; :func:`member_dir`, :func:`stack_dir` and :func:`splits_path` are
its most used paths as functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MEMBER_FILE", "RunLayout", "member_dir", "member_name", "iter_member_dirs", "splits_path", "stack_dir"]

_MEMBER_RE = re.compile(r"fold_(\d+)/seed_(\d+)$")
MEMBER_FILE = "member.json"
"""Written last into a member folder (:meth:`qsmrim.training.member.Member.save`): its presence means done."""


_FILES: dict[str, str] = {
    "config": "config.resolved.json",
    "splits": "splits.json",
    "prepared": "prepared",
    "synth_cohort": "prepared/cohort",
    "lesions": "prepared/lesions.parquet",
    "patches": "prepared/patches.npy",
    "patch_spec": "prepared/patches.json",
    "features": "features/features.parquet",
    "evaluation": "evaluation",
    "evaluation_json": "evaluation/evaluation.json",
    "export_onnx": "export/model.onnx",
    "ray_storage": "ray",
}
"""Each fixed path of a run, relative to its root (the tree above, as data)."""


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder ``root``; nothing here touches the disk.

    Each key of ``_FILES`` is an attribute, ``root / <relative path>``: ``config``, ``splits``, ``prepared``,
    ``synth_cohort`` (a synthetic cohort's folder), ``lesions``, ``patches``, ``patch_spec``, ``features``,
    ``evaluation``, ``evaluation_json``, ``export_onnx``, ``ray_storage``.

    Example:
        >>> RunLayout("runs/demo").features.as_posix()
        'runs/demo/features/features.parquet'
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __getattr__(self, name: str) -> Path:
        if name not in _FILES:  # "root" too, before __post_init__ (copy, unpickling)
            raise AttributeError(f"RunLayout has no path {name!r}; it has {', '.join(sorted(_FILES))}")
        return self.root / _FILES[name]

    def member(self, model: str, fold: int, seed: int) -> Path:
        """``<run>/<model>/fold_<k>/seed_<s>``."""
        return self.root / model / f"fold_{fold}" / f"seed_{seed}"

    def member_done(self, model: str, fold: int, seed: int) -> bool:
        """Whether that member finished (its ``member.json`` is written last)."""
        return (self.member(model, fold, seed) / MEMBER_FILE).exists()

    def stack(self, model: str, members: Sequence[Sequence[int]]) -> Path:
        """Where a stack of (fold, seed) members checkpoints: its fold's folder, or the model's folder for a
        stack across folds."""
        folds = {int(f) for f, _ in members}
        return self.root / model / f"fold_{folds.pop()}" if len(folds) == 1 else self.root / model


def member_dir(run_dir: str | Path, model: str, fold: int, seed: int) -> Path:
    """``<run>/<model>/fold_<k>/seed_<s>`` (:meth:`RunLayout.member`)."""
    return RunLayout(Path(run_dir)).member(model, fold, seed)


def stack_dir(run_dir: str | Path, model: str, members: Sequence[Sequence[int]]) -> Path:
    """:meth:`RunLayout.stack`."""
    return RunLayout(Path(run_dir)).stack(model, members)


def member_name(model: str, fold: int, seed: int) -> str:
    """Stable trial name (no time stamps: resume relies on it)."""
    return f"{model}-fold={fold}-seed={seed}"


def splits_path(run_dir: str | Path) -> Path:
    """:attr:`RunLayout.splits`."""
    return RunLayout(Path(run_dir)).splits


def iter_member_dirs(run_dir: str | Path) -> list[tuple[str, int, int, Path]]:
    """Every finished member under a run: (model, fold, seed, folder), sorted."""
    out = []
    for meta in Path(run_dir).glob(f"*/fold_*/seed_*/{MEMBER_FILE}"):
        m = _MEMBER_RE.search(meta.parent.relative_to(meta.parents[2]).as_posix())
        if m:
            out.append((meta.parents[2].name, int(m.group(1)), int(m.group(2)), meta.parent))
    return sorted(out)
