"""Ensemble export (DESIGN §5): one graph, raw radiomics in, prob/votes/rim/spread out, parity with torch."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_fixtures import MODEL, TINY, external_export, tiny_run

from qsmrim.export import (
    FP16_PARITY_ATOL,
    EnsembleParityError,
    export_ensemble,
    graph_metadata,
    load_members,
    read_sidecar,
    reference_predictions,
    sidecar_path_for,
    verify_ensemble,
)
from qsmrim.export.sidecar import feature_names_sha256, file_sha256
from qsmrim.models import build_model
from qsmrim.radiomics import FEATURE_NAMES
from qsmrim.training import Member, Standardisation


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_root):
    return tiny_run(tmp_path_factory, synth_root)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, patch, radiomics) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"patch": patch, "radiomics": radiomics}), strict=True))


def test_graph_interface(run):
    """Check names, dtypes, the dynamic batch axis, the opset and onnx.checker on the exported graph."""
    onnx.checker.check_model(str(run.onnx))
    proto = onnx.load(str(run.onnx))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17

    def spec(values):
        return {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values}  # fmt: skip

    T = onnx.TensorProto
    assert spec(proto.graph.input) == {
        "patch": (T.FLOAT, ["N", 2, 16, 32, 32]),
        "radiomics": (T.FLOAT, ["N", 527]),
    }
    assert spec(proto.graph.output) == {"prob": (T.FLOAT, ["N"]), "votes": (T.INT64, ["N"]), "rim": (T.BOOL, ["N"]),
                                        "spread": (T.FLOAT, ["N"])}  # fmt: skip
    assert [o.name for o in proto.graph.output] == ["prob", "votes", "rim", "spread"]
    meta = graph_metadata(run.onnx)
    assert meta["qsmrim.protocol"] == "paper" and meta["qsmrim.n_members"] == "6"
    assert json.loads(meta["qsmrim.thresholds"]) == [m.thresholds["paper"] for m in run.members]
    assert not run.onnx.with_name("model.onnx.data").exists()  # 1.5 MB: inline weights


def test_parity_on_the_whole_cohort(run):
    """Check max |prob diff| <= 1e-5 and identical votes/rim against the torch members on every lesion."""
    patch, radiomics = run.inputs()
    report = verify_ensemble(run.onnx, run.members, patch, radiomics)
    assert report.n_rows == len(run.data) > 50
    assert report.max_prob_diff <= 1e-5 and report.max_spread_diff <= 1e-5
    assert report.provider == "CPUExecutionProvider"
    # Identical decisions off threshold ties (a member within 1e-5 of its own threshold), which verify enforces;
    # here we also check the decisions by hand against the members' own predictions.
    got = _run(_session(run.onnx), patch, radiomics)
    probs = np.stack([m.predict_proba(patch, radiomics) for m in run.members], axis=1)
    thr = np.array([m.thresholds["paper"] for m in run.members])
    ties = (np.abs(probs - thr) <= 1e-5).any(axis=1)
    votes = (probs >= thr).sum(axis=1)
    np.testing.assert_array_equal(got["votes"][~ties], votes[~ties])
    np.testing.assert_array_equal(got["rim"][~ties], (votes * 2 > 6)[~ties])
    assert report.rim_mismatch <= report.tie_rows
    np.testing.assert_allclose(got["spread"], probs.std(axis=1), atol=1e-5)
    assert (
        0 < got["rim"].sum() < len(got["rim"]) or 0 < got["votes"].max()
    )  # non-trivial decisions were compared
    # The NaN/Inf rows got each member's training median: same as replacing them by hand.
    fixed = radiomics.copy()
    fixed[0, 3] = fixed[1, 7] = np.nan
    np.testing.assert_allclose(
        _run(_session(run.onnx), patch[:2], fixed[:2])["prob"], got["prob"][:2], atol=1e-7
    )


def test_dynamic_batch_gives_the_same_rows(run):
    """Check batch 1 and the whole cohort give the same outputs for the same lesion."""
    patch, radiomics = run.inputs()
    session = _session(run.onnx)
    whole = _run(session, patch, radiomics)
    for i in (0, 5, len(patch) - 1):
        one = _run(session, patch[i : i + 1], radiomics[i : i + 1])
        assert one["prob"].shape == (1,)
        np.testing.assert_allclose(one["prob"], whole["prob"][i : i + 1], atol=1e-6)
        assert one["rim"][0] == whole["rim"][i] or abs(one["prob"][0] - whole["prob"][i]) < 1e-6


def test_sidecar(run):
    """Check model.json: interface, patch spec, channel meaning, feature names, members and file hashes."""
    side = read_sidecar(sidecar_path_for(run.onnx))
    assert sidecar_path_for(run.onnx).name == "model.json"
    assert side["protocol"] == "paper" and side["n_members"] == 6 and side["model"] == MODEL
    assert side["feature_names"] == list(FEATURE_NAMES)
    assert side["feature_names_sha256"] == feature_names_sha256(FEATURE_NAMES)
    assert side["patch_spec"]["size"] == [16, 32, 32] and side["patch_spec"]["axes"] == "zyx"
    assert side["patch_spec"]["channel_def"]["0"].startswith("QSM")
    assert side["patch_spec"]["channel_def"]["1"].startswith("FLAIR")
    assert [(m["fold"], m["seed"]) for m in side["members"]] == [(f, s) for f in range(2) for s in range(3)]
    assert [m["threshold"] for m in side["members"]] == [m.thresholds["paper"] for m in run.members]
    nd = side["network_data_format"]
    assert (
        nd["inputs"]["patch"]["shape"] == ["N", 2, 16, 32, 32]
        and nd["inputs"]["radiomics"]["dtype"] == "float32"
    )
    assert {k: v["dtype"] for k, v in nd["outputs"].items()} == {"prob": "float32", "votes": "int64", "rim": "bool",
                                                                 "spread": "float32"}  # fmt: skip
    assert "DESIGN section 5" in nd["outputs"]["spread"]["note"]
    assert side["onnx"]["files"]["graph"]["sha256"] == file_sha256(run.onnx)
    assert side["parity"]["max_prob_diff"] <= 1e-5
    from qsmrim import __version__

    assert side["qsmrim_version"] == __version__


def test_external_data_flag(run, tmp_path):
    """Check external_data=True: one relative weights file beside the graph, checker by path, same outputs."""
    out = external_export(run)
    data = out.with_name("model.onnx.data")
    assert data.exists() and data.stat().st_size > 1_000_000 > out.stat().st_size
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.json", "model.onnx", "model.onnx.data"]
    locations = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}  # fmt: skip
    assert locations == {"model.onnx.data"}  # one file, relative to the graph
    onnx.checker.check_model(str(out))
    side = read_sidecar(sidecar_path_for(out))
    assert side["onnx"]["files"]["external_data"]["bytes"] == data.stat().st_size
    # The pair moves together; outputs equal the inline graph's.
    moved = tmp_path / "moved"
    shutil.copytree(out.parent, moved)
    patch, radiomics = run.inputs()
    a, b = _run(_session(moved / "model.onnx"), patch, radiomics), _run(_session(run.onnx), patch, radiomics)
    for name in ("prob", "spread"):
        np.testing.assert_allclose(a[name], b[name], atol=1e-7)
    for name in ("votes", "rim"):
        np.testing.assert_array_equal(a[name], b[name])


def test_external_data_chosen_above_the_limit(run, tmp_path, monkeypatch):
    """Check the automatic > 2 GB rule (threshold lowered for a tiny graph) and the stale-file cleanup."""
    monkeypatch.setattr("qsmrim.export.graph.EXTERNAL_DATA_THRESHOLD", 10_000)
    with pytest.raises(ValueError, match="exceed protobuf's 2 GB limit"):
        export_ensemble(run.members, tmp_path / "no.onnx", external_data=False)
    out = export_ensemble(run.members[:1], tmp_path / "model.onnx")  # verified, so ORT read the weights file
    data = out.with_name("model.onnx.data")
    assert data.exists() and read_sidecar(sidecar_path_for(out))["parity"]["max_prob_diff"] <= 1e-5
    monkeypatch.setattr("qsmrim.export.graph.EXTERNAL_DATA_THRESHOLD", 2**40)
    export_ensemble(run.members[:1], out, verify=False, sidecar=False)
    assert not data.exists()  # re-exported inline: the old weights file is gone


def test_fp16_weights_halve_the_file(run, tmp_path):
    """Check float16 storage: about half the bytes, parity within the stated fp16 tolerance."""
    out = export_ensemble(run.members, tmp_path / "half.onnx", fp16=True)
    assert out.stat().st_size < 0.6 * run.onnx.stat().st_size
    patch, radiomics = run.inputs()
    report = verify_ensemble(out, run.members, patch, radiomics)
    assert report.atol == FP16_PARITY_ATOL and report.max_prob_diff <= FP16_PARITY_ATOL
    side = read_sidecar(sidecar_path_for(out))
    assert side["onnx"]["weights_dtype"] == "float16" and side["parity"]["atol"] == FP16_PARITY_ATOL
    with pytest.raises(EnsembleParityError, match="prob differs"):
        verify_ensemble(out, run.members, patch, radiomics, atol=1e-9)


def test_export_from_run_dir_picks_and_orders_members(run):
    """Check load_members finds the run's members in (fold, seed) order and rejects unknown models."""
    members = load_members(run.run_dir)
    assert [(m.fold, m.seed) for m in members] == [(f, s) for f in range(2) for s in range(3)]
    with pytest.raises(ValueError, match="no members of model 'rimnet'; trained models: qsmrimnet"):
        load_members(run.run_dir, "rimnet")


