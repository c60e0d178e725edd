"""The majority-vote ensemble as one ``torch.nn.Module``, and its plain-NumPy reference.

:class:`EnsembleModule` is what gets exported: every member keeps its own radiomics standardisation as
buffers, so the graph takes *raw* radiomic values (DESIGN §5) and a client never needs the training
statistics. :func:`reference_predictions` computes the same outputs through each member's own training-time
inference path (:meth:`qsmrim.training.Member.predict_proba`), so the parity check compares the graph with the
code that chose the thresholds, not with a second copy of the graph's maths.

Decision rule (paper 2.3, :mod:`qsmrim.training.ensemble`): ``prob`` is the member mean, a member votes rim+
when its probability is at or above its own threshold, and ``rim = votes * 2 > n_members``. ``spread`` is the
population standard deviation of the member probabilities (the HTTP API's uncertainty, DESIGN §6).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from qsmrim.models.base import N_RADIOMICS
from qsmrim.training.layout import RunLayout
from qsmrim.training.member import Member, Standardisation

__all__ = [
    "OUTPUT_NAMES",
    "PROTOCOLS",
    "EnsembleModule",
    "EnsembleOutputs",
    "load_members",
    "reference_predictions",
]

log = logging.getLogger(__name__)

#: Threshold protocols a member may carry (``paper``: F1-optimal on the test fold; ``honest``: chosen
#: without the test fold).
PROTOCOLS: tuple[str, ...] = ("paper", "honest")
#: Graph outputs, in order. ``spread`` is our addition to DESIGN §5 (the HTTP API reports it).
OUTPUT_NAMES: tuple[str, ...] = ("prob", "votes", "rim", "spread")


class _Standardise(nn.Module):
    """``(where(isfinite(x), x, median) - mean) / scale`` in float64: :func:`qsmrim.radiomics.scaling.standardise`
    as torch ops, built from a member's fitted :class:`~qsmrim.training.Standardisation`.

    Float64 buffers make the graph repeat NumPy's arithmetic exactly, so the standardised input is
    bit-identical to training time and the parity budget is spent on the network only. Non-finite values
    (NaN and +-Inf, as in ``Standardisation.transform``) become the training median.
    """

    def __init__(self, std: Standardisation | None, n_features: int):
        super().__init__()
        self.identity = std is None
        if std is None:
            # Models without radiomics get zeros, as ``predict_member`` feeds them; the tracer drops them.
            std = Standardisation(np.zeros(n_features), np.ones(n_features), np.zeros(n_features))
        for name in ("mean", "scale", "median"):
            value = np.asarray(getattr(std, name), dtype=np.float64)
            if value.shape != (n_features,):
                raise ValueError(f"standardisation.{name} has shape {value.shape}, expected ({n_features},)")
            self.register_buffer(name, torch.from_numpy(value.copy()))

    def forward(self, x: Tensor) -> Tensor:
        if self.identity:
            return torch.zeros_like(x)
        xd = x.double()
        filled = torch.where(torch.isfinite(xd), xd, self.median)
        return ((filled - self.mean) / self.scale).float()


def _cpu_float32(model: nn.Module) -> nn.Module:
    """``model`` itself when every tensor is a contiguous CPU float32 (or integer) one, else a converted copy."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" and t.is_contiguous() and (t.dtype == torch.float32 or not t.is_floating_point())
           for t in tensors):  # fmt: skip
        return model
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)


