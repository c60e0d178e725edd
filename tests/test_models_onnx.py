"""ONNX export of every torch model: named inputs, opset, dynamic batch and parity with torch <= 1e-5."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qsmrim.export import OnnxParityError, export_onnx, verify_onnx
from qsmrim.models import TORCH_MODEL_NAMES, build_model, example_inputs

NARROW = {"rimnet": {"channels": (4, 8, 8), "hidden_features": (16, 8)}}


def _trained_like(name: str) -> torch.nn.Module:
    """A narrow model whose batch-norm statistics are not the identity, so folding them is exercised."""
    torch.manual_seed(0)
    model = build_model(name, **NARROW.get(name, {"base_channels": 4}))
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model.train()


@pytest.mark.parametrize("name", TORCH_MODEL_NAMES)
def test_onnx_parity(name, tmp_path):
    """Check that each exported model has the fixed interface and matches torch within 1e-5 on CPU."""
    model = _trained_like(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    assert model.training  # export leaves the caller's model as it was

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["patch", "radiomics"]
    assert [o.name for o in proto.graph.output] == ["logit"]
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["N", 2, 16, 32, 32], ["N", 527]]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        patch, radiomics = example_inputs(batch, seed=10 + batch)
        (got,) = session.run(["logit"], {"patch": patch.numpy(), "radiomics": radiomics.numpy()})
        with torch.no_grad():
            ref = model.eval()(patch, radiomics).numpy()
        assert got.shape == (batch,)
        assert np.abs(got - ref).max() <= 1e-5
        assert np.abs(ref).max() > 1e-3  # a non-trivial output was compared
        assert verify_onnx(model, path, patch, radiomics) <= 1e-5


def test_onnx_parity_failure_is_reported(tmp_path):
    """Check that verify_onnx raises OnnxParityError when the torch model no longer matches the graph."""
    model = _trained_like("aprl-nn")
    path = export_onnx(model, tmp_path / "m.onnx")
    with torch.no_grad():
        model.classifier.net[-1].bias.add_(1.0)
    with pytest.raises(OnnxParityError, match="differ from torch by 1"):
        verify_onnx(model, path, *example_inputs(3))


@pytest.mark.parametrize(
    "kwargs, err_type, err_msg",
    [({"opset": 13}, ValueError, "opset must be >= 17, not 13")],
)
def test_onnx_invalid_arguments(tmp_path, kwargs, err_type, err_msg):
    """Check that a too-old opset is rejected."""
    with pytest.raises(err_type, match=err_msg):
        export_onnx(_trained_like("aprl-nn"), tmp_path / "m.onnx", **kwargs)


def test_onnx_rejects_non_rim_classifier(tmp_path):
    """Check that only qsmrim models are exported (they share the two-input interface)."""
    with pytest.raises(TypeError, match="RimClassifier"):
        export_onnx(torch.nn.Linear(2, 1), tmp_path / "m.onnx")
