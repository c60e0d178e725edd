"""Half-precision and int8 versions of an exported ensemble, and their parity against fp32 (issue 18).

Why this exists: the paper-size graph (15 ResNet-18-3D members) is too slow on CPU-only hospital nodes in
float32, and fp16 halves a GPU's memory traffic. Both are *derived* from the fp32 graph written by
:func:`qsmrim.export.export_ensemble`, which stays the reference; each lands beside it as
``<stem>.<precision>.onnx`` with its own sidecar (:func:`qsmrim.model_sidecar.precision_path_for`).

What was measured on onnxruntime 1.31, CPU, and decided here (bench/RESULTS.md, "Precision"):

* **int8, static, QOperator** (the default): ``QLinearConv``/``QGemm`` with uint8 activations and int8
  per-channel weights, calibrated (MinMax) on training lesions. The QDQ format leaves 11 of a member's 20
  Conv3d in float: onnxruntime fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` only where the DQ has one
  consumer, and every residual block's input feeds both its first conv and the skip connection.
* **Convs with few input channels stay float** (``float_conv_max_in_channels``): the stem's 2-channel 7x7x7
  conv is 6x *slower* as ``QLinearConv`` (204 ms vs 32 ms per 25 lesions) and is one conv of twenty.
* **int8, dynamic** turns Conv3d into ``ConvInteger``, which is ~2x slower than float here; offered for
  measurement (``method="dynamic"``), not the default.
* **fp16**: onnxruntime's float16 converter with float32 inputs/outputs kept; meant for CUDA (on CPU
  onnxruntime runs it slowly, which is fine for the parity check).

Parity (:func:`precision_parity`) compares the candidate graph with the fp32 torch members (which the fp32
graph matches within 1e-5) on every out-of-fold lesion of the run: max |prob diff|, lesions whose vote count
changes, lesions whose rim call flips, and the CV PR AUC of both (fold ensembles, members' own thresholds).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qsmrim.export.ensemble import OUTPUT_NAMES, check_members, reference_predictions
from qsmrim.model_sidecar import file_sha256, read_sidecar, sidecar_path_for, write_sidecar
from qsmrim.onnx_runtime import CPU, DEFAULT_MAX_RIM_FLIP_SHARE, PRECISIONS, open_session, precision_path_for
from qsmrim.training.member import Member

__all__ = [
    "DEFAULT_MAX_RIM_FLIP_SHARE",
    "INT8_FORMATS",
    "INT8_METHODS",
    "PRECISIONS",
    "PrecisionConfig",
    "convert_graph",
    "export_precision",
    "graph_member_probs",
    "precision_parity",
]

log = logging.getLogger(__name__)

INT8_METHODS: tuple[str, ...] = ("static", "dynamic")
INT8_FORMATS: tuple[str, ...] = ("qoperator", "qdq")
#: Name of the extra output the parity check adds to a copy of the graph (never to the shipped file).
MEMBER_PROBS = "member_probs"
_QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
_PROTOBUF_LIMIT = 2**31 - 2**27


@dataclass(frozen=True)
class PrecisionConfig:
    """How an fp32 graph is turned into int8 or fp16.

    Parameters
    ----------
    int8_method : {"static", "dynamic"}, default="static"
        Static: activation ranges calibrated on training lesions. Dynamic: ranges computed per batch at run
        time (Conv3d becomes ``ConvInteger``: slower than float on CPU, see the module docstring).
    int8_format : {"qoperator", "qdq"}, default="qoperator"
        Static only: quantised operators (``QLinearConv``) or float ops between Q/DQ pairs.
    per_channel : bool, default=True
        One weight scale per output channel (parity about 3x better than per tensor).
    calibration_rows : int, default=128
        Training lesions fed to the calibrator (seeded sample).
    calibration_batch : int, default=16
        Rows per calibration batch (memory: the calibrator keeps every activation of a batch).
    float_conv_max_in_channels : int, default=2
        Convs with at most this many input channels per group stay float (the stem).
    seed : int, default=0
        Seed of the calibration sample.
    """

    int8_method: str = "static"
    int8_format: str = "qoperator"
    per_channel: bool = True
    calibration_rows: int = 128
    calibration_batch: int = 16
    float_conv_max_in_channels: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.int8_method not in INT8_METHODS:
            raise ValueError(f"int8_method must be one of {list(INT8_METHODS)}, not {self.int8_method!r}")
        if self.int8_format not in INT8_FORMATS:
            raise ValueError(f"int8_format must be one of {list(INT8_FORMATS)}, not {self.int8_format!r}")
        for name in ("calibration_rows", "calibration_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        if isinstance(self.float_conv_max_in_channels, bool) or not isinstance(self.float_conv_max_in_channels, int) \
                or self.float_conv_max_in_channels < 0:  # fmt: skip
            raise ValueError(
                f"float_conv_max_in_channels must be an int >= 0, not {self.float_conv_max_in_channels!r}"
            )


def convert_graph(
    fp32_path: str | Path,
    out_path: str | Path,
    precision: str,
    *,
    config: PrecisionConfig = PrecisionConfig(),
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write the ``precision`` version of the fp32 ensemble graph at ``fp32_path`` to ``out_path``.

    ``calibration`` is ``(patch, radiomics)`` of training lesions, required for static int8. Returns what
    was done (method, format, which ops stayed float, seconds) for the sidecar. The graph keeps its
    interface (float32 inputs and outputs, DESIGN section 5) and its ``qsmrim.*`` metadata, plus
    ``qsmrim.precision``.
    """
    import onnx

    if precision not in PRECISIONS or precision == "fp32":
        raise ValueError(f"precision must be 'fp16' or 'int8' (fp32 is the export itself), not {precision!r}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"out_path must end in .onnx, not {out_path.name!r}")
    t0 = time.perf_counter()
    proto = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in proto.metadata_props}
    _inline_identities(proto)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".precision-") as tmp:
        staged = Path(tmp) / out_path.name
        if precision == "fp16":
            details = _to_fp16(proto, staged)
        else:
            details = _to_int8(proto, Path(tmp), staged, config, calibration)
        del proto
        result = onnx.load(str(staged))
        _set_props(
            result,
            {**props, "qsmrim.precision": precision, "qsmrim.weights_dtype": _weights_dtype(precision)},
        )
        final = Path(tmp) / "final" / out_path.name
        final.parent.mkdir()
        if not _fits_bytesize(result):
            raise ValueError(f"{out_path}: the {precision} graph exceeds protobuf's 2 GB limit")
        onnx.save_model(result, str(final))
        onnx.checker.check_model(str(final))
        final.replace(out_path)
    stale = out_path.with_name(out_path.name + ".data")
    if stale.exists():
        stale.unlink()
    details["seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "wrote %s (%s, %s) in %.1f s", out_path, precision, details.get("method", ""), details["seconds"]
    )
    return details