def _untrained(model: str, fold: int, seed: int, *, thresholds=None, radiomics=True) -> Member:
    torch.manual_seed(seed)
    net = build_model(model, **TINY).eval()
    std = Standardisation.fit(np.random.default_rng(seed).normal(size=(20, 527))) if radiomics else None
    return Member(model, dict(TINY), fold, seed, thresholds or {"paper": 0.5}, std,
                  tuple(FEATURE_NAMES) if radiomics else (), model=net)  # fmt: skip


def test_image_only_member_keeps_both_inputs(tmp_path):
    """Check a graph whose members ignore radiomics still takes both inputs; one member votes alone."""
    member = _untrained("image-channel", 0, 0, radiomics=False)
    member.model.train()
    out = export_ensemble([member], tmp_path / "img.onnx", verify=False)
    assert member.model.training  # the caller's model is shared, not copied, and its mode is restored
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == ["patch", "radiomics"]
    rng = np.random.default_rng(1)
    patch = rng.normal(size=(3, 2, 16, 32, 32)).astype(np.float32)
    got = _run(session, patch, np.full((3, 527), np.nan, np.float32))
    ref = reference_predictions([member], patch, np.zeros((3, 527), np.float32))
    np.testing.assert_allclose(got["prob"], ref.prob, atol=1e-5)
    np.testing.assert_array_equal(got["rim"], got["votes"] == 1)
    np.testing.assert_array_equal(got["spread"], 0)


