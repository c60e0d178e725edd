"""The QSM channel enters the image models scaled by ``qsm_scale`` (issue 14): the maths, stacking, export, and
members written before the change still load as they were trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qsmrim.models import MemberStack, build_model
from qsmrim.models.layers import ChannelScale


def test_channel_scale_multiplies_each_channel_and_repeats_for_stacks():
    """Check y[:, c] = s[c mod C] x[:, c] against a hand computation, for C and for 3C (a 3-member stack)."""
    x = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1, 1, 1)
    y = ChannelScale((10.0, 1.0))(x)
    expected = x.clone()
    expected[:, 0::2] *= 10
    assert torch.equal(y, expected)
    assert torch.equal(ChannelScale((1.0, 1.0))(x), x)
    with pytest.raises(ValueError, match="multiple"):
        ChannelScale((10.0, 1.0, 1.0, 1.0))(x)
    with pytest.raises(ValueError, match="positive"):
        ChannelScale((0.0, 1.0))


@pytest.mark.parametrize("name", ["qsmrimnet", "image-rimnet", "rimnet"])
def test_qsm_scale_equals_scaling_the_input(name):
    """Check that a model with qsm_scale=s on a patch equals the same weights with qsm_scale=1 on the patch whose QSM
    channel is multiplied by s (so the factor touches QSM only, in every image fusion)."""
    kw = {"channels": (2, 4, 4), "hidden_features": (8,)} if name == "rimnet" else {"base_channels": 2}
    torch.manual_seed(0)
    scaled = build_model(name, qsm_scale=10.0, **kw).eval()
    plain = build_model(name, qsm_scale=1.0, **kw).eval()
    plain.load_state_dict(scaled.state_dict())
    patch, rad = torch.randn(3, 2, 16, 32, 32), torch.randn(3, 527)
    by_hand = patch.clone()
    by_hand[:, 0] *= 10
    with torch.no_grad():
        torch.testing.assert_close(scaled(patch, rad), plain(by_hand, rad), rtol=1e-5, atol=1e-5)


def test_stacked_members_keep_their_scale():
    """Check that a stack of scaled members gives each member's own image feature (the factors repeat per member)."""
    torch.manual_seed(1)
    members = [build_model("qsmrimnet", base_channels=2).eval() for _ in range(3)]
    stack = MemberStack(members).eval()
    patches = torch.randn(3, 4, 2, 16, 32, 32)
    with torch.no_grad():
        feats = stack.image_features(patches)
        for g, m in enumerate(members):
            torch.testing.assert_close(feats[g], m.image_features(patches[g]), rtol=1e-4, atol=1e-5)


def test_member_written_before_the_scale_loads_unscaled(tmp_path):
    """Check that a member.json without a format (written before qsm_scale) rebuilds its model with qsm_scale=1, the
    scale it was trained with, and a new one keeps the default."""
    from qsmrim.training.member import MEMBER_FORMAT, Member

    model = build_model("qsmrimnet", base_channels=2).eval()
    member = Member("qsmrimnet", {"base_channels": 2}, 0, 0, {"paper": 0.5}, None, (), model=model)
    folder = member.save(tmp_path / "m")
    meta = json.loads((folder / "member.json").read_text())
    assert meta["format"] == MEMBER_FORMAT
    assert Member.load(folder).model.backbones[0].input_scale.scale == (10.0, 1.0)
    del meta["format"]
    (folder / "member.json").write_text(json.dumps(meta))
    old = Member.load(folder)
    assert old.model.backbones[0].input_scale.scale == (1.0, 1.0)
    patch = np.random.default_rng(0).normal(size=(2, 2, 16, 32, 32)).astype(np.float32)
    with torch.no_grad():
        torch.testing.assert_close(old.model(torch.from_numpy(patch), torch.zeros(2, 527)),
                                   model(torch.from_numpy(patch * np.array([0.1, 1.0], np.float32)[:, None, None, None]),
                                         torch.zeros(2, 527)), rtol=1e-4, atol=1e-5)  # fmt: skip
