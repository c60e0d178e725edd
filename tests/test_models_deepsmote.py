"""DeepSMOTE (paper section 2.2.3): synthetic rows, segment geometry, pass-through and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from qsmrim.models import DeepSMOTE, QSMRimNet, deep_smote_interpolate, example_inputs


def _two_nearest(z: np.ndarray, p: int, pos: np.ndarray) -> set[int]:
    """Slow reference: the 2 nearest other rim+ rows of row p (brute force, float64)."""
    others = [q for q in pos if q != p]
    d = [float(np.sqrt(((z[p] - z[q]) ** 2).sum())) for q in others]
    order = np.argsort(d, kind="stable")
    return {int(others[i]) for i in order[:2]}


def _segment_weight(s: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Weight t with s ~ t*a + (1-t)*b (least squares), and the distance of s from that point."""
    t = float(np.dot(s - b, a - b) / np.dot(a - b, a - b))
    return t, float(np.linalg.norm(s - (t * a + (1 - t) * b)))


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    labels = torch.zeros(20)
    labels[[1, 4, 5, 11, 17]] = 1
    return z, labels


def test_deepsmote_row_count_and_labels(batch):
    """Check that N + 2n rows come out, the first N unchanged and the 2n synthetic ones labelled rim+."""
    z, labels = batch
    out = deep_smote_interpolate(z, labels, generator=torch.Generator().manual_seed(1))
    assert out.features.shape == (20 + 2 * 5, 6)
    assert out.labels.shape == (30,)
    assert torch.equal(out.features[:20], z)
    assert torch.equal(out.labels[:20], labels)
    assert (out.labels[20:] == 1).all()
    assert out.labels.dtype == labels.dtype


def test_deepsmote_rows_on_segment_to_nearest_neighbours(batch):
    """Check that each synthetic row lies between its rim+ anchor and one of the anchor's 2 nearest rim+ rows."""
    z, labels = batch
    out = deep_smote_interpolate(z, labels, generator=torch.Generator().manual_seed(1))
    zn, sn = z.numpy(), out.features.numpy()
    pos = np.flatnonzero(labels.numpy() > 0.5)
    assert out.anchors.tolist() == pos.tolist()
    for i, p in enumerate(pos):
        nearest = _two_nearest(zn, p, pos)
        assert set(out.neighbors[i].tolist()) == nearest
        for j in range(2):
            s = sn[20 + 2 * i + j]
            fits = [_segment_weight(s, zn[p], zn[q]) for q in nearest]
            assert any(0.0 <= t <= 1.0 and dist < 1e-9 for t, dist in fits)
            t, _ = _segment_weight(s, zn[p], zn[int(out.neighbors[i, j])])
            assert t == pytest.approx(float(out.alpha[i, j]), abs=1e-9)


def test_deepsmote_alpha_is_uniform_in_unit_interval():
    """Check that the interpolation weights look like U(0, 1) draws."""
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    alphas = torch.cat(
        [
            deep_smote_interpolate(
                z, torch.ones(64), generator=torch.Generator().manual_seed(s)
            ).alpha.flatten()
            for s in range(20)
        ]
    )
    assert 0 <= alphas.min() and alphas.max() < 1
    assert alphas.mean().item() == pytest.approx(0.5, abs=0.02)
    assert alphas.var().item() == pytest.approx(1 / 12, abs=0.01)


def test_deepsmote_replay(batch):
    """Check that the same generator seed, or replaying the drawn alpha, gives identical rows."""
    z, labels = batch
    a = deep_smote_interpolate(z, labels, generator=torch.Generator().manual_seed(7))
    b = deep_smote_interpolate(z, labels, generator=torch.Generator().manual_seed(7))
    c = deep_smote_interpolate(z, labels, alpha=a.alpha)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.features, c.features)


@pytest.mark.parametrize("n_pos", [0, 1, 2])
def test_deepsmote_fewer_than_three_positives_pass_through(batch, n_pos):
    """Check that with fewer than 3 rim+ rows the batch is returned unchanged (same objects)."""
    z, _ = batch
    labels = torch.zeros(20)
    labels[:n_pos] = 1
    out = deep_smote_interpolate(z, labels)
    assert out.features is z and out.labels is labels


def test_deepsmote_bool_and_int_labels(batch):
    """Check that bool and integer labels mark rim+ the same way as float ones and keep their dtype."""
    z, labels = batch
    for lab in (labels.bool(), labels.long()):
        out = deep_smote_interpolate(z, lab, alpha=torch.full((5, 2), 0.25))
        assert out.features.shape == (30, 6) and out.labels.dtype == lab.dtype
        assert out.labels[20:].all()


