"""Networks of qsmrim.models: shapes, parameter counts, fusion paths, registry and validation."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from qsmrim.models import (
    APRLNN,
    MODEL_NAMES,
    TORCH_MODEL_NAMES,
    QSMRimNet,
    RadiomicsMLP,
    ResNet3D,
    RimClassifier,
    RimNet,
    build_model,
    example_inputs,
    is_torch_model,
    resnet18_3d,
)

# Narrow widths so the whole file runs in seconds on 2 CPU cores.
NARROW = {"rimnet": {"channels": (4, 8, 8), "hidden_features": (16, 8)}}
NARROW_DEFAULT = {"base_channels": 4}


def narrow(name: str, **kwargs) -> RimClassifier:
    torch.manual_seed(0)
    return build_model(name, **NARROW.get(name, NARROW_DEFAULT), **kwargs)


def labels_with(n_pos: int, batch: int) -> torch.Tensor:
    y = torch.zeros(batch)
    y[torch.linspace(0, batch - 1, n_pos).long()] = 1
    return y


@pytest.mark.parametrize("name", TORCH_MODEL_NAMES)
@pytest.mark.parametrize("batch", [1, 64])
def test_model_eval_shape_and_rowwise(name, batch):
    """Check that every torch model maps a batch to one finite logit per row, independent of the batch."""
    model = narrow(name).eval()
    patch, radiomics = example_inputs(batch, seed=batch)
    with torch.no_grad():
        logits = model(patch, radiomics)
        first = model(patch[:1], radiomics[:1])
    assert logits.shape == (batch,)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert_close(logits[:1], first, rtol=1e-5, atol=1e-6)
    if batch > 1:
        assert logits.std() > 0  # rows are not collapsed to one value


@pytest.mark.parametrize("name", TORCH_MODEL_NAMES)
def test_model_forward_train_rows(name):
    """Check that forward_train adds 2 rows per rim+ sample for DeepSMOTE models and none otherwise."""
    model = narrow(name).train()
    patch, radiomics = example_inputs(16)
    labels = labels_with(5, 16)
    logits, out_labels = model.forward_train(patch, radiomics, labels)
    synthesises = name in ("qsmrimnet", "qsmrimnet-add")
    expected = 16 + 2 * 5 if synthesises else 16
    assert logits.shape == (expected,)
    assert out_labels.shape == (expected,)
    assert_close(out_labels[:16], labels)
    assert (out_labels[16:] == 1).all()


@pytest.mark.parametrize("name", TORCH_MODEL_NAMES)
def test_model_ignores_unused_input(name):
    """Check that a model's output does not change when the input it does not use changes."""
    model = narrow(name).eval()
    patch, radiomics = example_inputs(4)
    with torch.no_grad():
        ref = model(patch, radiomics)
        if not model.uses_patch:
            assert_close(model(torch.zeros_like(patch), radiomics), ref, rtol=0, atol=0)
        if not model.uses_radiomics:
            assert_close(model(patch, torch.zeros_like(radiomics)), ref, rtol=0, atol=0)
        if model.uses_patch:
            assert not torch.equal(model(patch * 2, radiomics), ref)
        if model.uses_radiomics:
            assert not torch.equal(model(patch, radiomics * 2), ref)


@pytest.mark.parametrize("name", TORCH_MODEL_NAMES)
def test_model_state_dict_round_trip(name):
    """Check that weights saved with torch.save load (weights_only) into a fresh model with equal output."""
    model = narrow(name).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    fresh = build_model(name, **NARROW.get(name, NARROW_DEFAULT)).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    patch, radiomics = example_inputs(3)
    with torch.no_grad():
        assert torch.equal(fresh(patch, radiomics), model(patch, radiomics))


@pytest.mark.parametrize(
    "cls, kwargs, in_shape, out_shape",
    [
        (ResNet3D, {"base_channels": 4}, (2, 2, 16, 32, 32), (2, 32)),
        (ResNet3D, {"in_channels": 1, "base_channels": 2}, (1, 1, 16, 32, 32), (1, 16)),
        (ResNet3D, {"base_channels": 4, "stem_pool": False, "stem_stride": 1}, (2, 2, 8, 8, 8), (2, 32)),
        (ResNet3D, {"base_channels": 4, "layers": (1, 1, 1, 1)}, (2, 2, 16, 32, 32), (2, 32)),
        (RadiomicsMLP, {"hidden_features": 16, "out_features": 8}, (4, 527), (4, 8)),
        (RadiomicsMLP, {"in_features": 10, "hidden_features": 6, "out_features": 3}, (4, 10), (4, 3)),
    ],
)
def test_building_block_shapes(cls, kwargs, in_shape, out_shape):
    """Check the backbone and the radiomics MLP on a (kwargs, input shape, output shape) table."""
    net = cls(**kwargs).eval()
    with torch.no_grad():
        assert net(torch.randn(in_shape)).shape == out_shape


