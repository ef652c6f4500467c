"""Every 2026 backbone matches Mamba-2's parameter count within ±10% at every preset that builds a backbone:
the world-model sizes (XS, S, tiny, cpu) and the grid-world presets (cpu, paper), each with the options
that preset gives the backbone. Counted on the meta device: no memory, no time."""
from __future__ import annotations

import pytest
import torch

import wmbench
from wmbench.harness.gridworld import PRESETS as GRID_PRESETS
from wmbench.harness.gridworld import make_config
from wmbench.world_model.config import get_preset, list_presets

NEW = ["gated_deltanet", "mlstm", "rwkv7", "mamba3"]


def _count(name: str, d_model: int, n_layers: int, options: dict) -> int:
    with torch.device("meta"):
        return wmbench.create_backbone(name, d_model, n_layers, **options).n_params


def _world_model(preset: str, name: str) -> int:
    cfg = get_preset(preset, backbone=name)
    return _count(name, cfg.d_model, cfg.n_layers, cfg.backbone_kwargs())


def _grid(preset: str, name: str) -> int:
    cfg = make_config(preset, backbone=name)
    return _count(name, cfg.d_model, cfg.n_layers, cfg.backbone_options)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("where, preset", [("world model", p) for p in list_presets()] +
                         [("grid world", p) for p in GRID_PRESETS])
def test_within_ten_percent_of_mamba2(where, preset, name):
    count = _world_model if where == "world model" else _grid
    ours, mamba2 = count(preset, name), count(preset, "mamba2")
    assert abs(ours / mamba2 - 1) <= 0.10, f"{where} {preset}: {name} {ours:,} vs mamba2 {mamba2:,}"


def test_the_counts_are_real_modules():
    # the meta-device count is the count of the real module
    cfg = get_preset("tiny", backbone="mlstm")
    real = wmbench.create_backbone("mlstm", cfg.d_model, cfg.n_layers, **cfg.backbone_kwargs()).n_params
    assert real == _world_model("tiny", "mlstm") > 0
