"""Hostile NIfTI files and lesion maps: refused with a message naming the file and field, at bounded memory.

Each file is built for real in a temp dir (gzip bombs included) and read through the same functions that
serving and training use. Memory claims are measured with ``tracemalloc`` (numpy and bytearray
allocations are traced), not assumed.
"""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmrim.data import InputError, discover_cohort, extract_patches, load_subject
from qsmrim.data.cohort import MAX_LESION_INDEX, compact_instances
from qsmrim.data.lesions import lesion_rows
from qsmrim.data.nifti_io import NiftiLimits, read_canonical, read_header

MiB = 2**20


def _header_bytes(img: nib.Nifti1Image) -> bytes:
    return img.to_bytes()[:348]


def _write_gz(path: Path, parts) -> Path:
    """Gzip ``parts`` (bytes, or ``(byte, count)`` runs written 8 MiB at a time) to ``path``."""
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1) as gz:
        for part in parts:
            if isinstance(part, tuple):
                byte, count = part
                chunk = byte * (8 * MiB)
                while count > 0:
                    gz.write(chunk[: min(count, len(chunk))])
                    count -= len(chunk)
            else:
                gz.write(part)
    return path


def _peak_bytes(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        try:
            result: object = fn()
        except InputError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _small_image(dtype=np.float32, shape=(8, 8, 4)) -> nib.Nifti1Image:
    data = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    return nib.Nifti1Image(data, np.diag([0.75, 0.75, 3.0, 1.0]))


# -- gzip bombs ------------------------------------------------------------------------------------------


def test_read_canonical_refuses_extension_bomb_without_reading_it(tmp_path):
    """Check that 256 MiB of header extensions (a 256 KiB gzip) are refused from the header alone."""
    img = _small_image()
    hdr = img.header.copy()
    ext = 256 * MiB
    hdr["vox_offset"] = 352 + ext
    raw = img.to_bytes()
    path = _write_gz(
        tmp_path / "bomb.nii.gz",
        [hdr.binaryblock, b"\x01\0\0\0", np.array([ext, 4], "<i4").tobytes(), (b"\0", ext - 8), raw[352:]],
    )
    assert path.stat().st_size < 2 * MiB
    result, peak = _peak_bytes(lambda: read_canonical(path))
    assert isinstance(result, InputError)
    assert "header extensions of 268435456 bytes" in str(result) and str(path) in str(result)
    assert peak < 2 * MiB  # nibabel.load reads all 256 MiB of the extension here


def test_read_canonical_skips_small_extensions_with_lying_sizes(tmp_path):
    """Check that extensions under the cap are skipped unparsed, even when their esize field claims 2 GiB."""
    img = _small_image()
    hdr = img.header.copy()
    hdr["vox_offset"] = 352 + 4096
    raw = img.to_bytes()
    ext = np.array([2**31 - 16, 4], "<i4").tobytes() + b"\0" * (4096 - 8)
    path = _write_gz(tmp_path / "ext.nii.gz", [hdr.binaryblock, b"\x01\0\0\0", ext, raw[352:]])
    got = read_canonical(path)
    np.testing.assert_array_equal(got.data, np.asarray(img.dataobj))


def test_read_canonical_never_decompresses_trailing_bytes(tmp_path):
    """Check that a small image followed by 256 MiB of gzip-compressed zeros costs only the image."""
    img = _small_image()
    path = _write_gz(tmp_path / "trail.nii.gz", [img.to_bytes(), (b"\0", 256 * MiB)])
    result, peak = _peak_bytes(lambda: read_canonical(path))
    assert not isinstance(result, InputError)
    np.testing.assert_array_equal(result.data, np.asarray(img.dataobj))
    assert peak < 2 * MiB


def test_read_canonical_reads_the_header_declared_bytes_only(tmp_path):
    """Check that a header declaring 64 Mi voxels over a 1 KiB body is truncated, not a big allocation attempt."""
    img = _small_image()
    hdr = img.header.copy()
    hdr.set_data_shape((512, 512, 256))
    path = _write_gz(tmp_path / "liar.nii.gz", [hdr.binaryblock, b"\0\0\0\0", b"\0" * 1024])
    with pytest.raises(InputError, match="above the limit"):  # 256 MiB of float32 > a 128 MiB byte cap
        read_canonical(path, limits=NiftiLimits(max_bytes=128 * MiB))
    with pytest.raises(InputError, match="truncated NIfTI: 1024 of 268435456 data bytes"):
        read_canonical(path)


# -- header fields ---------------------------------------------------------------------------------------


def _with_header(tmp_path: Path, name: str, edit, dtype=np.float32) -> Path:
    img = _small_image(dtype)
    raw = bytearray(img.to_bytes())
    hdr = nib.Nifti1Header(bytes(raw[:348]), check=False)
    edit(hdr)
    raw[:348] = hdr.binaryblock
    return _write_gz(tmp_path / name, [bytes(raw)])


def _set_dim(hdr, value):
    hdr["dim"][2] = value


@pytest.mark.parametrize(
    "name, edit, dtype, match",
    [
        ("complex", None, np.complex64, r"datatype complex64 \(code 32\) is not a real number type"),
        ("rgb", lambda h: h.__setitem__("datatype", 128), np.uint8, r"code 128\) is not a real number type"),
        ("unknown", lambda h: h.__setitem__("datatype", 12345), np.float32, "datatype code 12345 is unknown"),
        ("negative dim", lambda h: _set_dim(h, -8), np.float32, r"dimension\(s\) must be positive, got \[\(2, -8\)\]"),
        ("zero dim", lambda h: _set_dim(h, 0), np.float32, "must be positive"),
        ("2-D", lambda h: h["dim"].__setitem__(0, 2), np.float32, "expected a 3-D image"),
        ("zero sform", lambda h: [h.__setitem__(k, 0) for k in ("srow_x", "srow_y", "srow_z")], np.float32,
         r"header sform affine .* is singular"),
        ("zero pixdim", lambda h: [h.__setitem__(k, 0) for k in ("sform_code", "qform_code")]
         + [h["pixdim"].__setitem__(i, 0) for i in (1, 2, 3)], np.float32, "header pixdim affine"),
        ("nan sform", lambda h: h.__setitem__("srow_x", [np.nan, 0, 0, 0]), np.float32, "not finite"),
        ("pair header", lambda h: h.__setitem__("magic", b"ni1"), np.float32, "not a single-file NIfTI"),
        ("vox_offset inside header", lambda h: h.__setitem__("vox_offset", 100), np.float32, "points inside the header"),
    ],
)  # fmt: skip
def test_read_canonical_refuses_bad_header_fields(tmp_path, name, edit, dtype, match):
    """Check that each malformed or unsupported header field is an InputError naming the file and the field."""
    path = _with_header(tmp_path, name.replace(" ", "_") + ".nii.gz", edit or (lambda h: None), dtype)
    with pytest.raises(InputError, match=match) as info:
        read_canonical(path)
    assert str(path) in str(info.value)


def test_byte_cap_refuses_float64_at_the_voxel_cap(tmp_path):
    """Check that voxels x dtype size is capped: float64 refused where the same float32 image passes."""
    limits = NiftiLimits(max_voxels=256, max_bytes=256 * 4)
    ok = tmp_path / "f32.nii"
    nib.save(_small_image(np.float32), ok)
    assert read_header(ok, limits).n_bytes == 1024
    big = tmp_path / "f64.nii"
    nib.save(_small_image(np.float64), big)
    with pytest.raises(InputError, match=r"as float64 is 2048 bytes, above the limit of 1024 bytes"):
        read_canonical(big, limits=limits)


def test_read_canonical_matches_nibabel_on_every_real_dtype(tmp_path):
    """Check values and RAS+ affine against nibabel for scaled, unscaled, big-endian and oblique images."""
    aff = np.array([[-1.2, 0, 0, 10], [0, 0, 1.5, -3], [0, 2, 0, 4], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    for dtype in ("<f4", ">f4", "<f8", "<i2", "<u1", ">i4"):
        img = nib.Nifti1Image((rng.normal(size=(7, 5, 4)) * 100).astype(dtype), aff)
        if dtype == "<i2":
            img.header.set_slope_inter(0.5, 3)
        path = tmp_path / f"x{dtype[1:]}{dtype[0] == '>'}.nii.gz"
        nib.save(img, path)
        ref = nib.as_closest_canonical(nib.load(path))
        got = read_canonical(path)
        np.testing.assert_array_equal(got.data, np.asarray(ref.dataobj, dtype=np.float32))
        np.testing.assert_allclose(got.affine, ref.affine)


# -- lesion label values ---------------------------------------------------------------------------------


def _subject_with_lesions(tmp_path: Path, synth_root: Path, lesions: np.ndarray, name="dseg") -> Path:
    root = tmp_path / "cohort"
    shutil.copytree(synth_root, root)
    der = root / "derivatives" / "lesions" / "sub-001" / "anat"
    for p in der.glob("sub-001_desc-lesions_*"):
        p.unlink()
    qsm = nib.load(root / "sub-001" / "anat" / "sub-001_Chimap.nii.gz")
    img = nib.Nifti1Image(lesions, qsm.affine, dtype=lesions.dtype)
    nib.save(img, der / f"sub-001_desc-lesions_{name}.nii.gz")
    return root


def _one_lesion(shape, value, dtype) -> np.ndarray:
    data = np.zeros(shape, dtype=dtype)
    data[40:42, 40:42, 10:12] = value
    return data


def test_huge_lesion_label_costs_what_label_one_costs(tmp_path, synth_root):
    """Check that one 2x2x2 lesion labelled 10^8 keeps its index and costs < 64 MiB (not 100M-entry arrays)."""
    shape = nib.load(next(synth_root.glob("sub-001/anat/*_Chimap.nii.gz"))).shape
    root = _subject_with_lesions(tmp_path, synth_root, _one_lesion(shape, 10**8, np.int32))
    files = next(s for s in discover_cohort(root).subjects if s.subject == "001")

    def run():
        vol = load_subject(files)
        return vol, lesion_rows(vol), extract_patches(vol)

    (vol, rows, patch), peak = _peak_bytes(run)
    assert [r["lesion"] for r in rows] == [10**8] and rows[0]["n_voxels"] == 8
    assert (rows[0]["bbox_x0"], rows[0]["bbox_x1"]) == (40, 42)
    assert patch.shape == (1, 2, 16, 32, 32) and np.isfinite(patch).all()
    assert peak < 64 * MiB  # bincount/find_objects by label would allocate >= 800 MB


def test_lesion_labels_above_float32_precision_keep_their_value(tmp_path, synth_root):
    """Check that a lesion map is read as integers: 2^24 + 1 is not rounded to 2^24 as float32 would."""
    shape = nib.load(next(synth_root.glob("sub-001/anat/*_Chimap.nii.gz"))).shape
    data = _one_lesion(shape, 2**24 + 1, np.int32)
    data[10:12, 10:12, 5:7] = 2**24
    root = _subject_with_lesions(tmp_path, synth_root, data)
    files = next(s for s in discover_cohort(root).subjects if s.subject == "001")
    vol = load_subject(files)
    assert vol.lesion_indices == [2**24, 2**24 + 1]
    assert [r["n_voxels"] for r in lesion_rows(vol)] == [8, 8]
    # the radiomics planner reads the map without a label TSV the same way (it used to read float32)
    from qsmrim.radiomics import DEFAULT_SETTINGS
    from qsmrim.radiomics.tasks import plan_cohort

    plans, _, problems = plan_cohort([files], tmp_path / "features", DEFAULT_SETTINGS, 1, None)
    assert problems == [] and [sorted(i for c in p.chunks for i in c) for p in plans] == [[2**24, 2**24 + 1]]


@pytest.mark.parametrize(
    "value, dtype, match",
    [
        (2**31, np.int64, r"lesion index 2147483648 is above the largest supported index 2147483647"),
        (3e9, np.float64, "above the largest supported index"),
        (1.5, np.float32, "must hold non-negative integers .* found 1.5"),
        (-3, np.int16, "must hold non-negative integers .* found -3"),
        (np.nan, np.float32, "NaN or infinite"),
    ],
)
def test_lesion_values_that_are_not_indices_are_refused(tmp_path, synth_root, value, dtype, match):
    """Check that labels beyond int32, fractions, negatives and NaN get an InputError naming the lesion map."""
    shape = nib.load(next(synth_root.glob("sub-001/anat/*_Chimap.nii.gz"))).shape
    root = _subject_with_lesions(tmp_path, synth_root, _one_lesion(shape, value, dtype))
    files = next(s for s in discover_cohort(root).subjects if s.subject == "001")
    with pytest.raises(InputError, match=match) as info:
        load_subject(files)
    assert "desc-lesions_dseg" in str(info.value)
    assert MAX_LESION_INDEX == 2**31 - 1


@pytest.mark.parametrize("top", [5, 2**20, 2**30])
def test_compact_instances_round_trips(top):
    """Check that the compact map indexes back to the original one and is numbered 0..K."""
    inst = np.zeros((6, 5, 4), np.int32)
    inst[0, 0, 0], inst[1, 1, 1], inst[2, 2, 2:4] = 3, top, 4
    compact, indices = compact_instances(inst)
    assert indices.tolist() == sorted({0, 3, 4, top})
    np.testing.assert_array_equal(indices[compact], inst)
    assert compact.max() == len(indices) - 1


# -- FLAIR normalisation and labels TSV ------------------------------------------------------------------


def test_tiny_flair_median_is_refused(tmp_path, synth_root):
    """Check that a FLAIR scaled to 1e-38 (a denormal brain median) is refused, not turned into Inf patches."""
    root = tmp_path / "cohort"
    shutil.copytree(synth_root, root)
    path = root / "sub-001" / "anat" / "sub-001_FLAIR.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) * 1e-38).astype(np.float32), img.affine), path)
    vol = load_subject(next(s for s in discover_cohort(root).subjects if s.subject == "001"))
    with pytest.raises(InputError, match="FLAIR median over the brain is .*e-3[0-9]; must be finite and at least"):
        extract_patches(vol)


def test_labels_tsv_with_utf8_bom_is_accepted(tmp_path, synth_root):
    """Check that a label TSV saved with a UTF-8 BOM (as spreadsheets do) reads like one without."""
    root = tmp_path / "cohort"
    shutil.copytree(synth_root, root)
    tsv = root / "derivatives" / "lesions" / "sub-001" / "anat" / "sub-001_desc-lesions_dseg.tsv"
    before = load_subject(next(s for s in discover_cohort(root).subjects if s.subject == "001")).labels
    tsv.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes())
    after = load_subject(next(s for s in discover_cohort(root).subjects if s.subject == "001")).labels
    assert after == before


def test_many_bad_label_rows_give_a_bounded_problem_list(tmp_path, synth_root):
    """Check that 100,000 bad TSV rows give at most 51 problems (the last counts the rest), each once."""
    root = tmp_path / "cohort"
    shutil.copytree(synth_root, root)
    tsv = root / "derivatives" / "lesions" / "sub-001" / "anat" / "sub-001_desc-lesions_dseg.tsv"
    tsv.write_text("index\trim\n" + "x\t7\n" * 100_000)
    with pytest.raises(InputError) as info:
        load_subject(next(s for s in discover_cohort(root).subjects if s.subject == "001"))
    problems = info.value.problems
    assert len(problems) <= 52
    assert "... and 99950 more bad row(s)" in str(info.value)
    assert len(str(info.value)) < 20_000


# -- manifest subject ids become paths ------------------------------------------------------------------


def _manifest(tmp_path: Path, synth_root: Path, ids: list[str]) -> Path:
    s = discover_cohort(synth_root).subjects[0]
    rows = ["subject,qsm,flair,lesions"] + [f"{i},{s.qsm},{s.flair},{s.lesions}" for i in ids]
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("sid", ["../../../x", "a/b", "x y", "..", "01_ses-02", "ü1", "sub-a.b"])
def test_manifest_subject_ids_must_be_alphanumeric(tmp_path, synth_root, sid):
    """Check a manifest subject id that is not ``[A-Za-z0-9]+`` is refused naming the line and the id."""
    with pytest.raises(InputError, match=r"cohort\.csv:2: subject .* must be an alphanumeric label"):
        discover_cohort(_manifest(tmp_path, synth_root, [sid]))


def test_predict_never_writes_outside_its_output_folder(tmp_path, synth_root):
    """Check ``qsmrim predict`` on a manifest row ``../../../escaped`` lists it as a problem and writes
    nothing outside ``--out`` (before: it escaped the folder, then an uncaught OSError), the valid row still written."""
    from test_serving_model import build_tiny_ensemble

    from serving.predict import predict_dataset

    rng = np.random.default_rng(0)
    model = build_tiny_ensemble(tmp_path / "m" / "model.onnx", rng.normal(size=(8, 2, 16, 32, 32)).astype(np.float32),
                                rng.normal(size=(8, 527)).astype(np.float32))  # fmt: skip
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    manifest = _manifest(work, synth_root, ["001", "../../../escaped"])
    before = sorted(p for p in tmp_path.rglob("*"))
    result = predict_dataset(str(model), manifest, work / "out")
    assert [r.subject for r in result.subjects] == ["001"]
    assert any("../../../escaped" in str(p) and "alphanumeric" in str(p) for p in result.problems), result.problems
    new = [p for p in tmp_path.rglob("*") if p not in before]
    assert new and all(p.is_relative_to(work / "out") for p in new), [p for p in new if not p.is_relative_to(work / "out")]
