"""Serving building blocks without Ray: model loading and its contract checks, lesion-array decoding, uploads.

Also home of :func:`build_tiny_ensemble`, the small *real* ONNX ensemble (torch export, dynamic batch,
standardisation and NaN filling inside the graph) that every serving test uses in place of the exporter's.
"""

from __future__ import annotations

import gzip
import io
import json
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qsmrim.data import InputError, discover_cohort
from qsmrim.radiomics import FEATURE_NAMES, N_FEATURES
from serving.lesion_arrays import check_lesion_arrays, parse_json_arrays, parse_npz_arrays
from serving.model import ModelError, RimModel
from serving.preprocess import PreparedSubject, PrepareLimits, SubjectUpload, prepare_files, prepare_upload

PATCH_SHAPE = (2, 16, 32, 32)
OUTPUTS = ("prob", "votes", "rim", "spread")


class _TinyEnsemble(torch.nn.Module):
    """``members`` logistic members over patch channel means and standardised radiomics (DESIGN §5 outputs)."""

    def __init__(self, median, mean, scale, patch_mean, patch_scale, members: int, seed: int, spread: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("median", torch.as_tensor(median, dtype=torch.float32))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.register_buffer("patch_mean", torch.as_tensor(patch_mean, dtype=torch.float32))
        self.register_buffer("patch_scale", torch.as_tensor(patch_scale, dtype=torch.float32))
        self.register_buffer("w_patch", torch.randn(members, 2, generator=gen))
        self.register_buffer("w_rad", torch.randn(members, len(median), generator=gen) / len(median) ** 0.5)
        self.register_buffer("threshold", torch.full((members,), 0.5))
        self.spread = spread

    def member_probs(self, patch: torch.Tensor, radiomics: torch.Tensor) -> torch.Tensor:
        r = torch.where(torch.isnan(radiomics), self.median, radiomics)
        r = torch.clamp((r - self.mean) / self.scale, -5.0, 5.0)
        p = (patch.mean(dim=(2, 3, 4)) - self.patch_mean) / self.patch_scale
        return torch.sigmoid(p @ self.w_patch.T + r @ self.w_rad.T)

    def forward(self, patch: torch.Tensor, radiomics: torch.Tensor):
        probs = self.member_probs(patch, radiomics)
        prob = probs.mean(dim=1)
        votes = (probs >= self.threshold).to(torch.int64).sum(dim=1)
        rim = votes * 2 > probs.shape[1]
        if not self.spread:
            return prob, votes, rim
        return prob, votes, rim, ((probs - prob[:, None]) ** 2).mean(dim=1).sqrt()


def cohort_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Patches and raw radiomics of every lesion of a cohort, through the serving preprocessing."""
    prepared = [prepare_files(files)[1] for files in discover_cohort(root).subjects]
    return np.concatenate([p.patch for p in prepared]), np.concatenate([p.radiomics for p in prepared])


def build_tiny_ensemble(
    path: Path,
    patch: np.ndarray,
    radiomics: np.ndarray,
    *,
    members: int = 5,
    seed: int = 0,
    spread: bool = True,
    sidecar: dict | None = None,
) -> Path:
    """Export a tiny ensemble standardised on ``patch``/``radiomics`` whose votes split those lesions.

    Per-member thresholds are the members' median probabilities on the given lesions, so ``rim`` is neither
    all true nor all false. Writes ``model.json`` beside the graph unless ``sidecar`` is ``{}``.
    """
    with np.errstate(all="ignore"):
        median = np.nan_to_num(np.nanmedian(radiomics, axis=0), nan=0.0)
        mean = np.nan_to_num(np.nanmean(radiomics, axis=0), nan=0.0)
        scale = np.nan_to_num(np.nanstd(radiomics, axis=0), nan=1.0)
    scale[~(scale > 0)] = 1.0
    pm = patch.mean(axis=(2, 3, 4))
    net = _TinyEnsemble(median, mean, scale, pm.mean(0), pm.std(0) + 1e-6, members, seed, spread).eval()
    with torch.no_grad():
        probs = net.member_probs(torch.from_numpy(patch), torch.from_numpy(radiomics))
        net.threshold.copy_(probs.median(dim=0).values)
    outputs = list(OUTPUTS if spread else OUTPUTS[:3])
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, *PATCH_SHAPE), torch.zeros(2, N_FEATURES))
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # the legacy exporter is the one with dynamic_axes
        torch.onnx.export(
            net, example, str(path), input_names=["patch", "radiomics"], output_names=outputs,
            dynamic_axes={k: {0: "N"} for k in ["patch", "radiomics", *outputs]}, opset_version=17, dynamo=False,
        )  # fmt: skip
    meta = {
        "name": "qsmrim-tiny",
        "version": "7",
        "feature_names": list(FEATURE_NAMES),
        "members": [f"member-fold={m}-seed=0" for m in range(members)],
        "patch_spec": {"size": [16, 32, 32], "channels": ["qsm_ppm", "flair_over_brain_median"]},
        "thresholds": net.threshold.tolist(),
        "git_commit": "0123abc",
        "unknown_future_key": {"ignored": True},
    }
    if sidecar != {}:
        (path.parent / "model.json").write_text(json.dumps({**meta, **(sidecar or {})}))
    return path


def direct_run(path: Path, patch: np.ndarray, radiomics: np.ndarray) -> dict[str, np.ndarray]:
    """The reference: a bare onnxruntime CPU session on the same inputs."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"patch": patch, "radiomics": radiomics}), strict=True))


# -- fixtures ---------------------------------------------------------------------------------------------



def _upload(root: Path, sub: str = "001", **changes) -> SubjectUpload:
    anat, der = root / f"sub-{sub}" / "anat", root / "derivatives" / "lesions" / f"sub-{sub}" / "anat"
    parts = {
        "qsm": (anat / f"sub-{sub}_Chimap.nii.gz").read_bytes(),
        "flair": (anat / f"sub-{sub}_FLAIR.nii.gz").read_bytes(),
        "lesions": (der / f"sub-{sub}_desc-lesions_dseg.nii.gz").read_bytes(),
        "labels": (der / f"sub-{sub}_desc-lesions_dseg.tsv").read_bytes(),
    }
    return SubjectUpload(**{**parts, **changes})


# -- model ------------------------------------------------------------------------------------------------


def test_local_model_loads_with_sidecar_and_matches_bare_session(tiny_model, arrays):
    """Check RimModel reports the sidecar's identity and gives the bare session's outputs, chunked or not."""
    model = RimModel.load(tiny_model, providers="cpu")
    info = model.info
    assert (info.name, info.version, info.members, info.provider) == (
        "qsmrim-tiny",
        "7",
        5,
        "CPUExecutionProvider",
    )
    assert info.patch_size == (16, 32, 32) and info.feature_names == FEATURE_NAMES and info.has_spread
    assert info.as_dict()["git_commit"] == "0123abc"
    patch, radiomics = arrays
    ref = direct_run(tiny_model, patch, radiomics)
    for chunk in (256, 7):
        got = model.run(patch, radiomics, chunk=chunk)
        np.testing.assert_allclose(got["prob"], ref["prob"], atol=1e-6)
        np.testing.assert_allclose(got["spread"], ref["spread"], atol=1e-6)
        np.testing.assert_array_equal(got["votes"], ref["votes"])
        np.testing.assert_array_equal(got["rim"], ref["rim"])
    assert 0 < ref["rim"].sum() < len(ref["rim"])  # the tiny model really separates lesions
    assert np.isnan(radiomics).any()  # and NaN radiomics went through the graph's median fill
    assert np.isfinite(ref["prob"]).all()


def test_auto_provider_is_reported(tiny_model):
    """Check 'auto' asks for CUDA only when onnxruntime has it and reports the provider actually used."""
    model = RimModel.load(tiny_model)
    assert model.info.provider in ort.get_available_providers()
    assert model.info.provider == model.session.get_providers()[0]


def test_model_without_spread_or_sidecar(tmp_path, arrays):
    """Check a graph without a spread output still serves (spread NaN) and a missing sidecar is tolerated."""
    path = build_tiny_ensemble(tmp_path / "plain.onnx", *arrays, spread=False, sidecar={})
    model = RimModel.load(path, providers="cpu")
    assert model.info.name == "plain" and model.info.version is None and not model.info.has_spread
    assert np.isnan(model.run(arrays[0][:3], arrays[1][:3])["spread"]).all()


@pytest.mark.parametrize(
    "sidecar, match",
    [
        ({"feature_names": list(reversed(FEATURE_NAMES))}, "feature_names differ"),
        ({"patch_spec": {"size": [8, 32, 32]}}, "patch size"),
    ],
)
def test_model_contract_mismatch_is_refused(tmp_path, arrays, sidecar, match):
    """Check a model whose sidecar disagrees with qsmrim's feature order or patch size is refused at load."""
    path = build_tiny_ensemble(tmp_path / "m.onnx", arrays[0][:4], arrays[1][:4], sidecar=sidecar)
    with pytest.raises(ModelError, match=match):
        RimModel.load(path, providers="cpu")


def test_bad_model_paths(tmp_path):
    """Check missing files, non-ONNX files and malformed registry URIs give ModelError naming them."""
    with pytest.raises(ModelError, match="no such model file"):
        RimModel.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelError, match="cannot load"):
        RimModel.load(tmp_path / "junk.onnx", providers="cpu")
    with pytest.raises(ModelError, match="expected models:/"):
        RimModel.load("models:/a/b/c")


