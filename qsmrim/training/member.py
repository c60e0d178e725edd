"""A trained ensemble member: weights (safetensors, never a pickled module), thresholds, standardiser, metrics.

A member folder holds ``model.safetensors`` (torch models) or ``model.skops`` (APRL(RF), scikit-learn's
safe format), ``member.json`` (everything needed to rebuild and use it) and ``predictions.parquet``
(the test fold's probabilities).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qsmrim.atomic import write_text_atomic
from qsmrim.radiomics.scaling import fit_scaling, standardise

__all__ = ["MEMBER_FORMAT", "SKOPS_TRUSTED_TYPES", "Member", "Standardisation"]

#: Layout version of ``member.json``. 2 (2026-12-06): image models scale their QSM channel by ``qsm_scale``
#: (default 10); a member written before (no ``format``) was trained on QSM as it is and loads with 1.
MEMBER_FORMAT = 2

SKOPS_TRUSTED_TYPES = ("qsmrim.models.aprl_rf.APRLRandomForest", "sklearn.tree._tree.Tree")
"""The types a saved APRL(RF) member holds beyond skops' own defaults; a ``model.skops`` listing any other
type is refused unloaded (trusting whatever the file lists would run what a tampered file asks for)."""


@dataclass(frozen=True)
class Standardisation:
    """Radiomics standardisation fitted on a training fold: ``(nan_to(x, median) - mean) / scale``
    (:mod:`qsmrim.radiomics.scaling`), kept as arrays so ``member.json`` and the ONNX graph can carry it."""

    mean: np.ndarray
    scale: np.ndarray
    median: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardisation:
        """Statistics of the training rows only (:func:`qsmrim.radiomics.scaling.fit_scaling`)."""
        median, mean, scale = fit_scaling(x)
        return cls(mean, scale, median)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return standardise(x, self.median, self.mean, self.scale).astype(np.float32)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "median": self.median.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, list[float]]) -> Standardisation:
        return cls(*(np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "median")))


@dataclass
class Member:
    """One fitted (model, fold, seed) and what it needs at inference."""

    model_name: str
    model_kwargs: dict[str, Any]
    fold: int
    seed: int
    thresholds: dict[str, float]
    standardisation: Standardisation | None
    feature_names: tuple[str, ...]
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    model: Any = None
    predictions: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        return f"member-fold={self.fold}-seed={self.seed}"

    def predict_proba(self, patch: np.ndarray | None, radiomics: np.ndarray | None, *, device: str = "cpu",
                      batch_size: int = 256) -> np.ndarray:  # fmt: skip
        """Rim+ probability per row from raw inputs (radiomics are standardised here)."""
        from qsmrim.training.predict import predict_member

        return predict_member(self, patch, radiomics, device=device, batch_size=batch_size)

    def save(self, out_dir: str | Path) -> Path:
        """Write the member folder atomically enough for resume: weights first, ``member.json`` last."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.model_name == "aprl-rf":
            import skops.io as sio

            sio.dump(self.model, out / "model.skops")
        else:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(out / "model.safetensors"))
        if self.predictions is not None:
            self.predictions.to_parquet(out / "predictions.parquet", index=False)
        meta = {
            "format": MEMBER_FORMAT,
            "model": self.model_name,
            "model_kwargs": self.model_kwargs,
            "fold": self.fold,
            "seed": self.seed,
            "thresholds": self.thresholds,
            "feature_names": list(self.feature_names),
            "standardisation": self.standardisation.to_json() if self.standardisation else None,
            "metrics": self.metrics,
            "history": self.history,
        }
        write_text_atomic(out / "member.json", json.dumps(meta, indent=1, default=float))
        return out

    @classmethod
    def load(cls, folder: str | Path) -> Member:
        """Rebuild a member from its folder (safetensors / skops; no pickle)."""
        folder = Path(folder)
        meta_path = folder / "member.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{folder}: not a member folder (no member.json)")
        meta = json.loads(meta_path.read_text())
        from qsmrim.models import build_model

        kwargs = dict(meta["model_kwargs"])
        if meta["model"] == "aprl-rf":
            import skops.io as sio

            path = folder / "model.skops"
            unexpected = sorted(set(sio.get_untrusted_types(file=path)) - set(SKOPS_TRUSTED_TYPES))
            if unexpected:
                raise ValueError(
                    f"{path}: refusing to load types qsmrim never writes: {', '.join(unexpected)} "
                    f"(allowed beyond skops' defaults: {', '.join(SKOPS_TRUSTED_TYPES)}); retrain the member"
                )
            model = sio.load(path, trusted=list(SKOPS_TRUSTED_TYPES))
        else:
            from safetensors.torch import load_file

            from qsmrim.models.registry import CAPABILITIES

            if meta.get("format", 1) < 2 and CAPABILITIES[meta["model"]].uses_patch:
                kwargs.setdefault("qsm_scale", 1.0)  # trained before the QSM channel was scaled
            model = build_model(meta["model"], **kwargs)
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            model.eval()
        preds = folder / "predictions.parquet"
        std = meta.get("standardisation")
        return cls(
            model_name=meta["model"],
            model_kwargs=kwargs,
            fold=int(meta["fold"]),
            seed=int(meta["seed"]),
            thresholds={k: float(v) for k, v in meta["thresholds"].items()},
            standardisation=Standardisation.from_json(std) if std else None,
            feature_names=tuple(meta["feature_names"]),
            metrics=meta.get("metrics", {}),
            history=meta.get("history", []),
            model=model,
            predictions=pd.read_parquet(preds) if preds.exists() else None,
        )
