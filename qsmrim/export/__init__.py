"""Export a trained run's ensemble to one ONNX graph with a ``model.json`` sidecar (DESIGN §5).

:func:`export_ensemble` wraps every member (with its radiomics standardisation and threshold) in one
module, exports it with a dynamic batch axis, checks the graph with ``onnx.checker`` and its outputs against
the PyTorch members with :func:`verify_ensemble`. :func:`export_onnx` / :func:`verify_onnx` do the same
for one torch model (:mod:`qsmrim.export.model_graph`). Registering the result in MLflow is
:mod:`qsmrim.tracking.registry`'s job: only :func:`qsmrim.export.run.export_run` calls it, and only with
``register=True``, so importing this package imports neither MLflow nor onnxruntime.
"""

from qsmrim.export.ensemble import (
    OUTPUT_NAMES,
    PROTOCOLS,
    EnsembleModule,
    load_members,
    reference_predictions,
)
from qsmrim.export.graph import (
    EXTERNAL_DATA_THRESHOLD,
    FP16_PARITY_ATOL,
    INPUT_NAMES,
    PARITY_ATOL,
    EnsembleParityError,
    ParityReport,
    export_ensemble,
    graph_metadata,
    verify_ensemble,
)
from qsmrim.export.model_graph import OnnxParityError, export_onnx, verify_onnx
from qsmrim.export.sidecar import build_sidecar, read_sidecar, sidecar_path_for, write_sidecar

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "FP16_PARITY_ATOL",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "PARITY_ATOL",
    "PROTOCOLS",
    "EnsembleModule",
    "EnsembleParityError",
    "OnnxParityError",
    "ParityReport",
    "build_sidecar",
    "export_ensemble",
    "export_onnx",
    "graph_metadata",
    "load_members",
    "read_sidecar",
    "reference_predictions",
    "sidecar_path_for",
    "verify_ensemble",
    "verify_onnx",
    "write_sidecar",
]