# -- lesion arrays ----------------------------------------------------------------------------------------

_SHAPES = {"patch": PATCH_SHAPE, "radiomics": (N_FEATURES,)}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_npz_and_json_round_trip():
    """Check both encodings decode to the same float32 arrays; one lesion may omit the batch axis."""
    rng = np.random.default_rng(0)
    patch = rng.normal(size=(3, *PATCH_SHAPE)).astype(np.float32)
    rad = rng.normal(size=(3, N_FEATURES)).astype(np.float32)
    rad[1, 4] = np.nan
    p, r = check_lesion_arrays(
        *parse_npz_arrays(_npz(patch=patch, radiomics=rad), _SHAPES, 10), PATCH_SHAPE, N_FEATURES, 10
    )
    np.testing.assert_array_equal(p, patch)
    np.testing.assert_array_equal(r, rad)
    body = json.dumps(
        {
            "patch": patch.tolist(),
            "radiomics": [[None if np.isnan(v) else float(v) for v in row] for row in rad],
        }
    )
    p2, r2 = check_lesion_arrays(*parse_json_arrays(body.encode()), PATCH_SHAPE, N_FEATURES, 10)
    np.testing.assert_array_equal(p2, patch)
    np.testing.assert_array_equal(r2, rad)
    p3, _ = check_lesion_arrays(patch[0], rad[0], PATCH_SHAPE, N_FEATURES, 10)
    assert p3.shape == (1, *PATCH_SHAPE)