def test_resnet18_3d_parameter_count():
    """Check that the full-size 2-channel ResNet18-3D has ~33M parameters and a 512-d feature."""
    net = resnet18_3d(in_channels=2)
    n_params = sum(p.numel() for p in net.parameters())
    assert 33.0e6 < n_params < 33.5e6
    assert net.out_features == 512


def test_resnet18_3d_feature_shape():
    """Check that the backbone pools a [N,2,16,32,32] patch to [N, 8*base_channels]."""
    net = resnet18_3d(base_channels=4).eval()
    assert net(torch.zeros(3, 2, 16, 32, 32)).shape == (3, 32)


def test_radiomics_mlp_layers():
    """Check the radiomics branch layer sequence of the paper: Linear/BN/Swish/Dropout(0.3), Linear/BN/Swish."""
    mlp = RadiomicsMLP()
    kinds = [type(m).__name__ for m in mlp.net.modules() if not isinstance(m, torch.nn.Sequential)]
    assert kinds == ["Linear", "BatchNorm1d", "SiLU", "Dropout", "Linear", "BatchNorm1d", "SiLU"]
    linears = [m for m in mlp.net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(527, 1024), (1024, 512)]
    assert [m.p for m in mlp.net.modules() if isinstance(m, torch.nn.Dropout)] == [0.3]


def test_qsmrimnet_paper_sizes():
    """Check the full-size QSMRim-Net widths: fusion 1024 -> 512 DeepSMOTE transform, 512 -> 128 -> 1 classifier."""
    net = QSMRimNet()
    first = net.smote.transform[0][0]
    assert (first.in_features, first.out_features) == (1024, 512)
    head = [m for m in net.classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(512, 128), (128, 1)]
    assert 34.5e6 < sum(p.numel() for p in net.parameters()) < 35.5e6


def test_fusion_concat_and_add_paths_differ():
    """Check that concat fusion concatenates and add fusion sums the same image and radiomic features."""
    torch.manual_seed(0)
    cat = QSMRimNet(base_channels=4, fusion="concat").eval()
    add = QSMRimNet(base_channels=4, fusion="add").eval()
    shared = {k: v for k, v in cat.state_dict().items() if not k.startswith(("smote.", "classifier."))}
    add.load_state_dict(shared, strict=False)
    patch, radiomics = example_inputs(5)
    with torch.no_grad():
        image = cat.backbones[0](patch)
        rad = cat.radiomics_mlp(radiomics)
        fused_cat = cat.fused_features(patch, radiomics)
        fused_add = add.fused_features(patch, radiomics)
    assert fused_cat.shape == (5, 64) and fused_add.shape == (5, 32)
    assert_close(fused_cat, torch.cat([image, rad], dim=1))
    assert_close(fused_add, image + rad)
    assert cat.smote.transform[0][0].in_features == 64
    assert add.smote.transform[0][0].in_features == 32
    assert not torch.allclose(fused_cat[:, :32], fused_add)


def test_image_rimnet_streams_per_modality():
    """Check that the RimNet-style ablation feeds each modality to its own single-channel backbone."""
    net = narrow("image-rimnet").eval()
    assert len(net.backbones) == 2
    assert all(b.stem[0].in_channels == 1 for b in net.backbones)
    patch, radiomics = example_inputs(3)
    swapped = patch.flip(1)
    with torch.no_grad():
        assert not torch.allclose(net(patch, radiomics), net(swapped, radiomics))


def test_rimnet_one_stream_per_modality():
    """Check that RimNet has one VGG stream per input channel and late fusion into the classifier."""
    net = RimNet(channels=(4, 8, 8), hidden_features=(16,))
    assert len(net.streams) == 2
    # 16x32x32 -> 2x4x4 after three pools, one reduced channel per stream, two streams.
    assert net.fc[0].in_features == 2 * 2 * 4 * 4


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "qsmrimnet",
            {"fusion": "concat", "uses_radiomics": True, "image_fusion": "channel", "oversample": True},
        ),
        (
            "qsmrimnet-add",
            {"fusion": "add", "uses_radiomics": True, "image_fusion": "channel", "oversample": True},
        ),
        ("image-channel", {"uses_radiomics": False, "image_fusion": "channel", "oversample": False}),
        ("image-rimnet", {"uses_radiomics": False, "image_fusion": "stream", "oversample": False}),
        (
            "image-radiomics",
            {"fusion": "concat", "uses_radiomics": True, "image_fusion": "channel", "oversample": False},
        ),
    ],
)
def test_registry_presets(name, expected):
    """Check that each QSMRim-Net family name fixes the Table 3 switches."""
    model = narrow(name)
    assert isinstance(model, QSMRimNet)
    got = {k: (model.smote.oversample if k == "oversample" else getattr(model, k)) for k in expected}
    assert got == expected


