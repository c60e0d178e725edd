"""Offline ``qsmrim predict`` (BIDS derivatives), the serve/predict CLI parsers and ``platform/serve.yaml``."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from test_serving_model import build_tiny_ensemble, cohort_arrays, direct_run

from qsmrim import __version__
from qsmrim.data import discover_cohort
from qsmrim.data.lesions import lesion_rows
from qsmrim.data.qc import QC_CHECKS, run_qc
from qsmrim.radiomics import FEATURE_NAMES
from serving.cli import add_predict_parser, add_serve_parser, app_args_from_config, load_serve_config
from serving.predict import predict_dataset
from serving.preprocess import LESION_COLUMNS, prepare_files
from serving.screening import model_thresholds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, synth_root) -> Path:
    return build_tiny_ensemble(tmp_path_factory.mktemp("model") / "model.onnx", *cohort_arrays(synth_root))


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, synth_root, model_path) -> Path:
    out = tmp_path_factory.mktemp("deriv") / "qsmrim"
    result = predict_dataset(model_path, synth_root, out, providers="cpu")
    assert result.ok and len(result.subjects) == 4
    return out


def _tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)


def test_dataset_description(predicted, model_path):
    """Check the BIDS derivative description names qsmrim's version, the model and the code's commit."""
    desc = json.loads((predicted / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    gen = desc["GeneratedBy"][0]
    assert (gen["Name"], gen["Version"]) == ("qsmrim", __version__)
    model = gen["Model"]
    assert (model["Name"], model["Version"], model["URI"], model["Members"]) == (
        "qsmrim-tiny",
        "7",
        str(model_path),
        5,
    )
    assert model["TrainingGitCommit"] == "0123abc"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert gen["GitCommit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert desc["SourceDatasets"][0]["URL"].startswith("file://")


def test_lesion_tables_and_maps_match_direct_session(predicted, synth_root, model_path):
    """Check each TSV equals the bare session on the same inputs and each map holds exactly those lesions."""
    participants = _tsv(predicted / "participants.tsv")
    assert participants["participant_id"].tolist() == ["sub-001", "sub-002", "sub-003", "sub-004"]
    for files in discover_cohort(synth_root).subjects:
        sub = f"sub-{files.subject}"
        vol, prepared = prepare_files(files)
        ref = direct_run(model_path, prepared.patch, prepared.radiomics)
        table = _tsv(predicted / sub / "anat" / f"{sub}_desc-rim_lesions.tsv")
        assert tuple(table.columns) == (*LESION_COLUMNS, "review", "qc_cropped", "qc_confluent")
        assert table["review"].tolist() == table["rim"].tolist()  # the tiny model carries no screening threshold
        qc = run_qc(vol)
        assert table["qc_confluent"].tolist() == [int(i in qc.confluent_lesions) for i in vol.lesion_indices]
        assert table["qc_cropped"].tolist() == [0] * len(table)
        assert table["index"].tolist() == vol.lesion_indices
        np.testing.assert_array_equal(table["prob"].to_numpy(np.float32), ref["prob"])  # exact round trip
        np.testing.assert_array_equal(table["spread"].to_numpy(np.float32), ref["spread"])
        assert table["votes"].tolist() == ref["votes"].tolist()
        assert table["rim"].tolist() == ref["rim"].astype(int).tolist()
        rows = lesion_rows(vol)
        for key in ("centroid_mm_x", "centroid_mm_y", "centroid_mm_z", "volume_mm3"):
            np.testing.assert_allclose(table[key], [r[key] for r in rows], rtol=0, atol=1e-9)

        lesion_img = nib.load(str(files.lesions))
        lesions = np.asarray(lesion_img.dataobj).astype(int)
        rim_pos = table["index"][table["rim"] == 1].to_numpy()
        mask_img = nib.load(str(predicted / sub / "anat" / f"{sub}_desc-rimpos_mask.nii.gz"))
        np.testing.assert_allclose(mask_img.affine, lesion_img.affine, atol=1e-6)
        np.testing.assert_array_equal(
            np.asarray(mask_img.dataobj), np.isin(lesions, rim_pos).astype(np.uint8)
        )
        dseg = np.asarray(nib.load(str(predicted / sub / "anat" / f"{sub}_desc-rimpos_dseg.nii.gz")).dataobj)
        np.testing.assert_array_equal(dseg, np.where(np.isin(lesions, rim_pos), lesions, 0))
        prob = np.asarray(nib.load(str(predicted / sub / "anat" / f"{sub}_label-rim_probseg.nii.gz")).dataobj)
        lut = np.zeros(lesions.max() + 1, np.float32)
        lut[table["index"].to_numpy()] = table["prob"].to_numpy(np.float32)
        np.testing.assert_array_equal(prob, lut[lesions])

        row = participants.set_index("participant_id").loc[sub]
        assert (row["n_lesions"], row["n_rim_predicted"]) == (len(table), int(ref["rim"].sum()))
        assert row["n_rim_expert"] == sum(v == 1 for v in vol.labels.values())


def _lps_copy(src_root: Path, dst_root: Path, sub: str = "001") -> Path:
    """A one-subject BIDS root whose images are stored LPS (x and y flipped) instead of RAS."""
    shutil.copytree(src_root / f"sub-{sub}", dst_root / f"sub-{sub}")
    der = Path("derivatives/lesions") / f"sub-{sub}" / "anat"
    shutil.copytree(src_root / der, dst_root / der)
    for path in [*(dst_root / f"sub-{sub}" / "anat").glob("*.nii.gz"), *(dst_root / der).glob("*.nii.gz")]:
        img = nib.load(str(path))
        nx, ny = img.shape[:2]
        flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
        data = np.asarray(img.dataobj)[::-1, ::-1, :].copy()
        nib.save(nib.Nifti1Image(data, img.affine @ flip, img.header), str(path))
    return dst_root / f"sub-{sub}"


def test_single_subject_on_its_own_grid_and_cohort_table_merges(predicted, synth_root, model_path, tmp_path):
    """Check SUBJECT input, maps written back in an LPS input's own voxel order, and participants merging."""
    subject = _lps_copy(synth_root, tmp_path / "lps")
    out = tmp_path / "deriv"
    result = predict_dataset(model_path, subject, out, providers="cpu")
    assert result.ok and [r.subject for r in result.subjects] == ["001"]
    ras = _tsv(predicted / "sub-001" / "anat" / "sub-001_desc-rim_lesions.tsv")
    lps = _tsv(out / "sub-001" / "anat" / "sub-001_desc-rim_lesions.tsv")
    pd.testing.assert_frame_equal(lps, ras)  # same lesions, same scanner-space centroids and outputs
    ras_mask = nib.load(str(predicted / "sub-001" / "anat" / "sub-001_desc-rimpos_mask.nii.gz"))
    lps_mask = nib.load(str(out / "sub-001" / "anat" / "sub-001_desc-rimpos_mask.nii.gz"))
    lps_input = nib.load(str(subject / "anat" / "sub-001_Chimap.nii.gz"))
    np.testing.assert_allclose(lps_mask.affine, lps_input.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(lps_mask.dataobj), np.asarray(ras_mask.dataobj)[::-1, ::-1, :])
    # a second subject into the same folder keeps the first one's row
    predict_dataset(model_path, synth_root / "sub-002", out, providers="cpu")
    assert _tsv(out / "participants.tsv")["participant_id"].tolist() == ["sub-001", "sub-002"]


