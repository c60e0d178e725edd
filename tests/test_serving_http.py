"""The Ray Serve app over real HTTP on 127.0.0.1: answers equal a bare onnxruntime run, bad input gets 4xx.

One local Ray and one Serve application for the whole module (fractional CPUs: Ray deadlocks on 2 cores
otherwise). After every bad request ``/healthz`` must still answer 200: nothing a client sends may take a
replica down.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from test_serving_model import direct_run

from qsmrim.data import discover_cohort, load_subject
from qsmrim.data.lesions import lesion_rows
from qsmrim.data.qc import run_qc
from qsmrim.radiomics import FEATURE_NAMES
from serving.preprocess import prepare_files

pytestmark = pytest.mark.slow

MAX_UPLOAD = 3 * 2**20
MAX_JSON = 2**20
MAX_ROWS = 32
MAX_IMAGE_BYTES = 96 * 96 * 24 * 4  # the synthetic cohort's images as float32 (conftest.SMALL_SHAPE)
MAX_IN_FLIGHT = 16  # the concurrency test sends 16 at once from 127.0.0.1
UPLOAD_GRACE_S = 3.0
SCREENING = 0.5  # the app's screening threshold, as serve.yaml's args.screening_threshold would set it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tiny_model):
    """A started app (test-sized caps, 50 ms batch window) and an httpx client bound to it."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from serving.app import AppArgs, BatchConfig, DeploymentArgs, build_app

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    port = _free_port()
    args = AppArgs(
        model=str(tiny_model),
        max_upload_bytes=MAX_UPLOAD,
        max_json_bytes=MAX_JSON,
        max_lesions_per_request=MAX_ROWS,
        max_image_bytes=MAX_IMAGE_BYTES,
        batching=BatchConfig(max_batch_size=8, batch_wait_timeout_s=0.05),
        ingress=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=32),
        preprocess=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=2),
        ensemble=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=32),
        max_uploads_in_flight=MAX_IN_FLIGHT,
        max_uploads_per_client=MAX_IN_FLIGHT,
        upload_grace_s=UPLOAD_GRACE_S,
        screening_threshold=SCREENING,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="qsmrim-test", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            yield c
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def _subject_files(root: Path, sub: str) -> dict[str, Path]:
    anat, der = root / f"sub-{sub}" / "anat", root / "derivatives" / "lesions" / f"sub-{sub}" / "anat"
    return {
        "qsm": anat / f"sub-{sub}_Chimap.nii.gz",
        "flair": anat / f"sub-{sub}_FLAIR.nii.gz",
        "lesions": der / f"sub-{sub}_desc-lesions_dseg.nii.gz",
        "labels": der / f"sub-{sub}_desc-lesions_dseg.tsv",
    }


def _multipart(root: Path, sub: str = "001", with_labels: bool = True, **replace: bytes) -> dict:
    files = {
        k: (p.name, p.read_bytes())
        for k, p in _subject_files(root, sub).items()
        if with_labels or k != "labels"
    }
    for key, data in replace.items():
        files[key] = (f"{key}.nii.gz", data)
    return files


