"""The arrays one training run needs, aligned row by row with the lesion table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["LesionDataset"]


@dataclass(frozen=True)
class LesionDataset:
    """Patches, raw radiomics and labels of a cohort's lesions (row ``i`` of each is lesion ``i``).

    ``labels`` is ``int8`` with ``-1`` for ``n/a`` (kept for inference, never trained on). ``radiomics`` is
    ``None`` when features have not been extracted; only models that use radiomics need them.
    """

    subjects: np.ndarray
    lesions: np.ndarray
    labels: np.ndarray
    patches: np.ndarray
    radiomics: np.ndarray | None = None
    feature_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.subjects)
        for name in ("lesions", "labels", "patches"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"LesionDataset.{name} has {len(getattr(self, name))} rows, subjects has {n}")
        if self.radiomics is not None and self.radiomics.shape[0] != n:
            raise ValueError(f"LesionDataset.radiomics has {self.radiomics.shape[0]} rows, subjects has {n}")

    def __len__(self) -> int:
        return len(self.subjects)

    def rim_counts(self) -> dict[str, int]:
        """Rim+ lesions per subject (all subjects, 0 included): the strata of the splits."""
        out = {str(s): 0 for s in np.unique(self.subjects)}
        for s, y in zip(self.subjects, self.labels, strict=True):
            out[str(s)] += int(y == 1)
        return out

    def rows_of(self, subjects: list[str] | set[str], *, labelled: bool = True) -> np.ndarray:
        """Row indices of the given subjects (only labelled rows by default)."""
        mask = np.isin(self.subjects, list(subjects))
        if labelled:
            mask &= self.labels >= 0
        return np.flatnonzero(mask)

    @classmethod
    def from_tables(cls, table: pd.DataFrame, patches: np.ndarray, features: pd.DataFrame | None = None,
                    feature_names: tuple[str, ...] = ()) -> LesionDataset:  # fmt: skip
        """Align a lesion table, its patch array and (optionally) a features table on (subject, lesion)."""
        subjects = table["subject"].astype(str).to_numpy()
        lesions = table["lesion"].astype(np.int64).to_numpy()
        labels = table["rim"].astype("Int8").fillna(-1).astype(np.int8).to_numpy()
        radiomics = None
        if features is not None:
            if not feature_names:
                raise ValueError("feature_names are required with a features table")
            missing = [c for c in feature_names if c not in features.columns]
            if missing:
                raise ValueError(f"features table lacks {len(missing)} feature column(s), e.g. {missing[:3]}")
            f = features.assign(subject=features["subject"].astype(str), lesion=features["lesion"].astype(np.int64))
            f = f.set_index(["subject", "lesion"])
            keys = pd.MultiIndex.from_arrays([subjects, lesions])
            absent = keys.difference(f.index)
            if len(absent):
                raise ValueError(f"features table lacks {len(absent)} lesion(s), e.g. {list(absent[:3])}")
            radiomics = f.loc[keys, list(feature_names)].to_numpy(np.float64)
        return cls(subjects, lesions, labels, patches, radiomics, tuple(feature_names))

    @classmethod
    def from_run_dir(cls, prepared: str | Path, features: str | Path | None = None) -> LesionDataset:
        """Load ``lesions.parquet`` + ``patches.npy`` of a prepared folder and the merged features Parquet."""
        prepared = Path(prepared)
        table = pd.read_parquet(prepared / "lesions.parquet")
        patches = np.load(prepared / "patches.npy", mmap_mode="r")
        if features is None:
            return cls.from_tables(table, patches)
        from qsmrim.radiomics import FEATURE_NAMES

        return cls.from_tables(table, patches, pd.read_parquet(features), tuple(FEATURE_NAMES))
