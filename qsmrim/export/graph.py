"""Export a run's ensemble to ONE ONNX graph and check it against the PyTorch members (DESIGN §5).

The graph has inputs ``patch float32 [N,2,16,32,32]``, ``radiomics float32 [N,527]`` (raw values) and
outputs ``prob float32 [N]``, ``votes int64 [N]``, ``rim bool [N]`` and ``spread float32 [N]`` (our
addition: the member std the HTTP API reports). 15 paper-size members are ~2.1 GB of float32 weights,
above protobuf's 2 GB limit, so large graphs keep their weights in one external file
``<name>.onnx.data`` beside the graph; ``fp16=True`` instead stores the weights as float16 (half the size)
and casts them back to float32 in the graph, with the parity measured and recorded in the sidecar.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsmrim.export.ensemble import (
    OUTPUT_NAMES,
    EnsembleModule,
    check_members,
    load_members,
    reference_predictions,
)
from qsmrim.export.model_graph import (
    BATCH_AXIS,
    DEFAULT_OPSET,
    INPUT_NAMES,
    OnnxParityError,
    restore_unused_inputs,
)
from qsmrim.export.sidecar import build_sidecar, sidecar_path_for, write_sidecar
from qsmrim.models.base import PATCH_SHAPE
from qsmrim.onnx_runtime import CPU, open_session
from qsmrim.training.member import Member

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "FP16_PARITY_ATOL",
    "INPUT_NAMES",
    "PARITY_ATOL",
    "EnsembleParityError",
    "ParityReport",
    "export_ensemble",
    "graph_metadata",
    "verify_ensemble",
]

log = logging.getLogger(__name__)

#: Max |prob| difference between onnxruntime (CPU) and the torch members; DESIGN §5.
PARITY_ATOL = 1e-5
#: The same for float16-stored weights (measured on tiny and paper-size members; the sidecar records the
#: value found at export).
FP16_PARITY_ATOL = 2e-3
#: Weights above this many bytes go to external data: protobuf refuses messages of 2 GiB and the graph
#: itself needs some room.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27


class EnsembleParityError(OnnxParityError):
    """The exported ensemble disagrees with the PyTorch members beyond the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    """What :func:`verify_ensemble` compared and found.

    ``tie_rows`` counts lesions where some member's probability lies within ``atol`` of its threshold:
    there float rounding alone may flip that member's vote, so ``votes``/``rim`` may differ only on them
    (``votes_mismatch``/``rim_mismatch`` count all differing rows, ties included).
    """

    n_rows: int
    max_prob_diff: float
    max_spread_diff: float
    votes_mismatch: int
    rim_mismatch: int
    tie_rows: int
    atol: float
    protocol: str
    provider: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_ensemble(
    source: str | Path | Sequence[Member],
    out_path: str | Path,
    *,
    model: str | None = None,
    protocol: str = "paper",
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    verify: bool = True,
    sidecar: bool = True,
    screening: dict[str, Any] | None = None,
) -> Path:
    """Export every member of a run (or the given members) to one ONNX graph at ``out_path``.

    Parameters
    ----------
    source : path or sequence of Member
        A run folder (``<run>/<model>/fold_<k>/seed_<s>/``) or loaded members.
    out_path : path
        The ``.onnx`` file; with external data its weights go to ``<out_path>.data`` beside it, and the
        sidecar to ``<stem>.json``.
    model : str, optional
        Which trained model of the run (default: its only torch model, else the config's first).
    protocol : {"paper", "honest"}
        Which member thresholds vote.
    fp16 : bool
        Store weights as float16 (computed in float32); halves the file, parity about 1e-3 not 1e-5.
    opset : int
        ONNX opset, at least 17.
    external_data : bool, optional
        Force (``True``) or forbid (``False``) external weights; ``None`` uses them only above ~2 GB.
    verify : bool
        Check parity with the torch members on seeded random inputs (batch 3) before returning.
    sidecar : bool
        Write ``<stem>.json`` (:mod:`qsmrim.export.sidecar`).
    screening : dict, optional
        CV's high-sensitivity point for the sidecar (:func:`qsmrim.export.sidecar.screening_from_evaluation`).

    Returns
    -------
    Path
        ``out_path``.
    """
    import onnx

    t0 = time.perf_counter()
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be >= {DEFAULT_OPSET}, not {opset}")
    members = load_members(source, model) if isinstance(source, str | Path) else list(source)
    check_members(members, protocol)
    if model is not None and any(m.model_name != model for m in members):
        raise ValueError(f"model={model!r} but the members are {sorted({m.model_name for m in members})}")
    feature_names = _feature_names(members)
    n_features = len(feature_names)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"out_path must end in .onnx, not {out_path.name!r}")
    weight_bytes = sum(_member_bytes(m.model) for m in members) + 3 * 8 * n_features * len(members)
    stored_bytes = weight_bytes // 2 if fp16 else weight_bytes
    if external_data is None:
        external_data = stored_bytes > EXTERNAL_DATA_THRESHOLD
    elif not external_data and stored_bytes > EXTERNAL_DATA_THRESHOLD:
        raise ValueError(f"{stored_bytes / 1e9:.2f} GB of weights exceed protobuf's 2 GB limit; "
                         "use external_data=True (or None) or fp16=True")  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_name = out_path.name + ".data"
    log.info("exporting %d %s member(s) (%.1f MB of weights, protocol %s, fp16=%s, external data=%s) to %s",
             len(members), members[0].model_name, weight_bytes / 1e6, protocol, fp16, external_data, out_path)  # fmt: skip

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "traced" / "ensemble.onnx"
        traced.parent.mkdir()
        _trace(members, protocol, traced, n_features, opset)
        proto = onnx.load(str(traced))  # also reads the per-tensor files torch writes for > 2 GB models
        shutil.rmtree(traced.parent)
        restore_unused_inputs(proto, n_features)
        if fp16:
            _weights_to_fp16(proto)
        _set_metadata(proto, members, protocol, feature_names, "float16" if fp16 else "float32", screening)
        staged = Path(tmp) / out_path.name
        if external_data:
            onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)  # fmt: skip
        else:
            onnx.save_model(proto, str(staged))
        del proto
        onnx.checker.check_model(str(staged))  # by path: the only way that works above 2 GB
        _move_into_place(staged, out_path, data_name, external_data)

    parity = None
    if verify:
        # Batch 3 differs from the traced batch of 2, so this also checks the dynamic batch axis.
        patch, radiomics = _self_check_inputs(members, n_features, batch=3, seed=3)
        report = verify_ensemble(out_path, members, patch, radiomics)
        parity = {"inputs": "seeded random, batch 3, with NaN and Inf radiomics", **report.to_dict()}
    seconds = time.perf_counter() - t0
    if sidecar:
        files = {"graph": out_path}
        if external_data:
            files["external_data"] = out_path.with_name(data_name)
        content = build_sidecar(members, protocol=protocol, feature_names=feature_names, files=files, opset=opset,
                                weights_dtype="float16" if fp16 else "float32", parity=parity,
                                export_seconds=round(seconds, 3), screening=screening)  # fmt: skip
        write_sidecar(content, sidecar_path_for(out_path))
    log.info("exported %s in %.1f s", out_path, seconds)
    return out_path


