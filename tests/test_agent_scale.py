"""The training loop at every run preset's real shapes, widths shrunk so that it is fast.

`wmbench atari --game Krull` once crashed at env step 1,164 (DFS underflow at 16 x 128 and 1024 x 8
batches) while every test used the tiny preset. These runs keep each preset's batch, sequence length,
imagination batch / context / horizon, acting context, replay capacity, warm-up and update schedule,
and shrink only widths (filters, latent, d_model, hidden units; frames average-pooled 4x inside the
model, the replay still holds 64x64x3), then train through the warm-up and past it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from wmbench.world_model.config import get_preset
from wmbench.agent.replay import ReplayBuffer
from wmbench.agent.config import RUN_PRESETS, resolve_config
from wmbench.agent.train import train

# the sizes a preset keeps: what the replay buffer and the loop are driven with
SHAPE_FIELDS = ("batch_size", "batch_length", "imag_batch", "imag_context", "imag_horizon", "act_context")


def narrow(size: str) -> dict:
    """DramaConfig overrides that shrink every width of preset `size` and keep its shapes."""
    p = get_preset(size)
    return dict(enc_filters=[4] * len(p.enc_filters), obs_pool=4, n_latents=4, n_classes=4, d_model=32,
                d_state=8, headdim=16, n_heads=2, head_hidden=16, actor_hidden=16, critic_hidden=16)


def shapes(preset: str) -> tuple:
    m = get_preset(RUN_PRESETS[preset]["size"])
    run = resolve_config(preset, game="Krull")
    return tuple(getattr(m, k) for k in SHAPE_FIELDS) + (run.replay_capacity, run.warmup_steps, run.train_ratio)


def test_s_has_the_shapes_of_xs():
    """S differs from XS only in widths, so the XS runs below cover it."""
    assert shapes("S") == shapes("XS") == (16, 128, 1024, 8, 16, 16, 100_000, 1032, 1.0)


@pytest.mark.parametrize("preset, faithful, updates", [
    ("XS", "paper", 50), ("XS", "code", 20), ("tiny", "paper", 60), ("tiny", "code", 60), ("cpu", "paper", 60),
])
def test_training_loop_at_the_preset_shapes(preset, faithful, updates, tmp_path, monkeypatch):
    drawn = []
    orig = ReplayBuffer.sample_indices

    def recording(self, batch_size, seq_len, imagination=False):
        drawn.append((batch_size, seq_len, imagination))
        return orig(self, batch_size, seq_len, imagination)
    monkeypatch.setattr(ReplayBuffer, "sample_indices", recording)
    size = RUN_PRESETS[preset]["size"]
    cfg = resolve_config(preset, game="Krull", faithful=faithful, run_dir=str(tmp_path / "run"),
                         runs_dir=str(tmp_path / "runs"), threads=1, eval_every=0, final_eval_episodes=0,
                         log_every=10, model_overrides=narrow(size))
    steps = cfg.warmup_steps + updates
    cfg.steps = steps
    summary = train(cfg, progress=False, estimate=False)
    m = get_preset(size, **cfg.model_overrides)

    assert not summary["stopped"] and summary["step"] == steps and summary["updates"] == updates
    # the loop drew exactly the preset's batches, one world-model and one imagination batch per update
    want = [(m.batch_size, m.batch_length, False), (m.imag_batch, m.imag_context, True)] * updates
    assert drawn == want
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train" and r["updates"] > 0]
    assert train_rows and all(np.isfinite(r["loss"]) and np.isfinite(r["ac_loss"]) for r in train_rows)
    # both samplers stay spread out, and the logs show it
    for r in train_rows:
        assert r["replay_wm_ess"] >= min(64, 0.5 * r["replay_wm_starts"])
        assert r["replay_img_ess"] >= min(64, 0.5 * r["replay_img_starts"])
        assert r["replay_wm_with_replacement"] == 0 and r["replay_img_with_replacement"] == 0
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["config"]["faithful"] == faithful and rec["config"]["dfs_mode"] == "official"
    assert rec["config"]["stale_reset_frame"] is (faithful == "code")
    assert rec["config"]["model"]["imagine_start"] == ("code" if faithful == "code" else "paper")
