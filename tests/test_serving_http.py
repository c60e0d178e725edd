"""The Ray Serve app over real HTTP on 127.0.0.1: answers equal a bare onnxruntime run, bad input gets 4xx.

One local Ray and one Serve application for the whole module (fractional CPUs: Ray deadlocks on 2 cores
otherwise). After every bad request ``/healthz`` must still answer 200: nothing a client sends may take a
replica down.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from test_serving_model import build_tiny_ensemble, cohort_arrays, direct_run

from qsmrim.data import discover_cohort
from qsmrim.data.lesions import lesion_rows
from qsmrim.radiomics import FEATURE_NAMES
from serving.preprocess import prepare_files

pytestmark = pytest.mark.slow

MAX_UPLOAD = 3 * 2**20
MAX_JSON = 2**20
MAX_ROWS = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def arrays(synth_root) -> tuple[np.ndarray, np.ndarray]:
    """Patches and raw radiomics of every lesion of the synthetic cohort."""
    return cohort_arrays(synth_root)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, arrays) -> Path:
    return build_tiny_ensemble(tmp_path_factory.mktemp("served") / "model.onnx", *arrays)


@pytest.fixture(scope="module")
def client(model_path):
    """A started app (test-sized caps, 50 ms batch window) and an httpx client bound to it."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from serving.app import AppArgs, BatchConfig, DeploymentArgs, build_app

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    port = _free_port()
    args = AppArgs(
        model=str(model_path),
        max_upload_bytes=MAX_UPLOAD,
        max_json_bytes=MAX_JSON,
        max_lesions_per_request=MAX_ROWS,
        batching=BatchConfig(max_batch_size=8, batch_wait_timeout_s=0.05),
        ingress=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=32),
        preprocess=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=2),
        ensemble=DeploymentArgs(num_cpus=0.1, max_ongoing_requests=32),
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
    assert info["feature_names"] == list(FEATURE_NAMES)
    assert info["patch_shape"] == [2, 16, 32, 32]
    assert info["batching"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}  # reconfigure applied
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/lesions", "/healthz", "/v1/model"} <= set(paths)
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("sub, labels", [("001", True), ("002", False)])
def test_predict_subject_matches_direct_session(client, synth_root, model_path, sub, labels):
    """Check /v1/predict returns every lesion's geometry and the bare session's outputs on the same inputs."""
    r = client.post("/v1/predict", files=_multipart(synth_root, sub, with_labels=labels))
    assert r.status_code == 200, r.text
    body = r.json()
    files = next(s for s in discover_cohort(synth_root).subjects if s.subject == sub)
    vol, prepared = prepare_files(files)
    ref = direct_run(model_path, prepared.patch, prepared.radiomics)
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
    assert body["model"] == {"name": "qsmrim-tiny", "version": "7", "alias": None, "uri": str(model_path)}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _json_rows(patch: np.ndarray, radiomics: np.ndarray) -> dict:
    rad = [[None if np.isnan(v) else float(v) for v in row] for row in radiomics]
    return {"patch": patch.tolist(), "radiomics": rad}


def test_predict_lesions_json_npz_multipart(client, arrays, model_path):
    """Check the three encodings of /v1/predict/lesions give the bare session's answer (NaN radiomics included)."""
    patch, radiomics = arrays[0][:40], arrays[1][:40]
    nan_rows = np.flatnonzero(np.isnan(radiomics).any(axis=1))
    take = np.unique(np.r_[nan_rows[:2], np.arange(4)])
    patch, radiomics = patch[take], radiomics[take]
    assert np.isnan(radiomics).any()
    ref = direct_run(model_path, patch, radiomics)

    r = client.post("/v1/predict/lesions", json=_json_rows(patch, radiomics))
    assert r.status_code == 200, r.text
    _assert_close(r.json()["predictions"], ref)
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


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(client, arrays, model_path):
    """Check 16 concurrent requests of different sizes share onnxruntime calls yet each gets exactly its rows."""
    patch, radiomics = arrays[0][:60], arrays[1][:60]
    ref = direct_run(model_path, patch, radiomics)
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
        ("oversize streamed", dict(url="/v1/predict/lesions", content=stream(), headers=npz), 413, "too large"),
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