def test_deepsmote_layer_eval_is_transform_only(batch):
    """Check that in eval mode the DeepSMOTE layer is exactly its feature transform."""
    z, labels = batch
    layer = DeepSMOTE(6, 4).double().eval()
    out, out_labels = layer(z, labels)
    assert torch.equal(out, layer.transform(z))
    assert out_labels is labels


def test_deepsmote_layer_train_appends_rows(batch):
    """Check that in training mode the layer appends 2n interpolated rows to the transformed batch."""
    z, labels = batch
    layer = DeepSMOTE(6, 4).double().train()
    out, out_labels = layer(z, labels, generator=torch.Generator().manual_seed(0))
    assert out.shape == (30, 4) and out_labels.shape == (30,)
    assert torch.isfinite(out).all()


def _model() -> QSMRimNet:
    torch.manual_seed(0)
    return QSMRimNet(base_channels=4, radiomics_dropout=0.0, classifier_dropout=0.0)


def test_model_eval_forward_train_is_forward():
    """Check that forward_train in eval mode returns exactly forward's logits and the same labels."""
    model = _model().eval()
    patch, radiomics = example_inputs(16)
    labels = torch.zeros(16)
    labels[:6] = 1
    with torch.no_grad():
        logits, out_labels = model.forward_train(patch, radiomics, labels)
        assert torch.equal(logits, model(patch, radiomics))
    assert out_labels is labels


def test_model_few_positives_forward_train_is_forward():
    """Check that with < 3 rim+ in a training batch forward_train equals the plain training forward."""
    model = _model().train()
    patch, radiomics = example_inputs(16)
    labels = torch.zeros(16)
    labels[[3, 9]] = 1
    logits, out_labels = model.forward_train(patch, radiomics, labels)
    assert torch.equal(logits, model(patch, radiomics))
    assert out_labels is labels


def test_model_original_rows_unchanged_by_synthesis():
    """Check that the first N training logits equal those of a pass without synthesis."""
    model = _model().train()
    patch, radiomics = example_inputs(16)
    labels = torch.zeros(16)
    labels[:6] = 1
    logits, _ = model.forward_train(patch, radiomics, labels)
    assert logits.shape == (28,)
    assert_close(logits[:16], model(patch, radiomics))


def test_model_gradients_reach_backbone_from_synthetic_rows():
    """Check that a loss on the synthetic rows alone back-propagates to the image and radiomics branches."""
    model = _model().train()
    patch, radiomics = example_inputs(16)
    labels = torch.zeros(16)
    labels[:6] = 1
    logits, out_labels = model.forward_train(patch, radiomics, labels)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[16:], out_labels[16:])
    loss.backward()
    stem = model.backbones[0].stem[0].weight.grad
    first_rad = model.radiomics_mlp.net[0][0].weight.grad
    for grad in (stem, first_rad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, err_type, err_msg",
    [
        ({"n_neighbors": 0}, ValueError, "n_neighbors must be a positive integer, not 0"),
        ({"n_neighbors": 2.0}, TypeError, "n_neighbors must be a positive integer"),
        ({"alpha": torch.zeros(3, 2)}, ValueError, "alpha must be \\[n, k\\] = \\[5, 2\\]"),
    ],
)
def test_deepsmote_invalid_arguments(batch, kwargs, err_type, err_msg):
    """Check that bad DeepSMOTE arguments raise with a message naming them."""
    z, labels = batch
    with pytest.raises(err_type, match=err_msg):
        deep_smote_interpolate(z, labels, **kwargs)


def test_deepsmote_invalid_shapes(batch):
    """Check that features must be 2-d and labels must match their rows."""
    z, labels = batch
    with pytest.raises(ValueError, match="features must be \\[N, d\\]"):
        deep_smote_interpolate(z[None], labels)
    with pytest.raises(ValueError, match="labels must be \\[N\\] = \\[20\\]"):
        deep_smote_interpolate(z, labels[:5])


def test_deepsmote_given_anchors_equal_found_ones(batch):
    """Check that anchors computed by the caller (on the CPU, no GPU sync) give the very same draw."""
    z, y = batch
    found = deep_smote_interpolate(z, y, generator=torch.Generator().manual_seed(3))
    anchors = torch.nonzero(y > 0.5).flatten()
    given = deep_smote_interpolate(z, y, generator=torch.Generator().manual_seed(3), anchors=anchors)
    assert torch.equal(found.features, given.features) and torch.equal(found.neighbors, given.neighbors)
    with pytest.raises(ValueError, match="anchors must be"):
        deep_smote_interpolate(z, y, anchors=anchors.view(-1, 1))