def graph_member_probs(
    path: str | Path, patch: np.ndarray, radiomics: np.ndarray, *, threads: int = 0, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """The graph's outputs plus each member's probability (``member_probs [N, M]``), on CPU.

    The member probabilities are the input of the node that averages them into ``prob``; a copy of the graph
    exposes that tensor as an extra output, so the shipped file keeps the DESIGN section 5 interface.
    """
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    node = producers.get("prob")
    while node is not None and node.op_type == "Cast":
        node = producers.get(node.input[0])
    if node is None or node.op_type != "ReduceMean":
        raise ValueError(
            f"{path}: cannot find the member average behind output 'prob' (not a qsmrim ensemble?)"
        )
    proto.graph.node.append(helper.make_node("Cast", [node.input[0]], [MEMBER_PROBS], to=TensorProto.FLOAT,
                                             name="qsmrim_parity_member_probs"))  # fmt: skip
    proto.graph.output.append(helper.make_tensor_value_info(MEMBER_PROBS, TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix="qsmrim-parity-") as tmp:
        copy = Path(tmp) / "parity.onnx"
        onnx.save_model(proto, str(copy), save_as_external_data=not _fits_bytesize(proto),
                        all_tensors_to_one_file=True, location="parity.onnx.data")  # fmt: skip
        del proto
        session = open_session(copy, [CPU], threads)
        names = [*OUTPUT_NAMES, MEMBER_PROBS]
        parts = [session.run(names, {"patch": np.ascontiguousarray(patch[i : i + batch_size], np.float32),
                                     "radiomics": np.ascontiguousarray(radiomics[i : i + batch_size], np.float32)})
                 for i in range(0, len(patch), batch_size)]  # fmt: skip
    out = {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}
    out[MEMBER_PROBS] = out[MEMBER_PROBS].reshape(len(patch), -1)
    return out


def precision_parity(
    members: Sequence[Member],
    candidate: str | Path,
    patch: np.ndarray,
    radiomics: np.ndarray,
    keys: tuple[np.ndarray, np.ndarray],
    *,
    protocol: str = "paper",
    threads: int = 0,
) -> dict[str, Any]:
    """Compare the ``candidate`` graph with the fp32 torch members on the run's out-of-fold lesions.

    Parameters
    ----------
    members : sequence of Member
        The members in the graph, with their test-fold predictions (for the CV PR AUC).
    candidate : path
        The fp16 or int8 graph.
    patch, radiomics : ndarray
        Raw inputs of the lesions, one row per lesion of ``keys``.
    keys : (subjects, lesions)
        Identify each row, to align the graph's member probabilities with each member's test fold.

    Returns
    -------
    dict
        ``lesions``, ``max_prob_diff``, ``vote_flips`` (lesions whose vote count differs), ``rim_flips`` (rim call
        differs), ``rim_flip_share``, ``max_member_prob_diff``, and ``cv_pr_auc_fp32``, ``cv_pr_auc``,
        ``cv_pr_auc_diff`` (candidate minus fp32; None where the run has no labelled positives in a fold).
    """
    check_members(members, protocol)
    ref = reference_predictions(members, patch, radiomics, protocol)
    got = graph_member_probs(candidate, patch, radiomics, threads=threads)
    if got[MEMBER_PROBS].shape != ref.probs.shape:
        raise ValueError(
            f"{candidate}: {got[MEMBER_PROBS].shape[1]} member probabilities, expected {len(members)}"
        )
    n = len(patch)
    rim_flips = int((got["rim"] != ref.rim).sum())
    out: dict[str, Any] = {
        "reference": "fp32 torch members (the fp32 graph matches them within 1e-5)",
        "lesions": n,
        "max_prob_diff": float(np.abs(got["prob"].astype(np.float64) - ref.prob).max(initial=0.0)),
        "max_member_prob_diff": float(
            np.abs(got[MEMBER_PROBS].astype(np.float64) - ref.probs).max(initial=0.0)
        ),
        "vote_flips": int((got["votes"] != ref.votes).sum()),
        "rim_flips": rim_flips,
        "rim_flip_share": rim_flips / n if n else 0.0,
    }
    ref_auc = _cv_pr_auc(members, keys, ref.probs, protocol)
    cand_auc = _cv_pr_auc(members, keys, got[MEMBER_PROBS].astype(np.float64), protocol)
    out["cv_pr_auc_fp32"] = ref_auc
    out["cv_pr_auc"] = cand_auc
    out["cv_pr_auc_diff"] = None if ref_auc is None or cand_auc is None else cand_auc - ref_auc
    return out


def export_precision(
    members: Sequence[Member],
    fp32_path: str | Path,
    precision: str,
    *,
    patch: np.ndarray,
    radiomics: np.ndarray,
    keys: tuple[np.ndarray, np.ndarray],
    calibration_rows: np.ndarray | None = None,
    config: PrecisionConfig = PrecisionConfig(),
    threads: int = 0,
) -> Path:
    """Convert the fp32 export at ``fp32_path``, check its parity on the given lesions, write its sidecar.

    ``patch``/``radiomics``/``keys`` are the run's out-of-fold lesions (every labelled CV lesion);
    ``calibration_rows`` indexes the rows used to calibrate static int8 (default: a seeded sample of
    ``config.calibration_rows`` of them: each lesion is a training lesion of four folds out of five).
    Returns ``<stem>.<precision>.onnx``; its sidecar is the fp32 one plus ``precision`` (what was done and the
    parity figures) and the new file hashes.
    """
    fp32_path = Path(fp32_path)
    fp32_side = read_sidecar(sidecar_path_for(fp32_path))
    protocol = fp32_side["protocol"]
    out = precision_path_for(fp32_path, precision)
    calibration = None
    if precision == "int8" and config.int8_method == "static":
        if calibration_rows is None:
            rng = np.random.default_rng(config.seed)
            k = min(config.calibration_rows, len(patch))
            calibration_rows = np.sort(rng.choice(len(patch), size=k, replace=False))
        calibration = (
            np.asarray(patch[calibration_rows], np.float32),
            np.asarray(radiomics[calibration_rows], np.float32),
        )
    details = convert_graph(fp32_path, out, precision, config=config, calibration=calibration)
    if calibration is not None:
        details["calibration"] = {"rows": len(calibration[0]), "source": "seeded sample of the run's training lesions",
                                  "seed": config.seed}  # fmt: skip
    parity = precision_parity(members, out, patch, radiomics, keys, protocol=protocol, threads=threads)
    side = dict(fp32_side)
    # The top-level parity is the fp32 graph's check against torch: keep it under precision, not as this graph's.
    side["parity"] = None
    side["precision"] = {"name": precision, "reference_graph": fp32_path.name, **details, "parity": parity,
                         "reference_parity_with_torch": fp32_side.get("parity")}  # fmt: skip
    side["onnx"] = {**fp32_side["onnx"], "weights_dtype": _weights_dtype(precision),
                    "files": {"graph": {"name": out.name, "bytes": out.stat().st_size, "sha256": file_sha256(out)}}}  # fmt: skip
    write_sidecar(side, sidecar_path_for(out))
    log.info("%s parity on %d lesions: max |prob diff| %.3g, %d vote and %d rim flips, CV PR AUC %s vs %s (fp32)",
             out.name, parity["lesions"], parity["max_prob_diff"], parity["vote_flips"], parity["rim_flips"],
             _fmt(parity["cv_pr_auc"]), _fmt(parity["cv_pr_auc_fp32"]))  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------- helpers


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _weights_dtype(precision: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "int8": "int8"}[precision]


def _fits_bytesize(proto: Any) -> bool:
    """Whether the in-memory model can be serialised as one protobuf (weights counted from their raw bytes)."""
    total = sum(len(t.raw_data) for t in proto.graph.initializer)
    return total < _PROTOBUF_LIMIT


def _set_props(proto: Any, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _inline_identities(proto: Any) -> None:
    """Drop ``Identity`` nodes that copy an initializer (torch's exporter emits them for shared weights).

    The quantiser only quantises a bias that *is* an initializer; behind an Identity it warns and leaves
    the conv's bias float. Renaming the consumers' inputs to the initializer is exact.
    """
    inits = {i.name for i in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    rename, keep = {}, []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _sort_nodes(proto: Any) -> None:
    """Order the graph's nodes topologically (stable: ready nodes keep their relative order)."""
    ready = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer} | {""}
    pending, ordered = list(proto.graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {rest[0].name!r}")
        pending = rest
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)


def _float_convs(proto: Any, max_in_channels: int) -> list[str]:
    inits = {i.name: i for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "Conv" and n.input[1] in inits and inits[n.input[1]].dims[1] <= max_in_channels]  # fmt: skip


def _to_fp16(proto: Any, staged: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    _sort_nodes(half)  # the converter appends its input casts at the end; the checker wants graph order
    onnx.save_model(half, str(staged))
    return {"method": "onnxruntime.transformers.float16 (float32 inputs and outputs kept)"}


def _to_int8(proto: Any, tmp: Path, staged: Path, config: PrecisionConfig,
             calibration: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:  # fmt: skip
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    excluded = _float_convs(proto, config.float_conv_max_in_channels)
    large = not _fits_bytesize(proto)
    src = tmp / "prepared.onnx"
    onnx.save_model(proto, str(src), save_as_external_data=large, all_tensors_to_one_file=True,
                    location="prepared.onnx.data")  # fmt: skip
    logging.getLogger().addFilter(_quiet_preprocess_advice)
    common = {"op_types_to_quantize": list(_QUANTIZED_OPS), "per_channel": config.per_channel,
              "nodes_to_exclude": excluded, "use_external_data_format": large}  # fmt: skip
    if config.int8_method == "dynamic":
        quantize_dynamic(str(src), str(staged), weight_type=QuantType.QInt8, **common)
        fmt = "ConvInteger/MatMulInteger"
    else:
        if calibration is None:
            raise ValueError("static int8 needs calibration lesions (patch, radiomics)")
        fmt = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}[config.int8_format]
        quantize_static(str(src), str(staged), _Calibration(*calibration, config.calibration_batch),
                        quant_format=fmt, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        **common)  # fmt: skip
        fmt = config.int8_format
    return {
        "method": config.int8_method,
        "format": fmt,
        "per_channel": config.per_channel,
        "quantized_op_types": list(_QUANTIZED_OPS),
        "float_convs": len(excluded),
        "float_conv_max_in_channels": config.float_conv_max_in_channels,
    }


def _quiet_preprocess_advice(record: logging.LogRecord) -> bool:
    """Drop the quantiser's "consider pre-processing" advice (root logger): the graph is already prepared here
    (identities inlined; shape inference would not help Conv3d), so it is noise in ``qsmrim export``'s output."""
    return "pre-processing before quantization" not in record.getMessage()


class _Calibration:
    """``CalibrationDataReader`` over cached training lesions, ``batch`` rows at a time."""

    def __init__(self, patch: np.ndarray, radiomics: np.ndarray, batch: int):
        self.patch, self.radiomics, self.batch, self.start = patch, radiomics, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.patch):
            return None
        s = slice(self.start, self.start + self.batch)
        self.start += self.batch
        return {
            "patch": np.ascontiguousarray(self.patch[s]),
            "radiomics": np.ascontiguousarray(self.radiomics[s]),
        }

    def rewind(self) -> None:
        self.start = 0


def _cv_pr_auc(members: Sequence[Member], keys: tuple[np.ndarray, np.ndarray], probs: np.ndarray,
               protocol: str) -> float | None:  # fmt: skip
    """CV PR AUC of fold ensembles whose member probabilities are ``probs`` (rows aligned with ``keys``)."""
    from qsmrim.evaluation import evaluate_predictions
    from qsmrim.training.ensemble import fold_ensemble_predictions

    if any(m.predictions is None for m in members):
        return None
    index = {(str(s), int(le)): i for i, (s, le) in enumerate(zip(*keys, strict=True))}
    replaced = []
    for k, m in enumerate(members):
        pred = m.predictions
        rows = [index.get((str(s), int(le))) for s, le in zip(pred["subject"], pred["lesion"], strict=True)]
        if any(r is None for r in rows):
            raise ValueError(f"{m.name}: its test-fold lesions are not all among the parity lesions")
        replaced.append(dataclasses.replace(m, predictions=pred.assign(prob=probs[np.asarray(rows), k])))
    ens = fold_ensemble_predictions(replaced, protocol)
    ens = ens[ens["rim"] >= 0]
    try:
        res = evaluate_predictions(ens, protocol="given", method=members[0].model_name)
    except ValueError as exc:
        log.warning("CV PR AUC not computable on these lesions: %s", exc)
        return None
    auc = (res.get("pr") or {}).get("auc")
    return float(auc) if isinstance(auc, int | float) and np.isfinite(auc) else None