def graph_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of a graph (protocol, thresholds, members, ...), without loading its weights."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def verify_ensemble(
    onnx_path: str | Path,
    members: Sequence[Member],
    patch: np.ndarray | torch.Tensor,
    radiomics: np.ndarray | torch.Tensor,
    *,
    protocol: str | None = None,
    atol: float | None = None,
    batch_size: int = 256,
) -> ParityReport:
    """Run the graph with onnxruntime (CPU) and the members with torch on the same raw inputs; compare.

    Passes when ``max |prob diff| <= atol``, ``max |spread diff| <= atol`` and ``votes`` and ``rim`` are
    identical on every lesion that is not a threshold tie (see :class:`ParityReport`). ``protocol`` and
    ``atol`` default to the graph's own (1e-5, or 2e-3 for float16 weights).

    Raises
    ------
    EnsembleParityError
        Naming the file, the quantity and the first differing rows.
    ValueError
        If the inputs have the wrong shape, or the graph was not built from these members.
    """
    onnx_path = Path(onnx_path)
    meta = graph_metadata(onnx_path)
    protocol = protocol or meta.get("qsmrim.protocol", "paper")
    if atol is None:
        atol = FP16_PARITY_ATOL if meta.get("qsmrim.weights_dtype") == "float16" else PARITY_ATOL
    check_members(members, protocol)
    _check_graph_matches(onnx_path, meta, members, protocol)
    patch = _as_float32(patch, "patch")
    radiomics = _as_float32(radiomics, "radiomics")
    n_features = len(_feature_names(members))
    if patch.ndim != 5 or patch.shape[1:] != PATCH_SHAPE:
        raise ValueError(
            f"patch must have shape [N, {', '.join(map(str, PATCH_SHAPE))}], not {list(patch.shape)}"
        )
    if radiomics.shape != (len(patch), n_features):
        raise ValueError(
            f"radiomics must have shape [{len(patch)}, {n_features}], not {list(radiomics.shape)}"
        )

    session = open_session(onnx_path, [CPU])
    parts = [session.run(list(OUTPUT_NAMES), {"patch": patch[i : i + batch_size], "radiomics": radiomics[i : i + batch_size]})
             for i in range(0, len(patch), batch_size)]  # fmt: skip
    got = {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUT_NAMES)}
    ref = reference_predictions(members, patch, radiomics, protocol)
    for name, dtype in zip(OUTPUT_NAMES, (np.float32, np.int64, np.bool_, np.float32), strict=True):
        if got[name].dtype != dtype or got[name].shape != (len(patch),):
            raise EnsembleParityError(f"{onnx_path}: output {name!r} is {got[name].dtype} {list(got[name].shape)}, "
                                      f"expected {np.dtype(dtype)} [{len(patch)}]")  # fmt: skip
    prob_diff = np.abs(got["prob"].astype(np.float64) - ref.prob)
    spread_diff = np.abs(got["spread"].astype(np.float64) - ref.spread)
    ties = (np.abs(ref.probs - ref.thresholds) <= atol).any(axis=1)
    votes_bad = got["votes"] != ref.votes
    rim_bad = got["rim"] != ref.rim
    report = ParityReport(
        n_rows=len(patch),
        max_prob_diff=float(prob_diff.max(initial=0.0)),
        max_spread_diff=float(spread_diff.max(initial=0.0)),
        votes_mismatch=int(votes_bad.sum()),
        rim_mismatch=int(rim_bad.sum()),
        tie_rows=int(ties.sum()),
        atol=float(atol),
        protocol=protocol,
        provider=session.get_providers()[0],
    )
    if not report.max_prob_diff <= atol:
        rows = np.flatnonzero(prob_diff > atol)[:5].tolist()
        raise EnsembleParityError(f"{onnx_path}: prob differs from the torch ensemble by {report.max_prob_diff:.3g} > "
                                  f"atol={atol:g} (rows {rows})")  # fmt: skip
    if not report.max_spread_diff <= atol:
        raise EnsembleParityError(f"{onnx_path}: spread differs from the torch ensemble by "
                                  f"{report.max_spread_diff:.3g} > atol={atol:g}")  # fmt: skip
    for name, bad in (("votes", votes_bad), ("rim", rim_bad)):
        real = bad & ~ties
        if real.any():
            rows = np.flatnonzero(real)[:5].tolist()
            raise EnsembleParityError(f"{onnx_path}: {name} differs from the torch ensemble on {int(real.sum())} "
                                      f"row(s) that are not threshold ties, e.g. rows {rows}: "
                                      f"onnx {got[name][rows].tolist()} vs torch {getattr(ref, name)[rows].tolist()}")  # fmt: skip
    if report.rim_mismatch or report.votes_mismatch:
        log.warning("%s: votes differ on %d and rim on %d of %d threshold-tie row(s) (a member within %g of its "
                    "threshold)", onnx_path, report.votes_mismatch, report.rim_mismatch, report.tie_rows, atol)  # fmt: skip
    log.info("parity of %s on %d row(s): max |prob diff| %.2g, rim identical off ties", onnx_path, report.n_rows,
             report.max_prob_diff)  # fmt: skip
    return report