def test_bad_subject_is_reported_and_others_written(cohort_copy, model_path, tmp_path, capsys):
    """Check a corrupt subject is named in the problems (exit 1) while the valid subjects are written."""
    qsm = cohort_copy / "sub-002" / "anat" / "sub-002_Chimap.nii.gz"
    qsm.write_bytes(qsm.read_bytes()[:2000])
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_predict_parser(sub)
    args = parser.parse_args(
        ["predict", str(cohort_copy), "--model", str(model_path), "--out", str(tmp_path / "d")]
    )
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "sub-002_Chimap.nii.gz: unreadable or truncated NIfTI" in err
    written = sorted(p.name for p in (tmp_path / "d").glob("sub-*") if p.is_dir())  # sub-<id>.html: review pages
    assert written == ["sub-001", "sub-003", "sub-004"]


def test_other_models_output_folder_is_refused(predicted, synth_root, tmp_path, model_path):
    """Check predictions of two different models never end up in one derivatives dataset."""
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    shutil.copy(model_path, other)
    (other.parent / "model.json").write_text(json.dumps({"name": "qsmrim-tiny", "version": "8"}))
    with pytest.raises(ValueError, match="holds predictions of model"):
        predict_dataset(other, synth_root / "sub-001", predicted, providers="cpu")


