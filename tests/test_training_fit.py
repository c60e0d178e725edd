"""One-member fits (no Ray): real training on the synthetic cohort, save/load, resume, fold ensemble votes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from qsmrim.training import Member, Standardisation, TrainConfig, fit_member, make_splits
from qsmrim.training.ensemble import fold_ensemble_predictions

TINY = {"base_channels": 2}


def _cfg(**kw) -> TrainConfig:
    base = dict(model="image-channel", model_kwargs=TINY, epochs=2, batch_size=16, inner_val_fraction=0.0, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_fit_member_predicts_only_the_test_fold(dataset, tmp_path):
    """Check that a fit writes a loadable member whose predictions cover exactly the test subjects."""
    splits = make_splits(dataset.rim_counts(), n_folds=2, seed=0)
    fold = next(k for k, s in enumerate(splits) if dataset.labels[dataset.rows_of(s["train"])].max() == 1)
    member = fit_member(_cfg(), dataset, splits, fold, seed=0, out_dir=tmp_path / "m")
    preds = member.predictions
    assert set(preds["subject"]) == set(splits[fold]["test"])
    assert len(preds) == len(dataset.rows_of(splits[fold]["test"], labelled=False))
    assert preds["prob"].between(0, 1).all()
    assert len(member.history) == 2 and member.history[1]["lr"] < member.history[0]["lr"] * 1.0001
    loaded = Member.load(tmp_path / "m")
    rows = dataset.rows_of(splits[fold]["test"], labelled=False)
    np.testing.assert_allclose(loaded.predict_proba(dataset.patches[rows], None), preds["prob"].to_numpy(), atol=1e-6)
    assert not list((tmp_path / "m").glob("*.pkl"))


def test_fit_member_resumes_after_a_crash(dataset, tmp_path):
    """Check that a fit that crashes at epoch 2 resumes from its checkpoint to the same weights as a clean fit."""
    splits = make_splits(dataset.rim_counts(), n_folds=2, seed=0)
    fold = next(k for k, s in enumerate(splits) if dataset.labels[dataset.rows_of(s["train"])].max() == 1)
    cfg = _cfg(epochs=3)
    clean = fit_member(cfg, dataset, splits, fold, seed=1, out_dir=tmp_path / "clean")

    def crash(epoch, _row):
        if epoch == 2:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        fit_member(cfg, dataset, splits, fold, seed=1, out_dir=tmp_path / "crash", on_epoch=crash)
    assert not (tmp_path / "crash" / "member.json").exists()
    seen = []
    resumed = fit_member(cfg, dataset, splits, fold, seed=1, out_dir=tmp_path / "crash", on_epoch=lambda e, r: seen.append(e))
    assert seen == [3]  # the crash came after epoch 2 was checkpointed
    assert not (tmp_path / "crash" / "checkpoint.pt").exists()  # saved member: resume point removed
    assert [int(h["epoch"]) for h in resumed.history] == [1, 2, 3]
    for (k, a), b in zip(clean.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def test_radiomics_standardised_with_training_rows_only(dataset):
    """Check mean/scale/median come from the fitted rows only, NaN -> training median."""
    splits = make_splits(dataset.rim_counts(), n_folds=2, seed=0)
    fold = next(k for k, s in enumerate(splits) if dataset.labels[dataset.rows_of(s["train"])].max() == 1)
    rows = dataset.rows_of(splits[fold]["train"])
    x = dataset.radiomics[rows]
    std = Standardisation.fit(x)
    med = np.nanmedian(x, axis=0)
    np.testing.assert_allclose(std.median, med)
    filled = np.where(np.isnan(x), med, x)
    np.testing.assert_allclose(std.mean, filled.mean(0))
    np.testing.assert_allclose(std.scale, filled.std(0))
    z = std.transform(dataset.radiomics)
    assert np.isfinite(z).all()


def test_aprl_rf_fits_through_the_same_entry(dataset, tmp_path):
    """Check that APRL(RF) trains via fit_member, saves in skops (no pickle) and reloads with equal output."""
    splits = make_splits(dataset.rim_counts(), n_folds=2, seed=0)
    fold = next(k for k, s in enumerate(splits) if dataset.labels[dataset.rows_of(s["train"])].max() == 1)
    cfg = _cfg(model="aprl-rf", model_kwargs={"n_estimators": 20, "features": ["f0", "f1", "f2"], "k_neighbors": 1})
    member = fit_member(cfg, dataset, splits, fold, seed=0, out_dir=tmp_path / "rf")
    assert (tmp_path / "rf" / "model.skops").exists()
    rows = dataset.rows_of(splits[fold]["test"], labelled=False)
    loaded = Member.load(tmp_path / "rf")
    np.testing.assert_allclose(loaded.predict_proba(None, dataset.radiomics[rows]), member.predictions["prob"])


def test_skops_member_with_a_foreign_type_is_refused(dataset, tmp_path):
    """Check a model.skops that lists a type qsmrim never writes (here operator.attrgetter, a callable skops
    would rebuild) is refused with the file and the type named, and nothing from it is loaded."""
    import operator

    import skops.io as sio

    from qsmrim.training.member import SKOPS_TRUSTED_TYPES

    splits = make_splits(dataset.rim_counts(), n_folds=2, seed=0)
    fold = next(k for k, s in enumerate(splits) if dataset.labels[dataset.rows_of(s["train"])].max() == 1)
    cfg = _cfg(model="aprl-rf", model_kwargs={"n_estimators": 5, "features": ["f0", "f1"], "k_neighbors": 1})
    member = fit_member(cfg, dataset, splits, fold, seed=0, out_dir=tmp_path / "rf")
    path = tmp_path / "rf" / "model.skops"
    assert sorted(sio.get_untrusted_types(file=path)) == sorted(SKOPS_TRUSTED_TYPES)  # the allow-list is exact
    member.model.hook_ = operator.attrgetter("__class__")
    sio.dump(member.model, path)
    with pytest.raises(ValueError, match=r"model\.skops: refusing to load types qsmrim never writes: operator\.attrgetter"):
        Member.load(tmp_path / "rf")


def _member(fold, seed, probs, thr):
    preds = pd.DataFrame({"subject": ["a", "a", "b"], "lesion": [1, 2, 1], "fold": fold, "seed": seed,
                          "rim": [1, 0, 0], "prob": probs})  # fmt: skip
    return Member("image-channel", {}, fold, seed, {"paper": thr, "honest": 0.5}, None, (), predictions=preds)


def test_fold_ensemble_majority_vote():
    """Check mean probability, per-member thresholds and the 2-of-3 vote against a hand computation."""
    members = [_member(0, 0, [0.9, 0.2, 0.6], 0.5), _member(0, 1, [0.4, 0.3, 0.7], 0.35), _member(0, 2, [0.8, 0.1, 0.2], 0.9)]
    ens = fold_ensemble_predictions(members, "paper").set_index(["subject", "lesion"])
    np.testing.assert_allclose(ens.loc[("a", 1), "prob"], (0.9 + 0.4 + 0.8) / 3)
    # votes: lesion a1 -> (0.9>=.5, 0.4>=.35, 0.8>=.9) = 2 ; a2 -> (0, 0, 0) ; b1 -> (1, 1, 0) = 2
    assert ens["votes"].tolist() == [2, 0, 2]
    assert ens["rim_pred"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(ens.loc[("b", 1), "spread"], np.std([0.6, 0.7, 0.2]))
    honest = fold_ensemble_predictions(members, "honest")
    assert honest["votes"].tolist() == [2, 0, 2]


def test_member_standardisation_matches_the_radiomics_standardiser():
    """Check the member's JSON-able standardisation against the scikit-learn one of qsmrim.radiomics.

    The formula lives twice on purpose: the member's copy needs only numpy (the GPU training image has no
    pywavelets, which qsmrim.radiomics imports); this test keeps the two from drifting apart.
    """
    from qsmrim.radiomics import RadiomicsStandardiser

    x = np.random.default_rng(0).normal(size=(30, 6)) * [1, 10, 0.1, 1, 1, 5]
    x[0, 0], x[:, 3], x[:, 4], x[5, 5] = np.nan, np.nan, 1.0, np.inf
    ours = Standardisation.fit(x)
    ref = RadiomicsStandardiser(dtype=np.float64).fit(x)
    np.testing.assert_allclose(ours.median, ref.median_)
    np.testing.assert_allclose(ours.mean, ref.mean_)
    np.testing.assert_allclose(ours.scale, ref.scale_)
    np.testing.assert_allclose(ours.transform(x), ref.transform(x), rtol=1e-6)