def _assert_healthy(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"


def _assert_close(got: list[dict], ref: dict[str, np.ndarray]) -> None:
    """The HTTP rows equal the bare session's outputs (prob/spread to float32 precision, votes/rim exactly)."""
    np.testing.assert_allclose([g["prob"] for g in got], ref["prob"], rtol=0, atol=1e-6)
    np.testing.assert_allclose([g["spread"] for g in got], ref["spread"], rtol=0, atol=1e-6)
    assert [g["votes"] for g in got] == ref["votes"].tolist()
    assert [g["rim"] for g in got] == ref["rim"].tolist()


# -- healthy paths ----------------------------------------------------------------------------------------


def test_health_model_and_docs(client):
    """Check /healthz, /v1/model (identity, provider, features, live batching knobs) and the OpenAPI docs."""
    _assert_healthy(client)
    info = client.get("/v1/model").json()
    assert (info["name"], info["version"], info["members"]) == ("qsmrim-tiny", "7", 5)
    assert info["execution_provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert info["precision"] == "fp32" and "parity" in info  # issue 18: the graph served and its parity figures
    assert info["feature_names"] == list(FEATURE_NAMES)
    assert info["patch_shape"] == [2, 16, 32, 32]
    assert info["batching"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}  # reconfigure applied
    assert info["thresholds"]["screening"] == _SCREENING_USED and info["qc_policy"] == "warn"
    assert info["thresholds"]["rim"]["members"] == 5 and len(info["thresholds"]["rim"]["member_thresholds"]) == 5
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/lesions", "/healthz", "/v1/model"} <= set(paths)
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("sub, labels", [("001", True), ("002", False)])
def test_predict_subject_matches_direct_session(client, synth_root, tiny_model, sub, labels):
    """Check /v1/predict returns every lesion's geometry and the bare session's outputs on the same inputs."""
    r = client.post("/v1/predict", files=_multipart(synth_root, sub, with_labels=labels))
    assert r.status_code == 200, r.text
    body = r.json()
    files = next(s for s in discover_cohort(synth_root).subjects if s.subject == sub)
    vol, prepared = prepare_files(files)
    ref = direct_run(tiny_model, prepared.patch, prepared.radiomics)
    got = body["lesions"]
    assert [g["index"] for g in got] == vol.lesion_indices
    for g, row in zip(got, lesion_rows(vol), strict=True):
        for key in ("centroid_mm_x", "centroid_mm_y", "centroid_mm_z", "volume_mm3"):
            assert g[key] == pytest.approx(row[key], abs=1e-9)
        assert g["label"] == (row["rim"] if labels else None)
    _assert_close(got, ref)
    assert body["subject"]["lesions"] == len(got)
    assert body["subject"]["rim_count"] == int(ref["rim"].sum())
    expert = sum(v == 1 for v in vol.labels.values())
    assert body["subject"]["expert_rim_count"] == (expert if labels else None)
    assert body["model"] == {"name": "qsmrim-tiny", "version": "7", "alias": None, "uri": str(tiny_model)}
    # review at the app's screening threshold, said in the answer; QC of a clean subject: no flag
    assert [g["review"] for g in got] == (ref["prob"] >= np.float32(SCREENING)).tolist()
    assert body["subject"]["review_count"] == int((ref["prob"] >= np.float32(SCREENING)).sum())
    assert body["thresholds"]["screening"] == _SCREENING_USED
    assert body["thresholds"]["rim"]["min_votes"] == 3
    qc = run_qc(vol)
    assert body["qc"]["policy"] == "warn" and body["qc"]["passed"] is True and body["qc"]["flags"] == []
    assert body["qc"]["qc_units"]["value"] == pytest.approx(qc["qc_units"].value)
    assert [g["qc_confluent"] for g in got] == [i in qc.confluent_lesions for i in vol.lesion_indices]
    assert not any(g["qc_cropped"] for g in got)


_SCREENING_USED = {"value": SCREENING, "rule": "review = prob >= screening threshold", "source": "serve.yaml",
                   "model_value": None}  # fmt: skip


def test_predict_echoes_participant_and_session(client, synth_root):
    """Check that /v1/predict echoes the scan's BIDS labels (prefix optional), omits them when not given, and
    answers 422 naming the field for a label that is not alphanumeric."""
    files = _multipart(synth_root, "001")
    r = client.post("/v1/predict", files=files, data={"participant": "sub-001", "session": "02"})
    assert r.status_code == 200, r.text
    assert (r.json()["subject"]["participant"], r.json()["subject"]["session"]) == ("001", "02")
    plain = client.post("/v1/predict", files=files).json()["subject"]
    assert plain.get("participant") is None and plain.get("session") is None
    bad = client.post("/v1/predict", files=files, data={"session": "ses-02_run-1"})
    assert bad.status_code == 422 and bad.json()["error"].startswith("session: String should match pattern")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _json_rows(patch: np.ndarray, radiomics: np.ndarray) -> dict:
    rad = [[None if np.isnan(v) else float(v) for v in row] for row in radiomics]
    return {"patch": patch.tolist(), "radiomics": rad}


def test_predict_lesions_json_npz_multipart(client, arrays, tiny_model):
    """Check the three encodings of /v1/predict/lesions give the bare session's answer (NaN radiomics included)."""
    patch, radiomics = arrays[0][:40], arrays[1][:40]
    nan_rows = np.flatnonzero(np.isnan(radiomics).any(axis=1))
    take = np.unique(np.r_[nan_rows[:2], np.arange(4)])
    patch, radiomics = patch[take], radiomics[take]
    assert np.isnan(radiomics).any()
    ref = direct_run(tiny_model, patch, radiomics)

    r = client.post("/v1/predict/lesions", json=_json_rows(patch, radiomics))
    assert r.status_code == 200, r.text
    _assert_close(r.json()["predictions"], ref)
    assert [p["review"] for p in r.json()["predictions"]] == (ref["prob"] >= np.float32(SCREENING)).tolist()
    assert r.json()["thresholds"]["screening"] == _SCREENING_USED
    body = _npz(patch=patch, radiomics=radiomics)
    r = client.post("/v1/predict/lesions", content=body, headers={"content-type": "application/x-npz"})
    assert r.status_code == 200, r.text
    _assert_close(r.json()["predictions"], ref)
    r = client.post("/v1/predict/lesions", files={"file": ("lesions.npz", body, "application/octet-stream")})
    assert r.status_code == 200, r.text
    _assert_close(r.json()["predictions"], ref)
    # one lesion without the batch axis
    r = client.post("/v1/predict/lesions", content=_npz(patch=patch[0], radiomics=radiomics[0]),
                    headers={"content-type": "application/x-npz"})  # fmt: skip
    assert r.status_code == 200, r.text
    _assert_close(r.json()["predictions"], {k: v[:1] for k, v in ref.items()})


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(client, arrays, tiny_model):
    """Check 16 concurrent requests of different sizes share onnxruntime calls yet each gets exactly its rows."""
    patch, radiomics = arrays[0][:60], arrays[1][:60]
    ref = direct_run(tiny_model, patch, radiomics)
    before = client.get("/v1/model").json()["batch_stats"]
    spans = [(i * 3, 1 + i % 3) for i in range(16)]

    def post(span: tuple[int, int]) -> list[dict]:
        a, n = span
        body = _npz(patch=patch[a : a + n], radiomics=radiomics[a : a + n])
        r = client.post("/v1/predict/lesions", content=body, headers={"content-type": "application/x-npz"})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, spans))
    for (a, n), got in zip(spans, answers, strict=True):
        _assert_close(got, {k: v[a : a + n] for k, v in ref.items()})
    after = client.get("/v1/model").json()["batch_stats"]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 16
    assert batches < requests  # at least two requests shared one onnxruntime call
    assert after["largest_batch"] <= 8  # max_batch_size from user_config


