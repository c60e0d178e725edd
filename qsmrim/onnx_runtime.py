"""onnxruntime sessions: the one place that opens them and chooses their execution providers.

Shared by the per-model and ensemble parity checks (:mod:`qsmrim.export`), the registry
(:mod:`qsmrim.tracking.registry`) and the Serve app (:mod:`serving.model`). Platform layer: the science
packages never import onnxruntime.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["CPU", "CUDA", "choose_providers", "gpu_device_present", "open_session"]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


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