def test_offline_modules_do_not_import_ray():
    """Check `qsmrim predict` needs no Ray (nor MLflow for a local model)."""
    code = "import sys, serving.predict, serving.cli; assert not {'ray', 'mlflow'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# -- serve CLI and config ---------------------------------------------------------------------------------


def test_serve_parser_defaults_to_loopback():
    """Check `serve` flags parse and resolve to 127.0.0.1:8000 without a config."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_serve_parser(sub)
    args = parser.parse_args(["serve", "--model", "m.onnx"])
    assert (args.model, args.host, args.port, args.config) == ("m.onnx", None, None, None)
    config = load_serve_config(REPO / "platform" / "serve.yaml")
    assert (config["http_options"]["host"], config["http_options"]["port"]) == ("127.0.0.1", 8000)


def test_serve_yaml_is_a_valid_serve_config():
    """Check platform/serve.yaml passes Ray's own schema and builder, and maps onto AppArgs as serve deploy would."""
    pytest.importorskip("ray")
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from serving.app import app_builder

    doc = yaml.safe_load((REPO / "platform" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "serving.app:app_builder"
    built = call_user_app_builder_with_args_if_necessary(app_builder, app_cfg.args)
    assert type(built).__name__ == "Application"
    args, name, prefix = app_args_from_config(doc, model="x.onnx")
    assert (args.model, name, prefix) == ("x.onnx", "qsmrim", "/")
    assert args.preprocess.autoscaling_config["max_replicas"] == 4 and args.preprocess.num_replicas is None
    assert args.batching.batch_wait_timeout_s > 0
    assert args.ensemble.max_ongoing_requests >= args.batching.max_batch_size
    names = {d["name"] for d in doc["applications"][0]["deployments"]}
    assert names == {"Ingress", "Preprocess", "RimEnsemble"}


@pytest.mark.parametrize(
    "config, match",
    [
        ({"batching": {"max_batch_size": 12}}, "power of two"),
        ({"batching": {"batch_wait_timeout_s": 0}}, "greater than 0"),
        ({"ensemble": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}, "not both"),
        ({"modle": "typo.onnx"}, "Extra inputs are not permitted"),
    ],
)
def test_app_args_validation(config, match):
    """Check batching knobs that would disable batching, conflicting replica settings and typos are refused."""
    from pydantic import ValidationError

    from serving.config import AppArgs

    with pytest.raises(ValidationError, match=match):
        AppArgs.model_validate(config)


def test_models_uri_serves_the_registered_champion(tmp_path, monkeypatch, model_path, synth_root):
    """Check `--model models:/qsmrim@champion` loads through the real MLflow registry (sqlite) and predicts
    like the local file, with the registry's name, version and alias in the derivatives' provenance."""
    mlflow = pytest.importorskip("mlflow")
    from qsmrim.tracking.registry import log_and_register
    from serving.model import RimModel

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.MlflowClient(uri).create_experiment("qsmrim-models", artifact_location=(tmp_path / "art").as_uri())
    sidecar = json.loads((model_path.parent / "model.json").read_text())
    members = [
        {"model": "tiny", "fold": m, "seed": 0, "threshold": t} for m, t in enumerate(sidecar["thresholds"])
    ]
    content = {**sidecar, "model": "tiny", "protocol": "paper", "n_members": len(members), "members": members,
               "onnx": {"weights_dtype": "float32", "files": {}},
               "feature_names_sha256": hashlib.sha256("\n".join(FEATURE_NAMES).encode()).hexdigest()}  # fmt: skip
    content.pop("name"), content.pop("version")
    log_and_register(
        model_path, content, cv_metrics={"cv_pr_auc": 0.5}, config={}, git_commit=None, tracking_uri=uri
    )
    assert mlflow.active_run() is None

    # explicit tracking_uri: MLflow's _use_tracking_uri (inside log_and_register) deletes MLFLOW_TRACKING_URI
    registered = RimModel.load("models:/qsmrim@champion", providers="cpu", tracking_uri=uri)
    info = registered.info
    assert (info.name, info.version, info.alias, info.members) == ("qsmrim", "1", "champion", 5)
    patch, radiomics = cohort_arrays(synth_root)
    ref = direct_run(model_path, patch, radiomics)
    got = registered.run(patch, radiomics)
    np.testing.assert_array_equal(got["prob"], ref["prob"])
    np.testing.assert_array_equal(got["rim"], ref["rim"])

    out = tmp_path / "deriv"
    assert predict_dataset(
        "models:/qsmrim@champion", synth_root / "sub-001", out, providers="cpu", tracking_uri=uri
    ).ok
    model = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["Model"]
    assert (model["Name"], model["Version"], model["Alias"], model["URI"]) == (
        "qsmrim",
        "1",
        "champion",
        "models:/qsmrim@champion",
    )


# -- review flag and QC (issue 15) -----------------------------------------------------------------------


def _model_with_screening(model_path: Path, folder: Path, threshold: float) -> Path:
    """The same graph with a sidecar that carries a screening threshold, as qsmrim export writes it."""
    folder.mkdir(parents=True)
    shutil.copy(model_path, folder / "model.onnx")
    meta = json.loads((model_path.parent / "model.json").read_text())
    meta["screening"] = {"threshold": threshold, "rule": "review = prob >= threshold", "source": "test"}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder / "model.onnx"


def _sidecar(out: Path, sub: str = "001") -> dict:
    return json.loads((out / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-rim_lesions.json").read_text())


def test_review_follows_the_screening_threshold_and_its_source(synth_root, model_path, tmp_path, capsys):
    """Check review = prob >= the model's screening threshold, a CLI override wins and is named, a model
    without one flags review by the rim call, and one folder never mixes screening thresholds."""
    files = discover_cohort(synth_root).subjects[0]
    _, prepared = prepare_files(files)
    prob = direct_run(model_path, prepared.patch, prepared.radiomics)["prob"]
    t = float(np.sort(prob)[len(prob) // 3])  # flags two thirds of the lesions: differs from the rim call
    screened = _model_with_screening(model_path, tmp_path / "screened", t)
    out = tmp_path / "model-threshold"
    result = predict_dataset(screened, synth_root / "sub-001", out, providers="cpu")
    table = _tsv(out / "sub-001" / "anat" / "sub-001_desc-rim_lesions.tsv")
    assert table["review"].tolist() == (table["prob"].to_numpy(np.float32) >= np.float32(t)).astype(int).tolist()
    assert table["review"].tolist() != table["rim"].tolist()
    assert result.subjects[0].n_review == int(table["review"].sum())
    used = _sidecar(out)["Thresholds"]
    assert used["screening"] == {"value": t, "rule": "review = prob >= screening threshold", "source": "model",
                                 "model_value": t}  # fmt: skip
    assert used["rim"]["members"] == 5 and used["rim"]["min_votes"] == 3 and used["rim"]["source"] == "model"
    assert used["rim"]["member_thresholds"] == json.loads((model_path.parent / "model.json").read_text())["thresholds"]
    model = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["Model"]
    assert (model["ScreeningThreshold"], model["ScreeningThresholdSource"]) == (t, "model")
    with pytest.raises(ValueError, match=r"screening threshold .* not 0\.9"):
        predict_dataset(screened, synth_root / "sub-001", out, providers="cpu", screening_threshold=0.9)

    parser = argparse.ArgumentParser(prog="qsmrim")
    add_predict_parser(parser.add_subparsers(dest="command"))
    cli_out = tmp_path / "cli-threshold"
    args = parser.parse_args(["predict", str(synth_root / "sub-001"), "--model", str(screened), "--out",
                              str(cli_out), "--providers", "cpu", "--screening-threshold", "0.9"])  # fmt: skip
    assert args.func(args) == 0
    table = _tsv(cli_out / "sub-001" / "anat" / "sub-001_desc-rim_lesions.tsv")
    assert table["review"].tolist() == (table["prob"] >= 0.9).astype(int).tolist()
    assert f"{int(table['review'].sum())} to review" in capsys.readouterr().out
    assert _sidecar(cli_out)["Thresholds"]["screening"] == {
        "value": 0.9, "rule": "review = prob >= screening threshold", "source": "cli", "model_value": t,
    }  # fmt: skip
    for bad in ("1.5", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["predict", "s", "--model", "m", "--out", "o", "--screening-threshold", bad])
    assert "must be a number in [0, 1]" in capsys.readouterr().err


def test_model_thresholds_from_sidecar_registry_tags_and_old_models():
    """Check the screening threshold is read from an exported sidecar and from registry tags, and an older
    model.json without one answers review by the rim call."""
    exported = {"members": [{"threshold": 0.4}, {"threshold": 0.6}, {"threshold": 0.5}], "protocol": "paper",
                "screening": {"threshold": 0.12}}  # fmt: skip
    got = model_thresholds(exported, 3)
    assert got["rim"]["member_thresholds"] == [0.4, 0.6, 0.5] and got["rim"]["min_votes"] == 2
    assert (got["screening"]["value"], got["screening"]["source"]) == (0.12, "model")
    assert model_thresholds({"screening_threshold": 0.2, "thresholds": [0.5]}, 1)["screening"]["value"] == 0.2
    old = model_thresholds({"thresholds": [0.5, 0.5]}, 2)["screening"]
    assert (old["value"], old["source"]) == (None, "rim-call") and "review = rim" in old["rule"]


def _write_scaled_qsm(root: Path, sub: str, factor: float) -> None:
    path = root / f"sub-{sub}" / "anat" / f"sub-{sub}_Chimap.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * factor, img.affine, img.header), str(path))


def test_qc_sidecar_and_strict_refusal(cohort_copy, model_path, tmp_path, capsys):
    """Check a QSM in ppb is predicted with its qc_units flag under warn, and refused (exit 1, naming the check,
    its value and --qc strict) under strict while the clean subjects are written with no flag."""
    _write_scaled_qsm(cohort_copy, "002", 1000.0)
    out = tmp_path / "warn"
    result = predict_dataset(model_path, cohort_copy, out, providers="cpu")
    assert result.ok
    flags = {r.subject: r.qc_flags for r in result.subjects}
    assert flags == {"001": (), "002": ("qc_units",), "003": (), "004": ()}
    doc = _sidecar(out, "002")
    assert doc["QCPolicy"] == "warn" and doc["QCFlags"] == ["qc_units"]
    assert set(QC_CHECKS) <= set(doc)
    assert doc["qc_units"]["flag"] is True and 100 < doc["qc_units"]["value"] < 300  # ppm span x 1000
    assert "ppb" in doc["qc_units"]["guess"]
    assert not any(doc[c]["flag"] for c in QC_CHECKS if c != "qc_units")
    clean = _sidecar(out, "001")
    assert clean["QCFlags"] == [] and 0.1 < clean["qc_units"]["value"] < 0.3

    parser = argparse.ArgumentParser(prog="qsmrim")
    add_predict_parser(parser.add_subparsers(dest="command"))
    strict = tmp_path / "strict"
    args = parser.parse_args(["predict", str(cohort_copy), "--model", str(model_path), "--out", str(strict),
                              "--providers", "cpu", "--qc", "strict"])  # fmt: skip
    assert args.func(args) == 1
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "wrote 3 scan(s)" in printed
    assert "sub-002_Chimap.nii.gz: qc_units = 1" in printed and "refused by --qc strict" in printed
    assert not (strict / "sub-002").exists() and (strict / "sub-001").exists()


def test_serve_flags_override_the_config_and_are_named(tmp_path):
    """Check `qsmrim serve --screening-threshold/--qc` win over serve.yaml's args and answers name the CLI as
    their source, while values only in the file are named serve.yaml; an out-of-range value is refused."""
    from pydantic import ValidationError

    doc = {"applications": [{"name": "qsmrim", "args": {"model": "m.onnx", "screening_threshold": 0.2, "qc": "strict"}}]}
    args, _, _ = app_args_from_config(doc)
    assert (args.screening_threshold, args.screening_source, args.qc) == (0.2, "serve.yaml", "strict")
    assert args.qc_setting == "qc: strict (serve config)"
    parser = argparse.ArgumentParser(prog="qsmrim")
    add_serve_parser(parser.add_subparsers(dest="command"))
    cli = parser.parse_args(["serve", "--screening-threshold", "0.35", "--qc", "warn"])
    args, _, _ = app_args_from_config(doc, None, {"screening_threshold": cli.screening_threshold, "qc": cli.qc})
    assert (args.screening_threshold, args.screening_source, args.qc) == (0.35, "cli", "warn")
    only_qc = parser.parse_args(["serve", "--qc", "strict"])
    args, _, _ = app_args_from_config(doc, None, {"screening_threshold": only_qc.screening_threshold, "qc": "strict"})
    assert (args.screening_source, args.qc_setting) == ("serve.yaml", "--qc strict")
    with pytest.raises(ValidationError, match="screening_threshold"):
        app_args_from_config({"applications": [{"args": {"screening_threshold": 1.5}}]})
    with pytest.raises(ValidationError, match="qc"):
        app_args_from_config({"applications": [{"args": {"qc": "lenient"}}]})
