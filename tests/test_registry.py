"""Backbone registry: built-in names, clear errors, and third-party registration via entry points."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import wmbench
from wmbench.core.registry import BACKBONES

BUILTINS = ("mamba", "mamba2", "gru", "transformer")


def test_builtins_listed():
    names = wmbench.list_backbones()
    assert set(BUILTINS) <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_valid_choices():
    with pytest.raises(ValueError, match="valid choices") as e:
        wmbench.create_backbone("lstm", d_model=8, n_layers=1)
    for name in BUILTINS:
        assert name in str(e.value)
    assert "lstm" in str(e.value)


def test_names_are_case_insensitive():
    assert type(wmbench.create_backbone("GRU", d_model=8, n_layers=1)) is type(
        wmbench.create_backbone("gru", d_model=8, n_layers=1))


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("sizes", [dict(d_model=0, n_layers=1), dict(d_model=8, n_layers=0),
                                   dict(d_model=-4, n_layers=2)])
def test_non_positive_sizes_rejected(name, sizes):
    with pytest.raises(ValueError, match="positive"):
        wmbench.create_backbone(name, **sizes)


def test_transformer_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        wmbench.create_backbone("transformer", d_model=64, n_layers=1, n_heads=5)


def test_mamba2_heads_must_divide_inner_width():
    # d_inner = expand * d_model = 128 is not a multiple of headdim 48
    with pytest.raises(ValueError, match="headdim"):
        wmbench.create_backbone("mamba2", d_model=64, n_layers=1, headdim=48)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        wmbench.register_backbone("gru", lambda d_model, n_layers: None)


DUMMY_MODULE = '''
"""A third-party backbone: a token-wise linear mixer (no memory) in wmbench's residual stack."""
import torch.nn as nn
from wmbench.backbones.base import ResidualBackbone


class TokenLinear(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        return self.out_proj(x)

    def init_state(self, batch_size, max_len=None):
        return None

    def prefill(self, x, state):
        return self.out_proj(x), state

    def step(self, x_t, state):
        return self.out_proj(x_t), state


def make(d_model, n_layers, **options):
    return ResidualBackbone("dummy", d_model, n_layers, lambda i: TokenLinear(d_model), **options)
'''


def _install_fake_distribution(tmp_path, entry_points: str) -> None:
    dist = tmp_path / "dummy_wm-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dummy_wm\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    (tmp_path / "dummy_backbone_mod.py").write_text(textwrap.dedent(DUMMY_MODULE))


@pytest.fixture
def fresh_registry(monkeypatch, tmp_path):
    """A registry that will rescan entry points; restored (without plug-ins) afterwards."""
    wmbench.list_backbones()  # make sure the built-ins are in before we snapshot
    monkeypatch.setattr(BACKBONES, "_factories", dict(BACKBONES._factories))
    monkeypatch.setattr(BACKBONES, "_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("dummy_backbone_mod", None)


def test_entry_point_backbone(fresh_registry):
    _install_fake_distribution(fresh_registry, "[wmbench.backbones]\ndummy = dummy_backbone_mod:make\n")
    assert "dummy" in wmbench.list_backbones()
    assert set(BUILTINS) <= set(wmbench.list_backbones())
    bb = wmbench.create_backbone("dummy", d_model=8, n_layers=2, dropout=0.1).eval()
    assert bb.name == "dummy" and len(bb.blocks) == 2
    x = torch.randn(2, 5, 8)
    y = bb(x)
    y_t, _ = bb.step(x[:, 0], bb.init_state(2))
    assert y.shape == (2, 5, 8) and (y_t - y[:, 0]).abs().max() <= 1e-6


def test_entry_point_registration_is_undone(fresh_registry):
    # the fixture of the previous test restored the registry: no plug-in leaks between tests
    assert "dummy" not in BACKBONES._factories


def test_broken_plugin_warns_and_builtins_survive(fresh_registry):
    _install_fake_distribution(fresh_registry, "[wmbench.backbones]\nbroken = no_such_module_xyz:make\n")
    with pytest.warns(UserWarning, match="broken"):
        names = wmbench.list_backbones()
    assert "broken" not in names and set(BUILTINS) <= set(names)