# --------------------------------------------------------------------------------------------------- helpers


def _feature_names(members: Sequence[Member]) -> tuple[str, ...]:
    names = tuple(members[0].feature_names)
    if names:
        return names
    from qsmrim.radiomics import FEATURE_NAMES

    return tuple(FEATURE_NAMES)  # image-only members: the input keeps the DESIGN §4 width


def _member_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _trace(members: Sequence[Member], protocol: str, path: Path, n_features: int, opset: int) -> None:
    """Export the ensemble module with torch's TorchScript exporter; the members' train/eval modes are kept."""
    modes = [m.model.training for m in members]
    try:
        module = EnsembleModule(members, protocol, n_features).eval()  # shares CPU float32 models
        _export(module, path, n_features, opset)
    finally:
        for m, training in zip(members, modes, strict=True):
            m.model.train(training)


def _export(module: EnsembleModule, path: Path, n_features: int, opset: int) -> None:
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn((2, *PATCH_SHAPE), generator=gen), torch.randn((2, n_features), generator=gen))
    dynamic = {name: {0: BATCH_AXIS} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is "legacy" in torch >= 2.9; the dynamo one needs onnxscript, which we do not
        # ship, and gives the same graph for these static networks.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*The feature will be removed.*")
        torch.onnx.export(module, example, str(path), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)  # fmt: skip


def _weights_to_fp16(proto: Any) -> None:
    """Store float32 initializers as float16 plus a ``Cast`` back to float32 (weight-only compression)."""
    from onnx import TensorProto, helper, numpy_helper

    new_inits, casts = [], []
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims, dtype=np.int64) < 16:
            new_inits.append(init)
            continue
        arr = numpy_helper.to_array(init)
        if np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError(f"weight {init.name!r} exceeds the float16 range; export with fp16=False")
        half = numpy_helper.from_array(arr.astype(np.float16), init.name + "__fp16")
        new_inits.append(half)
        casts.append(
            helper.make_node(
                "Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=init.name + "__cast"
            )
        )
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(new_inits)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend([*casts, *nodes])