_P = np.zeros((1, *PATCH_SHAPE), np.float32)
_R = np.zeros((1, N_FEATURES), np.float32)


@pytest.mark.parametrize(
    "patch, radiomics, match",
    [
        (_P[:, :1], _R, r"patch: shape \[1, 1, 16, 32, 32\]"),
        (_P, _R[:, :5], r"radiomics: shape \[1, 5\]"),
        (_P, np.zeros((2, N_FEATURES)), "radiomics: 2 row"),
        (_P.astype(complex), _R, "patch: dtype complex128"),
        (_P.astype(bool), _R, "patch: dtype bool"),
        (np.full_like(_P, np.nan), _R, "patch: NaN"),
        (_P, np.full_like(_R, np.inf), "radiomics: infinite"),
        (_P, np.full(_R.shape, 1e300), "radiomics: infinite"),
        (np.repeat(_P, 11, 0), np.repeat(_R, 11, 0), "11 lesions exceed the limit of 10"),
        (_P[:0], _R[:0], "no lesions"),
    ],
)
def test_bad_lesion_arrays(patch, radiomics, match):
    """Check every malformed array is an InputError naming the field."""
    with pytest.raises(InputError, match=match):
        check_lesion_arrays(patch, radiomics, PATCH_SHAPE, N_FEATURES, 10)