def test_verify_catches_a_different_model(run, tmp_path):
    """Check verify_ensemble fails loudly when the members are not the ones in the graph."""
    patch, radiomics = run.inputs()
    patch, radiomics = patch[:4], radiomics[:4]
    other = [copy.deepcopy(m) for m in run.members]
    with torch.no_grad():
        for p in other[2].model.parameters():
            p.add_(0.05)
    with pytest.raises(EnsembleParityError, match=r"prob differs from the torch ensemble by .* > atol=1e-05"):
        verify_ensemble(run.onnx, other, patch, radiomics)
    moved = [copy.copy(m) for m in run.members]
    moved[0].thresholds = {"paper": 0.123}
    with pytest.raises(ValueError, match="thresholds differ"):
        verify_ensemble(run.onnx, moved, patch, radiomics)
    with pytest.raises(ValueError, match="holds members"):
        verify_ensemble(run.onnx, run.members[:3], patch, radiomics)
    with pytest.raises(ValueError, match=r"patch must have shape \[N, 2, 16, 32, 32\]"):
        verify_ensemble(run.onnx, run.members, patch[:, :1], radiomics)
    with pytest.raises(ValueError, match=r"radiomics must have shape \[4, 527\]"):
        verify_ensemble(run.onnx, run.members, patch, radiomics[:, :10])


@pytest.mark.parametrize(
    ("kwargs", "members", "error", "match"),
    [
        ({"protocol": "honest"}, "run", ValueError, "has no 'honest' threshold"),
        ({"protocol": "best"}, "run", ValueError, r"protocol must be one of \['paper', 'honest'\]"),
        ({"opset": 13}, "run", ValueError, "opset must be >= 17"),
        ({}, "empty", ValueError, "no members to export"),
        ({}, "mixed", ValueError, "different feature lists"),
    ],
)
def test_export_errors(run, tmp_path, kwargs, members, error, match):
    """Check bad requests fail before any tracing, naming the member, field or allowed values."""
    chosen = {"run": run.members, "empty": [],
              "mixed": [run.members[0], _untrained(MODEL, 1, 0, radiomics=False)]}[members]  # fmt: skip
    with pytest.raises(error, match=match):
        export_ensemble(chosen, tmp_path / "x.onnx", **kwargs)


def test_export_path_errors(run, tmp_path):
    """Check the run-folder and output-path errors name the folder / file."""
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_ensemble(run.members, tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError, match="no trained members"):
        export_ensemble(tmp_path, tmp_path / "x.onnx")
    two = tmp_path / "two"
    _untrained(MODEL, 0, 0).save(two / MODEL / "fold_0" / "seed_0")
    _untrained("qsmrimnet-add", 0, 0).save(two / "qsmrimnet-add" / "fold_0" / "seed_0")
    with pytest.raises(ValueError, match=r"several models were trained \(qsmrimnet, qsmrimnet-add\)"):
        load_members(two)
    (two / "config.resolved.json").write_text(json.dumps({"models": ["qsmrimnet-add", MODEL]}))
    assert {m.model_name for m in load_members(two)} == {"qsmrimnet-add"}