def _set_metadata(proto: Any, members: Sequence[Member], protocol: str, feature_names: Sequence[str],
                  weights_dtype: str, screening: dict[str, Any] | None = None) -> None:  # fmt: skip
    from qsmrim import __version__
    from qsmrim.export.sidecar import feature_names_sha256

    props = {
        "qsmrim.version": __version__,
        "qsmrim.protocol": protocol,
        "qsmrim.n_members": str(len(members)),
        "qsmrim.members": json.dumps([[m.model_name, m.fold, m.seed] for m in members]),
        "qsmrim.thresholds": json.dumps([m.thresholds[protocol] for m in members]),
        "qsmrim.feature_names_sha256": feature_names_sha256(feature_names),
        "qsmrim.n_features": str(len(feature_names)),
        "qsmrim.patch_shape": json.dumps(list(PATCH_SHAPE)),
        "qsmrim.outputs": ",".join(OUTPUT_NAMES),
        "qsmrim.weights_dtype": weights_dtype,
    }
    if screening is not None:  # the graph alone still carries CV's screening threshold (sidecar lost)
        props["qsmrim.screening_threshold"] = repr(float(screening["threshold"]))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "qsmrim"
    proto.producer_version = __version__
    proto.doc_string = f"qsmrim majority-vote ensemble of {len(members)} {members[0].model_name} member(s)"


def _check_graph_matches(path: Path, meta: dict[str, str], members: Sequence[Member], protocol: str) -> None:
    if "qsmrim.members" not in meta:
        raise ValueError(f"{path}: not a qsmrim ensemble graph (no qsmrim.members metadata)")
    ids = [[m.model_name, m.fold, m.seed] for m in members]
    if json.loads(meta["qsmrim.members"]) != ids:
        raise ValueError(
            f"{path}: the graph holds members {meta['qsmrim.members']}, not the given {json.dumps(ids)}"
        )
    if meta.get("qsmrim.protocol") != protocol:
        raise ValueError(
            f"{path}: the graph votes with {meta.get('qsmrim.protocol')!r} thresholds, not {protocol!r}"
        )
    if json.loads(meta["qsmrim.thresholds"]) != [m.thresholds[protocol] for m in members]:
        raise ValueError(f"{path}: the graph's thresholds differ from the members' {protocol!r} thresholds")


def _as_float32(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, not {type(x).__name__}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _self_check_inputs(
    members: Sequence[Member], n_features: int, batch: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded inputs on the scale the members were trained on, with a NaN and an Inf to exercise the median fill."""
    rng = np.random.default_rng(seed)
    patch = rng.normal(size=(batch, *PATCH_SHAPE)).astype(np.float32)
    std = next((m.standardisation for m in members if m.standardisation is not None), None)
    if std is None:
        radiomics = rng.normal(size=(batch, n_features))
    else:
        radiomics = std.median + std.scale * rng.normal(size=(batch, n_features))
    radiomics = radiomics.astype(np.float32)
    radiomics[0, 0] = np.nan
    radiomics[-1, min(1, n_features - 1)] = np.inf
    return patch, radiomics


def _move_into_place(staged: Path, out_path: Path, data_name: str, external_data: bool) -> None:
    """Replace the output (and its weights file) with the staged export; remove a stale weights file."""
    stale = out_path.with_name(data_name)
    if external_data:
        (staged.parent / data_name).replace(stale)
    elif stale.exists():
        stale.unlink()
    staged.replace(out_path)
