"""Export one torch rim classifier to ONNX and check the graph against torch (MONAI ``convert_to_onnx`` style).

Every exported graph has the same interface whatever the model uses: inputs ``patch float32
[N, 2, 16, 32, 32]`` and ``radiomics float32 [N, 527]``, output ``logit float32 [N]``, with a dynamic
batch axis ``N``. Inputs a model ignores (APRL(NN) ignores ``patch``, the image models ``radiomics``)
are dropped by the tracer and put back as unused graph inputs (:func:`restore_unused_inputs`), so callers
feed every model alike.

The ensemble graph of DESIGN.md section 5 (standardisation, member mean, votes) is built by
:mod:`qsmrim.export.graph`; this module is the per-model building block and its parity check. It lives in
the export package (platform layer) because the check runs onnxruntime, which the science packages never
import.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsmrim.models.base import N_RADIOMICS, PATCH_SHAPE, RimClassifier, example_inputs
from qsmrim.onnx_runtime import CPU, open_session

__all__ = [
    "BATCH_AXIS",
    "DEFAULT_OPSET",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "PARITY_ATOL",
    "OnnxParityError",
    "export_onnx",
    "restore_unused_inputs",
    "verify_onnx",
]

logger = logging.getLogger(__name__)

#: Lowest opset we export (BatchNorm / GlobalAveragePool / Gemm are all stable there).
DEFAULT_OPSET = 17
INPUT_NAMES: tuple[str, str] = ("patch", "radiomics")
OUTPUT_NAME = "logit"
BATCH_AXIS = "N"
#: Maximum absolute logit difference accepted between onnxruntime (CPU) and torch; DESIGN.md section 5.
PARITY_ATOL = 1e-5


class OnnxParityError(AssertionError):
    """The exported graph's output differs from torch beyond the tolerance."""


def export_onnx(
    model: RimClassifier,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    n_radiomics: int = N_RADIOMICS,
    verify: bool = True,
    atol: float = PARITY_ATOL,
) -> Path:
    """Export ``model`` (in eval mode, float32, on CPU) to ``path`` and, by default, check parity.

    Parameters
    ----------
    model : RimClassifier
        Any torch model of :mod:`qsmrim.models`; it is not modified (a CPU float32 copy is exported
        and the original's train/eval mode is left as it was).
    path : str or Path
        Output ``.onnx`` file; parent folders are created.
    opset : int, default=17
        ONNX opset; at least 17.
    n_radiomics : int, default=527
        Width of the ``radiomics`` input.
    verify : bool, default=True
        Run :func:`verify_onnx` on batch sizes 1 and 3 (checks the dynamic batch axis too).
    atol : float, default=1e-5
        Parity tolerance on the logits.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OnnxParityError
        If ``verify`` and the graph differs from torch by more than ``atol``.
    """
    import copy

    import onnx

    if not isinstance(model, RimClassifier):
        raise TypeError(f"model must be a qsmrim RimClassifier, not {type(model).__name__}")
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be >= {DEFAULT_OPSET}, not {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = (
        copy.deepcopy(model)
        .to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
        .eval()
    )
    inputs = example_inputs(2, n_radiomics=n_radiomics)
    dynamic = {name: {0: BATCH_AXIS} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch >= 2.9 warns that the TorchScript exporter is legacy; the dynamo exporter needs the
        # extra onnxscript package and gives the same graph for these static networks.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*The feature will be removed.*")
        torch.onnx.export(
            net,
            inputs,
            buffer,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    restore_unused_inputs(proto, n_radiomics)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    logger.info("Exported %s to %s (opset %d)", type(model).__name__, path, opset)
    if verify:
        for batch in (1, 3):
            patch, radiomics = example_inputs(batch, n_radiomics=n_radiomics, seed=batch)
            verify_onnx(net, path, patch, radiomics, atol=atol)
    return path


def verify_onnx(
    model: RimClassifier,
    path: str | Path,
    patch: torch.Tensor,
    radiomics: torch.Tensor,
    *,
    atol: float = PARITY_ATOL,
) -> float:
    """Run the graph with onnxruntime (CPU) and torch (eval mode) on the same inputs.

    Returns
    -------
    float
        Maximum absolute difference between the two logit vectors.

    Raises
    ------
    OnnxParityError
        If the shapes differ or the maximum absolute difference exceeds ``atol``.
    """
    session = open_session(path, [CPU])
    feeds = {
        "patch": patch.detach().cpu().float().numpy(),
        "radiomics": radiomics.detach().cpu().float().numpy(),
    }
    (got,) = session.run([OUTPUT_NAME], feeds)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(patch.to(device), radiomics.to(device)).detach().cpu().float().numpy()
    finally:
        model.train(was_training)
    if got.shape != ref.shape:
        raise OnnxParityError(f"ONNX output shape {got.shape} differs from torch {ref.shape} ({path})")
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    if not diff <= atol:
        raise OnnxParityError(f"ONNX logits differ from torch by {diff:.3g} > atol={atol:g} ({path})")
    return diff


def restore_unused_inputs(proto: Any, n_radiomics: int) -> None:
    """Add graph inputs the tracer dropped because the model ignores them, in the fixed order."""
    from onnx import TensorProto, helper

    shapes = {"patch": [BATCH_AXIS, *PATCH_SHAPE], "radiomics": [BATCH_AXIS, n_radiomics]}
    present = {i.name: i for i in proto.graph.input}
    ordered = [
        present.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name])
        for name in INPUT_NAMES
    ]
    extra = [i for i in proto.graph.input if i.name not in INPUT_NAMES]
    del proto.graph.input[:]
    proto.graph.input.extend([*ordered, *extra])