def test_npz_refuses_pickle_and_lying_headers():
    """Check object arrays, absurd declared shapes, truncation and non-zip bodies are refused before loading."""
    obj = np.empty(1, dtype=object)
    with pytest.raises(InputError, match="object arrays are refused"):
        parse_npz_arrays(_npz(patch=obj, radiomics=_R), _SHAPES, 10)
    with pytest.raises(InputError, match="radiomics: missing array"):
        parse_npz_arrays(_npz(patch=_P), _SHAPES, 10)
    with pytest.raises(InputError, match="not an .npz"):
        parse_npz_arrays(b"PK\x03\x04garbage", _SHAPES, 10)
    # a header claiming 10**9 lesions with almost no data must not allocate anything
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 527)}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("patch.npy", _npy_bytes(_P))
        zf.writestr("radiomics.npy", header.getvalue())
    with pytest.raises(InputError, match="1000000000 lesions exceed"):
        parse_npz_arrays(buf.getvalue(), _SHAPES, 10)
    with pytest.raises(InputError, match="truncated"):
        parse_npz_arrays(_truncated_npz(), _SHAPES, 10)
    with pytest.raises(InputError, match="body: not valid JSON"):
        parse_json_arrays(b"{")
    with pytest.raises(InputError, match="radiomics: missing field"):
        parse_json_arrays(b'{"patch": []}')
    with pytest.raises(InputError, match="patch: not a rectangular array"):
        parse_json_arrays(b'{"patch": [[1], [1, 2]], "radiomics": []}')


