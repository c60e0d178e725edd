"""Stacked fits: G members of one architecture as one grouped network, and the seeds of a fold trained together.

The references are the unstacked computations: each member's own forward pass, and ``fit_member`` per seed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from qsmrim.models import MemberStack, build_model, resnet18_3d, stack_networks, unstack_network
from qsmrim.models.stacked import stacked_input
from qsmrim.training import Member, TrainConfig, fit_member, make_splits
from qsmrim.training.fit_stack import fit_members, stack_checkpoint_name


def _randomised_resnets(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    nets = [resnet18_3d(2, 3) for _ in range(n)]
    for net in nets:  # batch-norm weights away from 1/0, so a mixed-up member would show
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_()
                m.running_mean.normal_()
    return nets


def test_stacked_network_computes_each_member_and_its_gradients():
    """Check forward (batch statistics), input and weight gradients of a 3-stack against the members alone."""
    nets = _randomised_resnets(3)
    stacked = stack_networks(nets)
    xs = [torch.randn(4, 2, 16, 32, 32, requires_grad=True) for _ in nets]
    out = stacked(stacked_input(xs)).view(4, 3, -1)
    (out * torch.arange(out.shape[-1])).sum().backward()
    for g, net in enumerate(nets):
        x = xs[g].detach().clone().requires_grad_(True)
        ref = net(x)
        (ref * torch.arange(ref.shape[-1])).sum().backward()
        torch.testing.assert_close(out[:, g], ref, atol=2e-5, rtol=1e-5)
        # float32 sums in another order: compare to the gradient's scale
        torch.testing.assert_close(xs[g].grad, x.grad, atol=1e-4 * float(x.grad.abs().max()), rtol=0)
        stem_grad = stacked.stem[0].weight.grad.chunk(3, 0)[g]
        ref_grad = net.stem[0].weight.grad
        torch.testing.assert_close(stem_grad, ref_grad, atol=1e-4 * float(ref_grad.abs().max()), rtol=0)
    stacked.eval()
    for net in nets:
        net.eval()
    x = [torch.randn(2, 2, 16, 32, 32) for _ in nets]
    out = stacked(stacked_input(x)).view(2, 3, -1)
    for g, net in enumerate(nets):  # running statistics were updated per member
        torch.testing.assert_close(out[:, g], net(x[g]), atol=2e-5, rtol=1e-5)


def test_unstack_returns_the_members_exactly():
    """Check stack -> unstack is the identity on every parameter and buffer, and MemberStack.unstack too."""
    nets = _randomised_resnets(2)
    stacked = stack_networks(nets)
    for g, net in enumerate(nets):
        state = unstack_network(stacked, g)
        assert state.keys() == net.state_dict().keys()
        for k, v in net.state_dict().items():
            assert torch.equal(state[k], v), k
    members = [build_model("image-rimnet", base_channels=2).eval() for _ in range(2)]
    back = MemberStack(members).eval().unstack()
    for a, b in zip(members, back, strict=True):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(v, w), k


def test_stack_refuses_what_it_cannot_stack():
    """Check the messages for a non-convolutional layer, mixed architectures and non-stackable models."""
    with pytest.raises(TypeError, match="only convolutions and batch norms"):
        stack_networks([nn.Sequential(nn.Linear(2, 2))] * 2)
    with pytest.raises(ValueError, match="one architecture"):
        stack_networks([resnet18_3d(2, 2), resnet18_3d(2, 3)])
    with pytest.raises(ValueError, match="same options"):
        MemberStack([build_model("qsmrimnet", base_channels=2), build_model("image-channel", base_channels=2)])
    with pytest.raises(TypeError, match="QSMRimNet-family"):
        MemberStack([build_model("aprl-nn")])


def _fold(dataset) -> tuple[list, int]:
    splits = make_splits(dataset.rim_counts(), n_folds=2, seed=0)
    fold = next(k for k, s in enumerate(splits) if dataset.labels[dataset.rows_of(s["train"])].max() == 1)
    return splits, fold


def _cfg(**kw) -> TrainConfig:
    base = dict(model="qsmrimnet", model_kwargs={"base_channels": 2, "n_radiomics": 6}, epochs=2, batch_size=16, inner_val_fraction=0.0,
                device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("model", ["qsmrimnet", "image-rimnet"])
def test_stacked_fit_gives_the_members_fit_member_gives(dataset, model, tmp_path):
    """Check losses, weights and test predictions of a stacked fit of seeds 0 and 1 against two fit_member runs.

    qsmrimnet exercises radiomics, DeepSMOTE draws and dropout (each member's own generator states);
    image-rimnet the two-stream backbone stack.
    """
    splits, fold = _fold(dataset)
    cfg = _cfg(model=model)
    stacked = fit_members(cfg, dataset, splits, fold, [0, 1], out_dirs=[tmp_path / "s0", tmp_path / "s1"])
    for seed, member in zip([0, 1], stacked, strict=True):
        ref = fit_member(cfg, dataset, splits, fold, seed)
        assert member.seed == seed and member.metrics["stack_size"] == 2
        np.testing.assert_allclose([h["train_loss"] for h in member.history], [h["train_loss"] for h in ref.history],
                                   rtol=1e-4)  # fmt: skip
        for (k, a), b in zip(ref.model.state_dict().items(), member.model.state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-3, msg=k)
        np.testing.assert_allclose(member.predictions["prob"], ref.predictions["prob"], atol=1e-4)
        assert member.thresholds.keys() == ref.thresholds.keys()
    loaded = Member.load(tmp_path / "s1")  # saved like any member
    np.testing.assert_allclose(loaded.predictions["prob"], stacked[1].predictions["prob"])


def test_seeds_of_a_stack_differ(dataset):
    """Check that stacking keeps the seeds apart: members of different seeds end with different weights."""
    splits, fold = _fold(dataset)
    a, b = fit_members(_cfg(epochs=1), dataset, splits, fold, [3, 4])
    assert not np.allclose(a.predictions["prob"], b.predictions["prob"])


def test_stacked_fit_resumes_after_a_crash(dataset, tmp_path):
    """Check that a stack killed after epoch 2 of 3 resumes from its checkpoint to the clean fit's weights."""
    splits, fold = _fold(dataset)
    cfg = _cfg(epochs=3)
    clean = fit_members(cfg, dataset, splits, fold, [0, 2], checkpoint_dir=tmp_path / "clean")

    def crash(epoch, rows):
        assert set(rows) == {0, 2} and rows[0]["checkpoint"].endswith(stack_checkpoint_name([0, 2]))
        if epoch == 2:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        fit_members(cfg, dataset, splits, fold, [0, 2], checkpoint_dir=tmp_path / "crash", on_epoch=crash)
    seen = []
    assert (tmp_path / "crash" / stack_checkpoint_name([0, 2])).exists()
    resumed = fit_members(cfg, dataset, splits, fold, [0, 2], checkpoint_dir=tmp_path / "crash",
                          out_dirs=[tmp_path / "m0", tmp_path / "m2"], on_epoch=lambda e, r: seen.append(e))  # fmt: skip
    assert seen == [3]
    # the members are saved, so their resume point is removed
    assert (tmp_path / "m2" / "member.json").exists() and not list((tmp_path / "crash").glob("*.pt"))
    for c, r in zip(clean, resumed, strict=True):
        assert [int(h["epoch"]) for h in r.history] == [1, 2, 3]
        for (k, a), b in zip(c.model.state_dict().items(), r.model.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def test_stack_checkpoint_of_another_format_is_not_resumed(dataset, tmp_path, caplog):
    """Check that a stack checkpoint written by an older trainer (format 1: no "format" key, per-member heads)
    is ignored with a warning naming it, and the members train from epoch 1 instead of failing on its keys."""
    splits, fold = _fold(dataset)
    old = tmp_path / stack_checkpoint_name([0, 1])
    torch.save({"stack": {"heads.0.classifier.net.0.weight": torch.zeros(1)}, "epoch": 1}, old)
    seen = []
    with caplog.at_level("WARNING", logger="qsmrim.training.fit_stack"):
        fit_members(_cfg(epochs=2), dataset, splits, fold, [0, 1], checkpoint_dir=tmp_path,
                    on_epoch=lambda e, r: seen.append(e))  # fmt: skip
    assert seen == [1, 2]
    assert any(str(old) in r.getMessage() and "from the start" in r.getMessage() for r in caplog.records)


def test_fit_members_rejects_bad_requests(dataset):
    """Check the messages for a non-stackable model, repeated seeds and a wrong number of folders."""
    splits, fold = _fold(dataset)
    with pytest.raises(ValueError, match="cannot be trained stacked"):
        fit_members(_cfg(model="rimnet"), dataset, splits, fold, [0, 1])
    with pytest.raises(ValueError, match="distinct"):
        fit_members(_cfg(), dataset, splits, fold, [1, 1])
    with pytest.raises(ValueError, match="one folder per member"):
        fit_members(_cfg(), dataset, splits, fold, [0, 1], out_dirs=["a"])


def test_cli_train_stacks_several_seeds(tmp_path, capsys):
    """Check `qsmrim train --seed 0 1` writes both members of the fold (stacked: forced on this CPU, where
    stacking_pays says no) and refuses --out with two seeds."""
    from conftest import REPO
    from qsmrim.cli import main
    from qsmrim.training.layout import member_dir

    ci = str(REPO / "platform" / "experiments" / "ci.yaml")
    common = ["train", "--config", ci, "--set", f"runs_dir={tmp_path}", "--set", "models=[image-channel]",
              "--set", "training.epochs=1", "--set", "training.stack_on_cpu=true", "--fold", "0"]  # fmt: skip
    assert main([*common, "--seed", "0", "1", "--out", str(tmp_path / "x")]) == 1
    assert "--out names one member folder" in capsys.readouterr().err
    assert main([*common, "--seed", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "seed 0" in out and "seed 1" in out
    for seed in (0, 1):
        member = Member.load(member_dir(tmp_path / "ci", "image-channel", 0, seed))
        assert member.metrics["stack_size"] == 2 and member.seed == seed


def _random_dataset(n_lesions: int = 150, n_subjects: int = 12, seed: int = 0):
    """Random patches, 25% rim+ (so batches hold >= 3 rim+ and DeepSMOTE synthesises), 6 radiomic features."""
    from qsmrim.training import LesionDataset

    rng = np.random.default_rng(seed)
    subjects = np.array([f"{i:03d}" for i in np.sort(rng.integers(0, n_subjects, n_lesions))])
    labels = (rng.random(n_lesions) < 0.25).astype(np.int8)
    patches = rng.standard_normal((n_lesions, 2, 16, 32, 32), dtype=np.float32)
    radiomics = rng.standard_normal((n_lesions, 6)) + labels[:, None]
    return LesionDataset(subjects, np.arange(n_lesions), labels, patches, radiomics, tuple(f"f{i}" for i in range(6)))


def test_stack_across_folds_gives_the_members_fit_member_gives(tmp_path):
    """Check a stack of members from three folds (unequal training sets: members sit out steps, and short last
    batches of different sizes run one member at a time) against fit_member per (fold, seed)."""
    from qsmrim.training.fit_stack import fit_stack

    data = _random_dataset()
    splits = make_splits(data.rim_counts(), n_folds=3, seed=0)
    cfg = _cfg(model="qsmrimnet", batch_size=20, epochs=2)
    members = [(0, 0), (1, 0), (1, 1), (2, 3)]
    sizes = {f: len(data.rows_of(splits[f]["train"])) for f in (0, 1, 2)}
    assert len({n // 20 for n in sizes.values()}) > 1 and len({n % 20 for n in sizes.values()}) > 1, sizes
    stacked = fit_stack(cfg, data, splits, members, out_dirs=[tmp_path / f"m{i}" for i in range(4)],
                        checkpoint_dir=tmp_path)  # fmt: skip
    for (fold, seed), member in zip(members, stacked, strict=True):
        ref = fit_member(cfg, data, splits, fold, seed)
        assert (member.fold, member.seed) == (fold, seed)
        np.testing.assert_allclose([h["train_loss"] for h in member.history], [h["train_loss"] for h in ref.history],
                                   rtol=1e-4)  # fmt: skip
        assert [h["lr"] for h in member.history] == [h["lr"] for h in ref.history]
        # Biases in front of a batch norm have a zero gradient up to rounding, which Adam scales to +-lr steps:
        # weights agree to a few lr (1e-4) steps; the predictions, which those biases cannot move, much closer.
        for (k, a), b in zip(ref.model.state_dict().items(), member.model.state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3, msg=k)
        np.testing.assert_allclose(member.predictions["prob"], ref.predictions["prob"], atol=5e-5)
    assert not list(tmp_path.glob("stack_checkpoint_*.pt"))


def test_stack_adam_is_adam_per_member_and_leaves_idle_members_alone():
    """Check StackAdam against torch.optim.Adam (foreach) on each member alone, fed the same gradients, bit for
    bit, including steps that move one member only (the other must not change by one bit)."""
    from qsmrim.training.stack_adam import StackAdam

    torch.manual_seed(0)
    stack = MemberStack([build_model("qsmrimnet", base_channels=2, n_radiomics=6) for _ in range(2)])
    ref = stack.unstack()
    ref_opts = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3, foreach=True) for m in ref]
    opt = StackAdam(stack, lr=1e-2, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(1)
    for active in ([0, 1], [1], [0, 1], [0], [0, 1]):
        opt.zero_grad()
        grad_models = []  # the members with their gradients as weights: stacked, they lay out the stack's gradients
        for g, member in enumerate(ref):
            member.zero_grad(set_to_none=True)
            grad_model = copy.deepcopy(member)
            for p, q in zip(member.parameters(), grad_model.parameters(), strict=True):
                grad = torch.randn(p.shape, generator=gen) if g in active else torch.zeros(p.shape)
                q.data.copy_(grad)
                if g in active:
                    p.grad = grad.clone()
            grad_models.append(grad_model)
        for p, grad in zip(stack.parameters(), MemberStack(grad_models).parameters(), strict=True):
            p.grad = grad.detach().clone()
        before = [[t.clone() for t in m.parameters()] for m in stack.unstack()]
        opt.step(active if len(active) < 2 else None)
        for g in active:
            ref_opts[g].step()
        after = stack.unstack()
        for g in range(2):
            if g in active:
                for (k, a), b in zip(ref[g].named_parameters(), after[g].parameters(), strict=True):
                    torch.testing.assert_close(b, a, atol=0, rtol=0, msg=k)  # the same arithmetic
            else:
                assert all(torch.equal(a, b) for a, b in zip(before[g], after[g].parameters(), strict=True))
    assert opt.steps == [4, 4]


def test_train_local_stacks_the_whole_grid_and_resumes(tmp_path):
    """Check train_local with grid.stack_folds: one stack of every (fold, seed), saved as members; a rerun loads them."""
    from conftest import REPO
    from qsmrim.config import load_config
    from qsmrim.experiment import prepare_run, train_local

    cfg = load_config(REPO / "platform" / "experiments" / "ci.yaml", {
        "runs_dir": str(tmp_path), "models": ["image-channel"], "training.epochs": 1, "grid.stack_folds": True,
        "training.stack_on_cpu": True})  # fmt: skip
    prepare_run(cfg)
    first = train_local(cfg)
    assert [(m.fold, m.seed, m.metrics["stack_size"]) for m in first] == [(f, s, 4) for f in (0, 1) for s in (0, 1)]
    assert not list((tmp_path / "ci" / "image-channel").glob("stack_checkpoint_*.pt"))
    again = train_local(cfg)  # every member exists: nothing is trained again
    assert [m.predictions["prob"].tolist() for m in again] == [m.predictions["prob"].tolist() for m in first]


@pytest.mark.parametrize("model", ["qsmrimnet", "qsmrimnet-add", "image-rimnet", "image-radiomics"])
def test_stacked_head_is_each_members_head(model):
    """Check StackedHead.forward_train against QSMRimNet.head_train of each member alone, given the same
    generator states: logits of every real and synthetic row, the batch losses, the head's weight gradients and
    batch-norm statistics. Members have 5, 2 (too few to synthesise) and 0 rim+ rows; a fourth sits out."""
    from qsmrim.models import STACKABLE_MODEL_NAMES
    from qsmrim.models.stacked_head import StackedHead

    assert model in STACKABLE_MODEL_NAMES
    torch.manual_seed(0)
    nets = [build_model(model, base_channels=2, n_radiomics=6) for _ in range(4)]
    head = StackedHead(nets).train()
    n, g_count = 12, 4
    width = 16 * (2 if model == "image-rimnet" else 1)  # 8 * base_channels per backbone
    image = torch.randn(n, g_count * width)
    rad = torch.randn(n, g_count, 6)
    labels = torch.zeros(n, g_count)
    labels[[0, 2, 3, 7, 11], 0] = 1
    labels[[4, 5], 1] = 1
    anchors = [torch.nonzero(labels[:, g]).flatten() for g in range(3)] + [None]
    states = {g: torch.Generator().manual_seed(10 + g).get_state() for g in range(g_count)}

    class OwnRNG:  # each member's global-generator state, as fit_stack's _MemberRNG keeps it
        def __init__(self, g):
            self.g = g

        def __enter__(self):
            torch.set_rng_state(states[self.g])

        def __exit__(self, *exc):
            states[self.g] = torch.get_rng_state()

    saved = dict(states)
    gens = [torch.Generator().manual_seed(100 + g) for g in range(g_count)]
    draw = head.draw(n, anchors, gens, OwnRNG, torch.device("cpu"))
    logits, yb = head.forward_train(image, rad.view(n, -1), labels, draw)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, yb, reduction="none")
    losses = (bce * draw.weights).sum(0)
    losses.sum().backward()
    assert losses[3] == 0 and draw.weights[:, 3].abs().sum() == 0
    # the member that sits out draws nothing, from either of its generators
    assert torch.equal(states[3], saved[3]) and torch.equal(gens[3].get_state(), torch.Generator().manual_seed(103).get_state())
    for g in range(3):
        member = nets[g].train()
        torch.set_rng_state(saved[g])
        ref_logits, ref_labels = member.head_train(image.view(n, g_count, -1)[:, g], rad[:, g], labels[:, g],
                                                   generator=torch.Generator().manual_seed(100 + g), anchors=anchors[g])  # fmt: skip
        m = ref_logits.shape[0]
        assert m == n + 2 * (5 if g == 0 and member.smote.oversample else 0)
        assert (draw.weights[:m, g] > 0).all() and (draw.weights[m:, g] == 0).all()
        torch.testing.assert_close(logits[:m, g], ref_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(yb[:m, g], ref_labels)
        ref_loss = torch.nn.functional.binary_cross_entropy_with_logits(ref_logits, ref_labels)
        torch.testing.assert_close(losses[g], ref_loss, atol=1e-6, rtol=1e-5)
        ref_loss.backward()
        ref_grads = {k: p.grad for k, p in member.named_parameters() if not k.startswith("backbones.")}
        stacked_grads = {head._member_name(name): p.grad for name, p in head.named_parameters()}
        assert stacked_grads.keys() == ref_grads.keys()
        for k, ref_grad in ref_grads.items():
            got = stacked_grads[k].unflatten(0, (g_count, -1))[g].view(ref_grad.shape)
            torch.testing.assert_close(got, ref_grad, atol=1e-5, rtol=1e-4, msg=k)
        views = head.member_tensors(g)
        for k, buf in member.named_buffers():
            if buf.ndim and not k.startswith("backbones."):
                torch.testing.assert_close(views[k], buf, atol=1e-6, rtol=1e-5, msg=k)


def test_cpu_fits_a_stacked_group_one_member_after_another(tmp_path):
    """Check that on a CPU (stacking slower there) train_local fits a fold's seeds one after another: the same
    members as fit_member gives, no stack checkpoint, and stacking_pays says why."""
    from conftest import REPO
    from qsmrim.config import load_config
    from qsmrim.experiment import member_config, prepare_run, train_local
    from qsmrim.training.fit_stack import stacking_pays

    cfg = load_config(REPO / "platform" / "experiments" / "ci.yaml", {
        "runs_dir": str(tmp_path), "models": ["image-channel"], "training.epochs": 1, "training.device": "cpu"})  # fmt: skip
    assert not stacking_pays(member_config(cfg, "image-channel"))
    prepare_run(cfg)
    members = train_local(cfg)
    assert [(m.fold, m.seed) for m in members] == [(f, s) for f in (0, 1) for s in (0, 1)]
    assert all("stack_size" not in m.metrics for m in members)
    alone = fit_member(member_config(cfg, "image-channel"), members_data(tmp_path), _splits(tmp_path), 1, 1)
    assert alone.predictions["prob"].tolist() == members[-1].predictions["prob"].tolist()


def members_data(tmp_path):
    from qsmrim.experiment import load_run_data

    return load_run_data(tmp_path / "ci", with_features=False)


def _splits(tmp_path):
    import json

    return json.loads((tmp_path / "ci" / "splits.json").read_text())