def test_registry_comparators():
    """Check the comparator names build the comparator classes."""
    assert isinstance(narrow("rimnet"), RimNet)
    assert isinstance(narrow("aprl-nn"), APRLNN)
    rf = build_model("aprl-rf", n_estimators=3)
    assert type(rf).__name__ == "APRLRandomForest" and rf.n_estimators == 3
    assert set(MODEL_NAMES) == set(TORCH_MODEL_NAMES) | {"aprl-rf"}
    assert not is_torch_model("aprl-rf") and is_torch_model("qsmrimnet")


def test_registry_unknown_name():
    """Check that an unknown name raises ValueError listing the allowed names."""
    with pytest.raises(ValueError, match="Unknown model 'resnet'.*qsmrimnet, qsmrimnet-add.*aprl-nn"):
        build_model("resnet")


def test_registry_fixed_switch():
    """Check that overriding a switch fixed by the registry name raises TypeError."""
    with pytest.raises(TypeError, match="fixes \\['fusion'\\]"):
        build_model("qsmrimnet", fusion="add")


@pytest.mark.parametrize(
    "params, err_type, err_msg",
    [
        ({"fusion": "sum"}, ValueError, "fusion must be one of \\['concat', 'add'\\], not 'sum'"),
        ({"image_fusion": "early"}, ValueError, "image_fusion must be one of"),
        ({"base_channels": 0}, ValueError, "base_channels must be a positive integer, not 0"),
        ({"base_channels": 4.0}, TypeError, "base_channels must be a positive integer, not float"),
        ({"act": "mish"}, ValueError, "Unknown activation 'mish'"),
        ({"radiomics_dropout": 1.5}, ValueError, "radiomics_dropout must be a number in \\[0, 1\\), not 1.5"),
        ({"oversample": 1}, TypeError, "oversample must be a bool"),
        ({"fusion": "add", "image_fusion": "stream"}, ValueError, "fusion='add' needs"),
        ({"in_channels": 1, "image_fusion": "stream"}, ValueError, "needs at least 2 in_channels"),
    ],
)
def test_qsmrimnet_invalid_params(params, err_type, err_msg):
    """Check that invalid constructor arguments fail at construction with a message naming them."""
    with pytest.raises(err_type, match=err_msg):
        QSMRimNet(**{"base_channels": 4, **params})


@pytest.mark.parametrize(
    "params, err_type, err_msg",
    [
        ({"channels": ()}, ValueError, "channels must be a non-empty sequence"),
        ({"channels": "abc"}, TypeError, "channels must be a sequence of integers"),
        ({"spatial_size": (16, 32)}, ValueError, "spatial_size must be 3 integers"),
        ({"act": 3}, TypeError, "act must be a string"),
    ],
)
def test_rimnet_invalid_params(params, err_type, err_msg):
    """Check that invalid RimNet arguments fail at construction."""
    with pytest.raises(err_type, match=err_msg):
        RimNet(**params)


def test_models_import_is_light():
    """Check that importing qsmrim.models pulls in neither scikit-learn nor ray, dask or mlflow."""
    code = (
        "import sys, qsmrim.models as m; "
        "bad = [k for k in ('sklearn', 'imblearn', 'ray', 'dask', 'mlflow', 'onnx', 'onnxruntime') if k in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_registry_knows_which_models_read_radiomics():
    """Check the registry flag against the attribute of a built model, for every name."""
    from qsmrim.models import MODEL_NAMES, TORCH_MODEL_NAMES, uses_radiomics

    for name in MODEL_NAMES:
        if name in TORCH_MODEL_NAMES:
            model = build_model(name, **({} if name in ("aprl-nn", "rimnet") else {"base_channels": 1}))
            assert uses_radiomics(name) == model.uses_radiomics, name
        else:
            assert uses_radiomics(name)


def test_registry_capabilities_match_the_built_models():
    """Check that CAPABILITIES declares every name, and its torch flag matches what build_model builds."""
    from qsmrim.models.registry import CAPABILITIES, is_stackable

    assert set(CAPABILITIES) == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        kwargs = {"n_estimators": 3} if name == "aprl-rf" else NARROW.get(name, {} if name == "aprl-nn" else NARROW_DEFAULT)
        assert isinstance(build_model(name, **kwargs), RimClassifier) == CAPABILITIES[name].is_torch, name
        assert is_stackable(name) == CAPABILITIES[name].stackable == name.startswith(("qsmrimnet", "image-")), name