class EnsembleModule(nn.Module):
    """All members in one module: ``(patch, raw radiomics) -> (prob, votes, rim, spread)``.

    Parameters
    ----------
    members : sequence of Member
        Torch members (not APRL(RF)) with ``protocol`` thresholds and, for models that use radiomics,
        their standardisation. Their models are copied to CPU float32 in eval mode.
    protocol : {"paper", "honest"}
        Which member threshold votes.
    n_features : int, default=527
        Width of the radiomics input.

    Notes
    -----
    Members' models that are already CPU float32 are shared, not copied (15 paper-size members are 2.1 GB),
    so ``module.eval()`` also switches them to eval mode; others are converted copies.
    """

    def __init__(self, members: Sequence[Member], protocol: str = "paper", n_features: int = N_RADIOMICS):
        super().__init__()
        check_members(members, protocol)
        self.n_members = len(members)
        self.protocol = protocol
        self.nets = nn.ModuleList(_cpu_float32(m.model) for m in members)
        self.standardise = nn.ModuleList(_Standardise(m.standardisation, n_features) for m in members)
        thresholds = torch.tensor([m.thresholds[protocol] for m in members], dtype=torch.float64)
        self.register_buffer("thresholds", thresholds)

    def member_probs(self, patch: Tensor, radiomics: Tensor) -> Tensor:
        """Member probabilities ``float32 [N, n_members]``."""
        return torch.stack(
            [
                torch.sigmoid(net(patch, std(radiomics)))
                for net, std in zip(self.nets, self.standardise, strict=True)
            ],
            dim=1,
        )

    def forward(self, patch: Tensor, radiomics: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        probs = self.member_probs(patch, radiomics)
        prob = probs.mean(dim=1)
        spread = torch.sqrt(((probs - prob.unsqueeze(1)) ** 2).mean(dim=1))
        # Compare in float64 against float64 thresholds: the same test as NumPy at training time.
        votes = (probs.double() >= self.thresholds).to(torch.int64).sum(dim=1)
        rim = votes * 2 > self.n_members
        return prob, votes, rim, spread


@dataclass(frozen=True)
class EnsembleOutputs:
    """Reference outputs plus the member probabilities they come from (``probs [N, n_members]``, float64)."""

    prob: np.ndarray
    votes: np.ndarray
    rim: np.ndarray
    spread: np.ndarray
    probs: np.ndarray
    thresholds: np.ndarray


def reference_predictions(
    members: Sequence[Member], patch: np.ndarray, radiomics: np.ndarray, protocol: str = "paper"
) -> EnsembleOutputs:
    """The ensemble's outputs through each member's own inference path (torch, CPU), in float64."""
    check_members(members, protocol)
    probs = np.stack([m.predict_proba(patch, radiomics, device="cpu") for m in members], axis=1)
    thresholds = np.array([m.thresholds[protocol] for m in members], dtype=np.float64)
    votes = (probs >= thresholds).sum(axis=1).astype(np.int64)
    return EnsembleOutputs(
        prob=probs.mean(axis=1),
        votes=votes,
        rim=votes * 2 > len(members),
        spread=probs.std(axis=1),
        probs=probs,
        thresholds=thresholds,
    )


def check_members(members: Sequence[Member], protocol: str) -> None:
    """Fail early, naming the member, when the members cannot form one exported ensemble."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, not {protocol!r}")
    if not members:
        raise ValueError("no members to export")
    names = {tuple(m.feature_names) for m in members}
    if len(names) > 1:
        raise ValueError("members were trained on different feature lists; export one run's members only")
    for m in members:
        if not isinstance(m.model, nn.Module):
            raise TypeError(f"{m.model_name} {m.name}: only torch members can be exported to ONNX "
                            f"(APRL(RF) is a scikit-learn forest)")  # fmt: skip
        if protocol not in m.thresholds:
            raise ValueError(f"{m.model_name} {m.name} has no {protocol!r} threshold (has {sorted(m.thresholds)}); "
                             "train with inner_val_fraction > 0 for 'honest', or export with protocol='paper'")  # fmt: skip
        if getattr(m.model, "uses_radiomics", False) and m.standardisation is None:
            raise ValueError(
                f"{m.model_name} {m.name} uses radiomics but has no standardisation in member.json"
            )


def load_members(run_dir: str | Path, model: str | None = None) -> list[Member]:
    """Load one model's members of a run, ordered by (fold, seed).

    ``model=None`` picks the run's only torch model, else the first of ``config.resolved.json``'s ``models``
    that was trained; several candidates without a config is an error listing them.
    """
    from qsmrim.models import is_torch_model
    from qsmrim.training.layout import iter_member_dirs

    run_dir = Path(run_dir)
    found = iter_member_dirs(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no trained members (<model>/fold_<k>/seed_<s>/member.json)")
    trained = sorted({name for name, *_ in found})
    if model is None:
        model = _default_model(run_dir, [t for t in trained if is_torch_model(t)], trained)
    if model not in trained:
        raise ValueError(f"{run_dir}: no members of model {model!r}; trained models: {', '.join(trained)}")
    if not is_torch_model(model):
        raise ValueError(f"{run_dir}: model {model!r} is not a torch model and cannot be exported to ONNX")
    members = [Member.load(folder) for name, _f, _s, folder in found if name == model]
    log.info("loaded %d %s member(s) from %s", len(members), model, run_dir)
    return members


def _default_model(run_dir: Path, torch_models: list[str], trained: list[str]) -> str:
    if len(torch_models) == 1:
        return torch_models[0]
    config = RunLayout(run_dir).config
    if config.exists():
        try:
            wanted = json.loads(config.read_text()).get("models", [])
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{config}: not a JSON object with a 'models' list ({exc})") from exc
        for name in wanted:
            if name in torch_models:
                return name
    if not torch_models:
        raise ValueError(f"{run_dir}: no torch model among the trained ones ({', '.join(trained)})")
    raise ValueError(
        f"{run_dir}: several models were trained ({', '.join(torch_models)}); choose one with model="
    )