# -- bad input: 4xx JSON, replica stays healthy -------------------------------------------------------------


def _nifti_gz(img: nib.Nifti1Image) -> bytes:
    return gzip.compress(img.to_bytes())


def _edited(path: Path, edit) -> bytes:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data = edit(data)
    return _nifti_gz(nib.Nifti1Image(data, img.affine, img.header))


def _bad_subject_cases(root: Path) -> dict[str, tuple[dict, int, str]]:
    files = _subject_files(root, "001")
    lesions = np.asarray(nib.load(str(files["lesions"])).dataobj)
    inside = tuple(np.argwhere(lesions > 0)[0])
    qsm_img = nib.load(str(files["qsm"]))
    raw_nii = nib.Nifti1Image(np.asarray(qsm_img.dataobj), qsm_img.affine).to_bytes()  # uncompressed .nii

    def set_at(value):
        def edit(data):
            data = data.astype(np.float32)
            data[inside] = value
            return data

        return edit

    shifted = nib.Nifti1Image(
        np.asarray(nib.load(str(files["flair"])).dataobj), qsm_img.affine @ np.diag([1, 1, 1.01, 1])
    )
    flair_gz = files["flair"].read_bytes()
    return {
        "corrupt": ({"qsm": b"this is not a NIfTI file at all" * 20}, 422, "qsm (qsm.nii.gz): unreadable"),
        "truncated gz": ({"flair": flair_gz[: len(flair_gz) // 3]}, 422, "flair (flair.nii.gz): unreadable or truncated"),
        "truncated nii": ({"qsm": raw_nii[: len(raw_nii) // 2]}, 422, "qsm"),
        "grid shape differs": ({"flair": _nifti_gz(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)))}, 422, "shape"),
        "grid affine differs": ({"flair": _nifti_gz(shifted)}, 422, "affine differs"),
        "NaN in lesion": ({"qsm": _edited(files["qsm"], set_at(np.nan))}, 422, "non-finite voxels inside lesion"),
        "Inf in lesion": ({"flair": _edited(files["flair"], set_at(np.inf))}, 422, "non-finite voxels inside lesion"),
        "empty lesion map": ({"lesions": _edited(files["lesions"], lambda d: np.zeros_like(d))}, 422, "empty lesion map"),
        "labels disagree": ({"labels": b"index\trim\n999\t1\n"}, 422, "labels"),
    }  # fmt: skip


def test_bad_subjects_get_4xx_and_replica_stays_healthy(client, synth_root):
    """Check each broken upload gets its 4xx JSON naming the problem, then /healthz is still 200."""
    for name, (replace, status, match) in _bad_subject_cases(synth_root).items():
        r = client.post("/v1/predict", files=_multipart(synth_root, "001", **replace))
        assert r.status_code == status, (name, r.text)
        assert match in r.json()["error"], (name, r.json())
        assert "qsmrim-upload" not in r.text  # no server temp paths
        _assert_healthy(client)


def test_bad_requests_get_4xx_and_replica_stays_healthy(client, synth_root, arrays):
    """Check missing fields, oversize bodies (declared and streamed), bad arrays and npz pickles get 4xx JSON."""
    patch, radiomics = arrays[0][:2], arrays[1][:2]
    obj = np.empty(2, dtype=object)
    obj[:] = [{"x": 1}, [1]]
    big = np.zeros((MAX_ROWS + 1, 527), np.float32)

    def stream():
        for _ in range(40):
            yield b"\0" * 100_000

    npz = {"content-type": "application/x-npz"}
    no_flair = {k: v for k, v in _multipart(synth_root).items() if k != "flair"}
    cases = [
        ("missing multipart field", dict(url="/v1/predict", files=no_flair), 422, "flair: Field required"),
        ("bad lesions_kind", dict(url="/v1/predict", files=_multipart(synth_root), data={"lesions_kind": "x"}), 422, "lesions_kind"),
        ("oversize declared", dict(url="/v1/predict", files={"qsm": ("q.nii", b"\0" * (MAX_UPLOAD + 1))}), 413, "too large"),
        ("chunked upload", dict(url="/v1/predict/lesions", content=stream(), headers=npz), 411, "Content-Length header"),
        ("json too big", dict(url="/v1/predict/lesions", content=b"[" + b"0," * MAX_JSON + b"0]",
                              headers={"content-type": "application/json"}), 413, "send .npz"),
        ("invalid json", dict(url="/v1/predict/lesions", content=b"{", headers={"content-type": "application/json"}), 422, "not valid JSON"),
        ("json missing field", dict(url="/v1/predict/lesions", json={"patch": patch.tolist()}), 422, "radiomics: missing field"),
        ("json strings", dict(url="/v1/predict/lesions", json={"patch": "abc", "radiomics": [["x"] * 527]}), 422, "not a rectangular array of numbers"),
        ("json ragged", dict(url="/v1/predict/lesions", json={"patch": [[1], [1, 2]], "radiomics": []}), 422, "rectangular"),
        ("wrong patch shape", dict(url="/v1/predict/lesions", content=_npz(patch=patch[:, :, :8], radiomics=radiomics), headers=npz), 422, "patch: shape"),
        ("row mismatch", dict(url="/v1/predict/lesions", content=_npz(patch=patch, radiomics=radiomics[:1]), headers=npz), 422, "row"),
        ("NaN patch", dict(url="/v1/predict/lesions", content=_npz(patch=patch * np.nan, radiomics=radiomics), headers=npz), 422, "NaN"),
        ("Inf radiomics", dict(url="/v1/predict/lesions", content=_npz(patch=patch, radiomics=radiomics + np.inf), headers=npz), 422, "infinite"),
        ("complex dtype", dict(url="/v1/predict/lesions", content=_npz(patch=patch.astype(complex), radiomics=radiomics), headers=npz), 422, "complex"),
        ("object array (pickle)", dict(url="/v1/predict/lesions", content=_npz(patch=obj, radiomics=radiomics), headers=npz), 422, "object arrays are refused"),
        ("too many lesions", dict(url="/v1/predict/lesions", content=_npz(patch=patch, radiomics=big), headers=npz), 422, "exceed the limit"),
        ("not a zip", dict(url="/v1/predict/lesions", content=b"PK\x03\x04nonsense", headers=npz), 422, "not an .npz"),
        ("multipart without file", dict(url="/v1/predict/lesions", files={"other": ("a", b"1")}), 422, "file: missing"),
        ("unsupported type", dict(url="/v1/predict/lesions", content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported content type"),
    ]  # fmt: skip
    for name, kwargs, status, match in cases:
        r = client.post(**kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert match in r.json()["error"], (name, r.json())
        _assert_healthy(client)
    # and the service still predicts correctly afterwards
    r = client.post("/v1/predict/lesions", content=_npz(patch=patch, radiomics=radiomics), headers=npz)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert json.loads(r.text)["model"]["name"] == "qsmrim-tiny"


def test_real_exported_qsmrimnet_graph_is_served(client, synth_root, tmp_path_factory):
    """Check the exporter's own graph of a real narrow QSMRim-Net ensemble (2 folds x 3 seeds trained one
    epoch, standardisation and NaN filling inside the graph) is served as a second app on the same Serve:
    both routes equal a bare onnxruntime run of that file."""
    from ray import serve
    from test_export_fixtures import tiny_run

    from serving.app import AppArgs, DeploymentArgs, build_app

    run = tiny_run(tmp_path_factory, synth_root)
    small = DeploymentArgs(num_cpus=0.1)
    args = AppArgs(model=str(run.onnx), max_upload_bytes=MAX_UPLOAD, max_image_bytes=MAX_IMAGE_BYTES,
                   ingress=small, preprocess=small, ensemble=small)  # fmt: skip
    serve.run(build_app(args), name="qsmrim-net", route_prefix="/net")
    try:
        r = client.get("/net/healthz")
        assert r.status_code == 200 and r.json()["model"]["uri"] == str(run.onnx), r.text
        patch, radiomics = run.inputs()
        patch, radiomics = patch[:12], np.where(np.isinf(radiomics), np.nan, radiomics)[:12]  # Inf is a 422
        r = client.post("/net/v1/predict/lesions", content=_npz(patch=patch, radiomics=radiomics),
                        headers={"content-type": "application/x-npz"})  # fmt: skip
        assert r.status_code == 200, r.text
        _assert_close(r.json()["predictions"], direct_run(run.onnx, patch, radiomics))
        r = client.post("/net/v1/predict", files=_multipart(synth_root, "001"))
        assert r.status_code == 200, r.text
        _, prepared = prepare_files(next(s for s in discover_cohort(synth_root).subjects if s.subject == "001"))
        _assert_close(r.json()["lesions"], direct_run(run.onnx, prepared.patch, prepared.radiomics))
    finally:
        serve.delete("qsmrim-net")
    _assert_healthy(client)


def test_int8_graph_is_served_when_asked(client, synth_root, tmp_path_factory, tmp_path):
    """Check that ``precision: int8`` with a local model.onnx serves model.int8.onnx beside it (issue 18):
    GET /v1/model reports int8, the provider and the export's parity figures, and predictions equal a bare
    onnxruntime run of the int8 file."""
    from ray import serve
    from test_export_fixtures import tiny_run

    from qsmrim.export.precision import PrecisionConfig, export_precision
    from qsmrim.model_sidecar import read_sidecar, sidecar_path_for
    from serving.app import AppArgs, DeploymentArgs, build_app

    run = tiny_run(tmp_path_factory, synth_root)
    fp32 = tmp_path / "model.onnx"
    shutil.copy(run.onnx, fp32)
    shutil.copy(sidecar_path_for(run.onnx), sidecar_path_for(fp32))
    patch, radiomics = run.inputs()
    int8 = export_precision(run.members, fp32, "int8", patch=patch, radiomics=radiomics,
                            keys=(run.data.subjects, run.data.lesions), config=PrecisionConfig(calibration_rows=32))  # fmt: skip
    small = DeploymentArgs(num_cpus=0.1)
    args = AppArgs(model=str(fp32), precision="int8", max_upload_bytes=MAX_UPLOAD, max_image_bytes=MAX_IMAGE_BYTES,
                   ingress=small, preprocess=small, ensemble=small)  # fmt: skip
    serve.run(build_app(args), name="qsmrim-int8", route_prefix="/int8")
    try:
        info = client.get("/int8/v1/model").json()
        assert info["uri"] == str(int8) and info["precision"] == "int8", info
        assert info["execution_provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
        assert info["parity"] == {"against": "fp32", **read_sidecar(sidecar_path_for(int8))["precision"]["parity"]}
        patch, radiomics = patch[:12], np.where(np.isinf(radiomics), np.nan, radiomics)[:12]  # Inf is a 422
        r = client.post("/int8/v1/predict/lesions", content=_npz(patch=patch, radiomics=radiomics),
                        headers={"content-type": "application/x-npz"})  # fmt: skip
        assert r.status_code == 200, r.text
        _assert_close(r.json()["predictions"], direct_run(int8, patch, radiomics))
    finally:
        serve.delete("qsmrim-int8")
    _assert_healthy(client)


def test_slow_uploads_are_shed_and_cut_off_while_healthz_answers(client):
    """Check 70 uploads sent at 1 byte/s (one Ingress replica, 32 request slots) leave ``/healthz`` answering
    within a second throughout: those beyond the in-flight cap get 503 at once, the rest 408 after the grace,
    and a client's ``x-request-timeout-seconds: 0`` changes nothing. Before: /healthz unanswered for 20 s."""
    host, port = client.base_url.host, client.base_url.port
    head = (b"POST /v1/predict/lesions HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npz\r\n"
            b"x-request-timeout-seconds: 0\r\nContent-Length: 1000\r\n\r\n")  # fmt: skip
    socks = []
    for _ in range(70):
        s = socket.create_connection((host, port), timeout=60)
        s.sendall(head)
        socks.append(s)
    t0 = time.monotonic()
    health = []
    while time.monotonic() - t0 < UPLOAD_GRACE_S + 2:
        for s in socks:
            with contextlib.suppress(OSError):
                s.send(b"\0")  # 1 byte per second each
        t = time.monotonic()
        r = client.get("/healthz", timeout=30)
        health.append((r.status_code, time.monotonic() - t))
        time.sleep(max(0.0, 1 - (time.monotonic() - t)))
    statuses = []
    for s in socks:
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        s.close()
        statuses.append(int(data.split(b" ", 2)[1]) if data else None)
    assert all(code == 200 for code, _ in health), health
    assert max(dt for _, dt in health) < 1.0, health
    assert statuses.count(408) == MAX_IN_FLIGHT, statuses
    assert statuses.count(503) == 70 - MAX_IN_FLIGHT, statuses
    _assert_healthy(client)


# -- hostile uploads: bounded memory, 4xx JSON naming the field --------------------------------------------


def _replica_pid(name: str) -> int:
    """The process of this module's ``name`` replica (Ray names it ``ray::ServeReplica:<app>:<name>``)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f"ServeReplica:qsmrim-test:{name}" in cmd:
            return proc.info["pid"]
    raise LookupError(f"no {name} replica process")


def _peak_rss_growth(pid: int, post) -> tuple[httpx.Response, int]:
    """Run ``post``; return its answer and how far the process's peak RSS (VmHWM) rose above its RSS before."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS

    def status(key: str) -> int:
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith(key))
        return int(line.split()[1]) * 1024

    before = status("VmRSS:")
    r = post()
    return r, status("VmHWM:") - before


def _gz(parts) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        for part in parts:
            if isinstance(part, tuple):
                for _ in range(part[1] // 2**23):
                    gz.write(part[0] * 2**23)
            else:
                gz.write(part)
    return buf.getvalue()


def _image(path: Path, data=None, header_edit=None, dtype=None) -> bytes:
    """The NIfTI at ``path`` (or ``data`` on its grid), gzipped, with optional raw header edits."""
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj) if data is None else data
    out = nib.Nifti1Image(arr, img.affine, dtype=dtype or arr.dtype)
    raw = bytearray(out.to_bytes())
    if header_edit is not None:
        hdr = nib.Nifti1Header(bytes(raw[:348]), check=False)
        header_edit(hdr)
        raw[:348] = hdr.binaryblock
    return gzip.compress(bytes(raw))


def _extension_bomb(path: Path, ext_bytes: int) -> bytes:
    img = nib.load(str(path))
    raw = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine).to_bytes()
    hdr = nib.Nifti1Header(raw[:348], check=False)
    hdr["vox_offset"] = 352 + ext_bytes
    return _gz([hdr.binaryblock, b"\x01\0\0\0", np.array([ext_bytes, 4], "<i4").tobytes(),
                (b"\0", ext_bytes - 8), b"\0" * 8, raw[352:]])  # fmt: skip


def _one_lesion(path: Path, value, dtype) -> bytes:
    lesions = np.asarray(nib.load(str(path)).dataobj)
    x, y, z = np.argwhere(lesions > 0)[0]
    data = np.zeros(lesions.shape, dtype)
    data[x, y, z] = value
    return _image(path, data)


def test_hostile_uploads_get_4xx_at_bounded_memory(client, synth_root):
    """Check each hostile upload gets its 4xx (or a correct 200) and raises the Preprocess replica's peak RSS
    by less than 150 MB; before this fix the extension bomb cost it +4.5 GB and the 1e8 label +5.3 GB."""
    files = _subject_files(synth_root, "001")
    flair = np.asarray(nib.load(str(files["flair"])).dataobj)
    bomb = _extension_bomb(files["qsm"], 512 * 2**20)
    assert len(bomb) < MAX_UPLOAD  # ~0.5 MiB upload claiming 512 MiB of extensions

    def rgb(h):
        h["datatype"] = 128

    def negative_dim(h):
        h["dim"][2] = -96

    def zero_sform(h):
        for k in ("srow_x", "srow_y", "srow_z"):
            h[k] = 0

    cases = {
        "extension bomb": ({"qsm": bomb}, 422, "exceed the limit of 1048576 bytes"),
        "float64 above the byte cap": ({"qsm": _image(files["qsm"], dtype=np.float64)}, 422,
                                       f"above the limit of {MAX_IMAGE_BYTES} bytes"),
        "complex QSM": ({"qsm": _image(files["qsm"], dtype=np.complex64)}, 422, "not a real number type"),
        "RGB24": ({"flair": _image(files["flair"], np.zeros((96, 96, 24), np.uint8), rgb)}, 422, "code 128"),
        "negative dimension": ({"flair": _image(files["flair"], header_edit=negative_dim)}, 422, "must be positive"),
        "all-zero affine": ({"qsm": _image(files["qsm"], header_edit=zero_sform)}, 422, "header sform affine"),
        "label 3e9": ({"lesions": _one_lesion(files["lesions"], 3e9, np.float32), "labels": b"index\trim\n"}, 422,
                       "above the largest supported index"),
        "fractional label": ({"lesions": _one_lesion(files["lesions"], 2.5, np.float32)}, 422, "found 2.5"),
        "FLAIR median 1e-38": ({"flair": _image(files["flair"], (flair * 1e-38).astype(np.float32))}, 422,
                               "FLAIR median over the brain"),
    }  # fmt: skip
    pid = _replica_pid("Preprocess")
    for name, (replace, status, match) in cases.items():
        with_labels = "labels" not in replace and "lesions" not in replace
        body = _multipart(synth_root, "001", with_labels=with_labels, **replace)
        r, grew = _peak_rss_growth(pid, lambda body=body: client.post("/v1/predict", files=body))
        assert r.status_code == status, (name, r.text)
        assert match in r.json()["error"], (name, r.json())
        assert grew < 150 * 2**20, (name, grew / 2**20)
        _assert_healthy(client)

    # one 1x1x1 lesion labelled 10^8: served, keeps its index, costs what label 1 costs
    huge = {"lesions": _one_lesion(files["lesions"], 10**8, np.int32)}
    body = _multipart(synth_root, "001", with_labels=False, **huge)
    r, grew = _peak_rss_growth(pid, lambda: client.post("/v1/predict", files=body))
    assert r.status_code == 200, r.text
    assert [les["index"] for les in r.json()["lesions"]] == [10**8]
    assert r.json()["lesions"][0]["prob"] is not None
    assert grew < 150 * 2**20, grew / 2**20


def test_labels_tsv_with_bom_is_served_and_bad_rows_get_a_bounded_answer(client, synth_root):
    """Check a BOM-prefixed labels TSV gives the same answer as without, and 100k bad rows a small 422."""
    files = _subject_files(synth_root, "001")
    plain = client.post("/v1/predict", files=_multipart(synth_root, "001"))
    bom = client.post("/v1/predict", files=_multipart(
        synth_root, "001", labels=b"\xef\xbb\xbf" + files["labels"].read_bytes()))  # fmt: skip
    assert plain.status_code == bom.status_code == 200, bom.text
    assert bom.json()["lesions"] == plain.json()["lesions"]
    bad = b"index\trim\n" + b"x\t7\n" * 100_000
    r = client.post("/v1/predict", files=_multipart(synth_root, "001", labels=bad))
    assert r.status_code == 422
    problems = r.json()["problems"]
    assert len(r.content) < 20_000 and len(problems) <= 101
    assert len(set(problems)) == len(problems)
    assert "99950 more bad row(s)" in r.text
    _assert_healthy(client)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"patch": ' + b"9" * 5000 + b', "radiomics": []}', "not valid JSON"),
        (b'{"patch": 1' + b"0" * 400 + b', "radiomics": [1]}', "not a rectangular array of numbers"),
        (json.dumps({"patch": np.zeros((1, 2, 16, 32, 32)).tolist(), "radiomics": [[0.0] * 527]})
         .replace("0.0", "1e400", 1).encode(), "patch: infinite values"),
    ],
    ids=["deep nesting", "5000-digit integer", "10^400 integer", "1e400 float"],
)
def test_hostile_json_gets_json_422(client, body, match):
    """Check JSON bodies that break Python's parser (depth, digit limits, overflow) answer 4xx JSON."""
    r = client.post("/v1/predict/lesions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    assert match in r.json()["error"]
    _assert_healthy(client)


def test_finite_but_absurd_inputs_never_answer_null(client, arrays):
    """Check finite 3e38 arrays either give finite probabilities or a 422 naming the rows, never prob null."""
    patch = np.full((2, 2, 16, 32, 32), 3e38, np.float32)
    radiomics = np.full((2, 527), 3e38, np.float32)
    radiomics[0] = -3e38
    r = client.post("/v1/predict/lesions", content=_npz(patch=patch, radiomics=radiomics),
                    headers={"content-type": "application/x-npz"})  # fmt: skip
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        assert all(p["prob"] is not None for p in r.json()["predictions"])
    else:
        assert "row" in r.json()["error"] and "not finite" in r.json()["error"]
    _assert_healthy(client)


# -- QSM input QC (issue 15) ------------------------------------------------------------------------------


def _qc_uploads(root: Path) -> dict[str, dict]:
    """Subject 001 with its QSM in ppb, and with a block of NaN inside the brain (non-finite voxels)."""
    from test_data_qc import _interior_block

    paths = _subject_files(root, "001")
    vol = load_subject(next(s for s in discover_cohort(root).subjects if s.subject == "001"))
    assert np.array_equal(np.asarray(nib.load(str(paths["qsm"])).dataobj), vol.qsm)  # stored RAS: same axes
    side = int(np.ceil((0.03 * int((vol.qsm != 0).sum()) / 4) ** 0.5))
    block = _interior_block(vol, (side, side, 4))

    def holes(data: np.ndarray) -> np.ndarray:
        data[block] = np.nan
        return data

    return {
        "qc_units": _multipart(root, "001", qsm=_edited(paths["qsm"], lambda d: d * np.float32(1000))),
        "qc_brain_holes": _multipart(root, "001", qsm=_edited(paths["qsm"], holes)),
    }


def test_qc_flags_under_warn_and_422_under_strict(client, synth_root, tiny_model):
    """Check a ppb QSM and a QSM with NaN holes are answered with their one qc_* flag and its value under warn,
    and refused 422 naming the check, its value and the setting by an app with qc: strict."""
    from ray import serve

    from serving.app import AppArgs, DeploymentArgs, build_app

    uploads = _qc_uploads(synth_root)
    for check, files in uploads.items():
        r = client.post("/v1/predict", files=files)
        assert r.status_code == 200, r.text
        qc = r.json()["qc"]
        assert qc["flags"] == [check] and qc["passed"] is False and qc[check]["flag"] is True
    r = client.post("/v1/predict", files=uploads["qc_units"])
    assert 100 < r.json()["qc"]["qc_units"]["value"] < 300 and "ppb" in r.json()["qc"]["qc_units"]["guess"]
    r = client.post("/v1/predict", files=uploads["qc_brain_holes"])
    assert 0.02 < r.json()["qc"]["qc_brain_holes"]["value"] < 0.05
    _assert_healthy(client)

    strict = AppArgs(model=str(tiny_model), qc="strict", max_upload_bytes=MAX_UPLOAD,
                     max_image_bytes=MAX_IMAGE_BYTES, ingress=DeploymentArgs(num_cpus=0.05),
                     preprocess=DeploymentArgs(num_cpus=0.05), ensemble=DeploymentArgs(num_cpus=0.05))  # fmt: skip
    serve.run(build_app(strict), name="qsmrim-strict", route_prefix="/strict")
    try:
        for check, files in uploads.items():
            r = client.post("/strict/v1/predict", files=files)
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error.startswith(f"qsm (qsm.nii.gz): {check} = ") and "(limit " in error, error
            assert "refused by qc: strict (serve config)" in error
        r = client.post("/strict/v1/predict", files=_multipart(synth_root, "001"))
        assert r.status_code == 200, r.text
        assert r.json()["qc"]["policy"] == "strict" and r.json()["qc"]["flags"] == []
        assert r.json()["thresholds"]["screening"]["source"] == "rim-call"  # this app sets no threshold
        assert [g["review"] for g in r.json()["lesions"]] == [g["rim"] for g in r.json()["lesions"]]
    finally:
        serve.delete("qsmrim-strict")
    _assert_healthy(client)