def test_npz_with_a_million_entries_is_refused_before_parsing():
    """Check a ZIP64 archive of 10^6 entries is refused from its end record, before zipfile reads the directory
    (parsing it took 11 s on the 2-core box; the ingress event loop used to block 3-4 s)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", allowZip64=True) as zf:
        zf.writestr("patch.npy", _npy_bytes(_P))
        zf.writestr("radiomics.npy", _npy_bytes(_R))
        for i in range(10**6):
            zf.writestr(str(i), b"")
    body = buf.getvalue()
    assert b"PK\x06\x06" in body[-200:]  # a ZIP64 end record: 10^6 entries do not fit 16 bits
    t = time.perf_counter()
    with pytest.raises(InputError, match="body: archive declares 1000002 entries"):
        parse_npz_arrays(body, _SHAPES, 10)
    assert time.perf_counter() - t < 0.05
    assert parse_npz_arrays(_npz(patch=_P, radiomics=_R), _SHAPES, 10)[0].shape == _P.shape


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _truncated_npz() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("patch.npy", _npy_bytes(_P)[:-100])
        zf.writestr("radiomics.npy", _npy_bytes(_R))
    return buf.getvalue()


# -- uploads ----------------------------------------------------------------------------------------------


def test_upload_matches_files(synth_root):
    """Check an upload prepares exactly like the files on disk (same library path), labels included."""
    files = discover_cohort(synth_root).subjects[0]
    _, ref = prepare_files(files)
    got = prepare_upload(_upload(synth_root))
    assert isinstance(got, PreparedSubject) and got.has_labels
    assert [les["index"] for les in got.lesions] == [les["index"] for les in ref.lesions]
    np.testing.assert_array_equal(got.patch, ref.patch)
    np.testing.assert_array_equal(got.radiomics, ref.radiomics)


def _nifti(data: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    import nibabel as nib

    return gzip.compress(nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_bytes())


def test_bad_uploads_name_the_field(synth_root):
    """Check corrupt, truncated, mismatched, empty and oversize uploads are InputErrors naming the field."""
    good = _upload(synth_root)
    cases = {
        "qsm: unreadable": {"qsm": b"\x1f\x8b" + b"0" * 100},
        "flair: unreadable or truncated": {"flair": good.flair[: len(good.flair) // 2]},
        "lesions: empty lesion map": {
            "lesions": _nifti(np.zeros((96, 96, 24), np.int16), _affine(synth_root))
        },
        "flair: shape": {"flair": _nifti(np.ones((8, 8, 8), np.float32))},
        "labels: label TSV needs": {"labels": b"foo\tbar\n"},
        "lesions_kind": {"lesions_kind": "blob"},
        "qsm: empty file": {"qsm": b""},
    }
    for match, change in cases.items():
        with pytest.raises(InputError, match=match) as info:
            prepare_upload(SubjectUpload(**{**good.__dict__, **change}))
        assert "qsmrim-upload" not in str(info.value)  # no temp paths leak to clients
    with pytest.raises(InputError, match="above the limit of 1000"):
        prepare_upload(good, limits=PrepareLimits(max_voxels=1000))


def _affine(root: Path) -> np.ndarray:
    import nibabel as nib

    return nib.load(str(root / "sub-001" / "anat" / "sub-001_Chimap.nii.gz")).affine


def test_mask_upload_and_lesion_cap(synth_root):
    """Check a binary mask upload gets 26-connected instances, and a map over the lesion cap is refused early."""
    import nibabel as nib

    from qsmrim.data.cohort import instances_from_mask

    good = _upload(synth_root)
    img = nib.load(str(synth_root / "derivatives/lesions/sub-001/anat/sub-001_desc-lesions_dseg.nii.gz"))
    binary = (np.asarray(img.dataobj) > 0).astype(np.uint8)
    mask = gzip.compress(nib.Nifti1Image(binary, img.affine).to_bytes())
    got = prepare_upload(SubjectUpload(good.qsm, good.flair, mask, lesions_kind="mask"))
    n = int(
        instances_from_mask(nib.as_closest_canonical(nib.Nifti1Image(binary, img.affine)).get_fdata()).max()
    )
    assert [les["index"] for les in got.lesions] == list(range(1, n + 1)) and not got.has_labels
    with pytest.raises(InputError, match="lesions exceed the limit of 3"):
        prepare_upload(good, limits=PrepareLimits(max_lesions=3))


def test_registry_answer_is_flattened(tiny_model):
    """Check the registry loader's (session, provider, meta) answer yields the sidecar's and version's facts."""
    from serving.model import _coerce_registry_result, _describe

    session = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    sidecar = json.loads((tiny_model.parent / "model.json").read_text())
    sidecar.pop("name"), sidecar.pop("version")
    meta = {"uri": "models:/qsmrim@champion", "name": "qsmrim", "version": 3, "alias": "champion",
            "tags": {"git_commit": "feedbeef", "n_members": "5"}, "sidecar": sidecar}  # fmt: skip
    session, flat = _coerce_registry_result((session, "CPUExecutionProvider", meta))
    info = _describe(session, flat, "models:/qsmrim@champion")
    assert (info.name, info.version, info.alias, info.members) == ("qsmrim", "3", "champion", 5)
    assert info.as_dict()["git_commit"] == "0123abc"  # the sidecar's, over the tag
    bad = {**meta, "sidecar": {**sidecar, "feature_names": sidecar["feature_names"][::-1]}}
    with pytest.raises(ModelError, match="feature_names differ"):
        _describe(*_coerce_registry_result((session, "CPUExecutionProvider", bad)), "models:/qsmrim@champion")
