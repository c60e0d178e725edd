"""Which onnxruntime execution providers to ask for (shared by the registry loader and the Serve app)."""

from __future__ import annotations

import os
import sys

__all__ = ["gpu_device_present", "choose_providers"]

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
