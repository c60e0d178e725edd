"""onnxruntime sessions: the one place that opens them, chooses their execution providers and names the
graph of each precision.

Shared by the per-model and ensemble parity checks (:mod:`qsmrim.export`), the registry
(:mod:`qsmrim.tracking.registry`) and the Serve app (:mod:`serving.model`). Platform layer: the science
packages never import onnxruntime.

Precisions (issue 18): ``qsmrim export --precision fp16|int8`` writes ``<stem>.<precision>.onnx`` beside the
fp32 ``<stem>.onnx`` (:func:`precision_path_for`); serving finds it by the same rule, and the registry refuses
a graph whose rim calls flip on more lesions than allowed (:func:`check_precision_parity`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "CPU",
    "CUDA",
    "DEFAULT_MAX_RIM_FLIP_SHARE",
    "PRECISIONS",
    "PrecisionParityError",
    "check_precision_parity",
    "choose_providers",
    "gpu_device_present",
    "open_session",
    "precision_of",
    "precision_path_for",
]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: Graph precisions ``qsmrim export`` writes; fp32 is the reference the others are checked against.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
#: Largest share of out-of-fold lesions whose rim call may differ from fp32 for a graph to be registered.
DEFAULT_MAX_RIM_FLIP_SHARE = 0.005


class PrecisionParityError(ValueError):
    """A reduced-precision graph changes too many rim calls against fp32 to be registered or served."""


def precision_path_for(fp32_path: str | Path, precision: str) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (``fp32`` gives the path itself)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {precision!r}")
    path = Path(fp32_path)
    return path if precision == "fp32" else path.with_name(f"{path.stem}.{precision}{path.suffix}")


def precision_of(sidecar: dict[str, Any] | None) -> str:
    """The precision a sidecar declares (``precision.name``); graphs exported before issue 18 are fp32."""
    entry = (sidecar or {}).get("precision")
    name = entry.get("name") if isinstance(entry, dict) else entry
    return name if name in PRECISIONS else "fp32"


def check_precision_parity(sidecar: dict[str, Any], max_rim_flip_share: float = DEFAULT_MAX_RIM_FLIP_SHARE,
                           where: str = "graph") -> None:  # fmt: skip
    """Raise :class:`PrecisionParityError` when a reduced-precision graph's rim calls flip too often.

    fp32 graphs pass (their parity with torch is checked at export). A fp16/int8 graph must carry the parity
    figures ``qsmrim export --precision`` writes (``precision.parity.rim_flips`` and ``lesions``).
    """
    if not 0 <= max_rim_flip_share <= 1:
        raise ValueError(f"max_rim_flip_share must be in [0, 1], not {max_rim_flip_share!r}")
    precision = precision_of(sidecar)
    if precision == "fp32":
        return
    parity = (sidecar.get("precision") or {}).get("parity") or {}
    flips, lesions = parity.get("rim_flips"), parity.get("lesions")
    if not isinstance(flips, int) or not isinstance(lesions, int) or lesions <= 0:
        raise PrecisionParityError(f"{where}: a {precision} graph without parity figures against fp32 "
                                   "(precision.parity.rim_flips/lesions); export it with `qsmrim export --precision`")  # fmt: skip
    share = flips / lesions
    if share > max_rim_flip_share:
        raise PrecisionParityError(
            f"{where}: the {precision} graph flips the rim call of {flips} of {lesions} out-of-fold lesions "
            f"({share:.2%}) against fp32, above the allowed {max_rim_flip_share:.2%}; keep fp32, try "
            f"int8_method/per-channel options, or raise max_rim_flip_share deliberately"
        )


def gpu_device_present() -> bool:
    """Whether an NVIDIA device node exists.

    ``onnxruntime-gpu`` lists the CUDA provider even on CPU-only machines and then logs a loud library error
    at session creation, so CUDA is only asked for where a device exists. Non-Linux systems are asked.
    """
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def choose_providers(providers: list[str] | None = None) -> list[str]:
    """CUDA then CPU when onnxruntime has CUDA and a GPU exists, else CPU; explicit ``providers`` win."""
    if providers:
        return list(providers)
    import onnxruntime as ort

    if CUDA in ort.get_available_providers() and gpu_device_present():
        return [CUDA, CPU]
    return [CPU]


def open_session(path: str | Path, providers: list[str] | None = None, threads: int = 0) -> Any:
    """An ``onnxruntime.InferenceSession`` of the graph at ``path``.

    Parameters
    ----------
    path : str or Path
        The ``.onnx`` file (its external weights, if any, are read from beside it).
    providers : list of str, optional
        Execution providers in order of preference; default: :func:`choose_providers` (CUDA then CPU when
        both onnxruntime's CUDA build and a GPU are there, else CPU).
    threads : int, default=0
        Intra-op threads; 0 lets onnxruntime decide (one per core), > 0 caps it (replicas sharing a machine).
    """
    import onnxruntime as ort

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0, not {threads!r}")
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=choose_providers(providers))
