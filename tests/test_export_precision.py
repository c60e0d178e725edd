"""fp16 and int8 exports (issue 18): real onnxruntime quantisation of a really trained tiny ensemble, parity
figures checked against an independent recomputation, registration refusal on a real MLflow store, and the
serving loader picking the graph of a precision."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from mlflow import MlflowClient
from test_export_fixtures import tiny_run

from qsmrim.export import reference_predictions
from qsmrim.export.cli import cv_metrics_of_run, export_run
from qsmrim.export.precision import PrecisionConfig, convert_graph
from qsmrim.model_sidecar import read_sidecar, sidecar_path_for
from qsmrim.onnx_runtime import PrecisionParityError, check_precision_parity, precision_path_for
from qsmrim.radiomics import FEATURE_NAMES
from qsmrim.tracking.registry import log_and_register
from serving.model import ModelError, RimModel


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_root):
    return tiny_run(tmp_path_factory, synth_root)


@pytest.fixture(scope="module")
def run_dir(run, tmp_path_factory) -> Path:
    """The tiny run laid out as a pipeline leaves it: members plus prepared/ and features/ caches."""
    root = tmp_path_factory.mktemp("precision-run") / "run"
    shutil.copytree(run.run_dir, root)
    d = run.data
    (root / "prepared").mkdir()
    table = pd.DataFrame({"subject": d.subjects, "lesion": d.lesions, "rim": d.labels.astype(int)})
    table.to_parquet(root / "prepared" / "lesions.parquet", index=False)
    np.save(root / "prepared" / "patches.npy", np.asarray(d.patches, dtype=np.float32))
    (root / "features").mkdir()
    features = pd.concat(
        [table[["subject", "lesion"]], pd.DataFrame(d.radiomics, columns=list(FEATURE_NAMES))], axis=1
    )
    features.to_parquet(root / "features" / "features.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def int8(run_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("precision-export") / "model.onnx"
    return export_run(run_dir, out, precision="int8", precision_config=PrecisionConfig(calibration_rows=32))


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _outputs(path: Path, patch: np.ndarray, radiomics: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"patch": patch, "radiomics": radiomics}), strict=True))


def test_int8_export_writes_a_quantised_graph_beside_fp32(int8):
    """Check that the int8 graph sits beside the fp32 one and quantises every conv but those with at most 2
    input channels (the stem, and at this tiny width stage 1 too)."""
    path = Path(int8["onnx"])
    assert path == precision_path_for(path.with_name("model.onnx"), "int8") and path.name == "model.int8.onnx"
    fp32 = onnx.load(str(path.with_name("model.onnx")))
    weights = {i.name: i for i in fp32.graph.initializer}
    convs = [n for n in fp32.graph.node if n.op_type == "Conv"]
    narrow = sum(1 for n in convs if weights[n.input[1]].dims[1] <= 2)
    ops = _ops(path)
    assert 0 < narrow < len(convs)
    assert ops["QLinearConv"] == len(convs) - narrow and ops["Conv"] == narrow
    side = int8["sidecar_content"]
    assert side["precision"]["name"] == "int8" and side["precision"]["method"] == "static"
    assert side["precision"]["float_convs"] == narrow
    assert side["parity"] is None  # the fp32 graph's check against torch is kept, under precision:
    assert side["precision"]["reference_parity_with_torch"]["max_prob_diff"] <= 1e-5
    assert side["onnx"]["weights_dtype"] == "int8" and side["onnx"]["files"]["graph"]["name"] == path.name
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["qsmrim.precision"] == "int8" and meta["qsmrim.n_members"] == str(side["n_members"])


def test_int8_keeps_the_graph_interface(int8, run):
    """Check that inputs and outputs keep the names, dtypes and dynamic batch of DESIGN section 5."""
    patch, radiomics = run.inputs()
    a = _outputs(Path(int8["onnx"]), patch[:3], radiomics[:3])
    b = _outputs(Path(int8["onnx"]), patch[:5], radiomics[:5])
    assert list(a) == ["prob", "votes", "rim", "spread"]
    assert [a[k].dtype for k in a] == [np.float32, np.int64, np.bool_, np.float32]
    assert len(b["prob"]) == 5 and np.isfinite(a["prob"]).all()  # NaN/Inf radiomics rows still answer


def test_int8_parity_figures_match_an_independent_recomputation(int8, run, run_dir):
    """Check that the sidecar's parity equals onnxruntime vs the torch members recomputed here, and that its fp32
    CV PR AUC equals the run's evaluation (computed from the members' own test-fold predictions)."""
    parity = int8["sidecar_content"]["precision"]["parity"]
    d = run.data
    tested = {(str(s), int(le)) for m in run.members for s, le in zip(m.predictions["subject"], m.predictions["lesion"], strict=True)}  # fmt: skip
    rows = [
        i
        for i, k in enumerate(zip(d.subjects.astype(str), d.lesions.astype(int), strict=True))
        if k in tested
    ]
    patch = np.asarray(d.patches[rows], np.float32)
    radiomics = np.asarray(d.radiomics[rows], np.float32)
    ref = reference_predictions(run.members, patch, radiomics)
    got = _outputs(Path(int8["onnx"]), patch, radiomics)
    assert parity["lesions"] == len(rows)
    assert parity["max_prob_diff"] == pytest.approx(np.abs(got["prob"] - ref.prob).max(), abs=1e-7)
    assert parity["rim_flips"] == int((got["rim"] != ref.rim).sum())
    assert parity["vote_flips"] == int((got["votes"] != ref.votes).sum())
    assert 0 < parity["max_prob_diff"] < 0.05  # quantised (not a copy of fp32), yet close
    assert parity["cv_pr_auc_fp32"] == pytest.approx(
        cv_metrics_of_run(run_dir, "qsmrimnet")["cv_pr_auc"], abs=1e-12
    )
    assert abs(parity["cv_pr_auc_diff"]) <= 0.05


def test_dynamic_int8_turns_conv3d_into_convinteger(run, tmp_path):
    """Check what dynamic quantisation does to Conv3d: ConvInteger (slower than float on CPU, bench/RESULTS.md)."""
    out = tmp_path / "model.int8.onnx"
    details = convert_graph(run.onnx, out, "int8", config=PrecisionConfig(int8_method="dynamic"))
    ops = _ops(out)
    assert ops["ConvInteger"] > 0 and ops["QLinearConv"] == 0 and details["method"] == "dynamic"
    patch, radiomics = run.inputs()
    fp32, got = _outputs(run.onnx, patch[:8], radiomics[:8]), _outputs(out, patch[:8], radiomics[:8])
    assert np.abs(got["prob"] - fp32["prob"]).max() < 0.05


def test_fp16_graph_computes_in_half_precision(run, tmp_path):
    """Check that fp16 stores float16 weights and computes Conv in float16 with float32 inputs and outputs kept."""
    out = tmp_path / "model.fp16.onnx"
    convert_graph(run.onnx, out, "fp16")
    proto = onnx.load(str(out))
    dtypes = Counter(i.data_type for i in proto.graph.initializer if len(i.dims) >= 2)
    assert dtypes[onnx.TensorProto.FLOAT16] > 0 and dtypes[onnx.TensorProto.FLOAT] == 0
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT] * 2
    patch, radiomics = run.inputs()
    fp32, got = _outputs(run.onnx, patch[:8], radiomics[:8]), _outputs(out, patch[:8], radiomics[:8])
    assert got["prob"].dtype == np.float32 and np.abs(got["prob"] - fp32["prob"]).max() < 5e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"int8_method": "fast"}, "int8_method must be one of"),
        ({"int8_format": "qlinear"}, "int8_format must be one of"),
        ({"calibration_rows": 0}, "calibration_rows must be an int >= 1"),
        ({"calibration_batch": 2.5}, "calibration_batch must be an int >= 1"),
        ({"float_conv_max_in_channels": -1}, "float_conv_max_in_channels must be an int >= 0"),
    ],
)
def test_precision_config_errors(kwargs, match):
    """Check that each bad option names itself and what is allowed."""
    with pytest.raises(ValueError, match=match):
        PrecisionConfig(**kwargs)


def test_convert_graph_errors(run, tmp_path):
    """Check that fp32 is not a conversion and static int8 needs calibration lesions."""
    with pytest.raises(ValueError, match="precision must be 'fp16' or 'int8'"):
        convert_graph(run.onnx, tmp_path / "x.onnx", "fp32")
    with pytest.raises(ValueError, match="static int8 needs calibration lesions"):
        convert_graph(run.onnx, tmp_path / "x.onnx", "int8")


def test_rim_flip_share_check():
    """Check the refusal rule: fp32 passes, a reduced graph passes at or below the share and fails above it or
    without figures, with a message giving the counts."""
    check_precision_parity({"precision": {"name": "fp32"}})
    ok = {"precision": {"name": "int8", "parity": {"rim_flips": 1, "lesions": 200}}}
    check_precision_parity(ok, 0.005)
    with pytest.raises(
        PrecisionParityError, match=r"1 of 200 out-of-fold lesions \(0.50%\).*above the allowed 0.40%"
    ):
        check_precision_parity(ok, 0.004, where="m.int8.onnx")
    with pytest.raises(PrecisionParityError, match="without parity figures"):
        check_precision_parity({"precision": {"name": "fp16"}})


def test_registration_tags_parity_and_refuses_flipping_graphs(int8, store):
    """Check that an int8 version carries precision and parity tags, and that a graph whose rim calls flip on
    more than the allowed share is refused before anything is logged (the tiny one-epoch ensemble's
    probabilities sit near its thresholds, so int8 flips many of its calls: it is registered only with an
    explicit share of 1)."""
    path = Path(int8["onnx"])
    side = read_sidecar(sidecar_path_for(path))
    parity = side["precision"]["parity"]
    reg = log_and_register(path, sidecar_path_for(path), cv_metrics={"cv_pr_auc": 0.5}, config={}, git_commit="x",
                           tracking_uri=store, promote=False, max_rim_flip_share=1.0)  # fmt: skip
    tags = MlflowClient(store).get_model_version("qsmrim", reg["version"]).tags
    assert tags["precision"] == "int8"
    assert float(tags["precision_max_prob_diff"]) == parity["max_prob_diff"]
    assert (
        int(tags["precision_rim_flips"]) == parity["rim_flips"]
        and int(tags["precision_lesions"]) == parity["lesions"]
    )
    flipped = json.loads(json.dumps(side))
    flipped["precision"]["parity"]["rim_flips"] = parity["lesions"] // 100 + 1  # just above 0.5% (default)
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(
        PrecisionParityError, match=f"flips the rim call of {parity['lesions'] // 100 + 1} of"
    ):
        log_and_register(
            path, flipped, cv_metrics={"cv_pr_auc": 0.5}, config={}, git_commit="x", tracking_uri=store
        )
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before


def test_serving_picks_the_graph_of_a_precision(int8):
    """Check that RimModel serves model.int8.onnx for precision int8 given model.onnx, reports precision,
    provider and parity (GET /v1/model returns this dict), and names the export command when a graph is missing."""
    fp32 = Path(int8["onnx"]).with_name("model.onnx")
    model = RimModel.load(fp32, providers="cpu", precision="int8")
    info = model.info.as_dict()
    assert info["uri"] == str(Path(int8["onnx"]).resolve())
    assert info["precision"] == "int8" and info["execution_provider"] == "CPUExecutionProvider"
    assert info["parity"]["against"] == "fp32"
    assert info["parity"]["rim_flips"] == int8["sidecar_content"]["precision"]["parity"]["rim_flips"]
    back = RimModel.load(Path(int8["onnx"]), providers="cpu", precision="fp32").info.as_dict()
    assert back["precision"] == "fp32" and back["uri"] == str(fp32.resolve())
    assert back["parity"]["against"] == "torch members"
    assert RimModel.load(fp32, providers="cpu").info.precision == "fp32"  # auto: the graph as given
    with pytest.raises(
        ModelError, match=r"no fp16 graph lies beside it \(model.fp16.onnx\).*--precision fp16"
    ):
        RimModel.load(fp32, providers="cpu", precision="fp16")


def test_serve_config_precision_choices():
    """Check that serve.yaml's precision accepts auto and the three precisions and names them otherwise."""
    from pydantic import ValidationError

    from serving.config import AppArgs

    assert AppArgs().precision == "auto" and AppArgs(precision="int8").precision == "int8"
    with pytest.raises(ValidationError, match="'auto', 'fp32', 'fp16' or 'int8'"):
        AppArgs(precision="int4")


def test_serve_precision_flag_overrides_the_config():
    """Check that `qsmrim serve --precision` wins over serve.yaml's args.precision, and that leaving it out keeps
    the file's value."""
    from qsmrim.cli import build_parser
    from serving.cli import app_args_from_config

    config = {"applications": [{"name": "qsmrim", "args": {"model": "m.onnx", "precision": "fp16"}}]}
    args = build_parser().parse_args(["serve", "--precision", "int8"])
    assert args.precision == "int8"
    assert app_args_from_config(config, None, {"precision": args.precision})[0].precision == "int8"
    assert app_args_from_config(config, None, {"precision": None})[0].precision == "fp16"
