"""The grid-world harness: model wiring, loss masking, evaluation alignment, and a tiny run end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.harness import gridworld as harness
from wmbench.harness import gridworld_eval as gw_eval
from wmbench.harness.gridworld import GridWorldLM, RunConfig, make_config
from wmbench.tasks import gridworld as gw

TASK = gw.GridWorldTask()


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: on a shared 2-core machine, 2 OpenMP threads mostly wait for each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> RunConfig:
    base = dict(backbone="gru", seq_len=78, steps=4, batch_size=2, d_model=16, n_layers=1, eval_sequences=3,
                warmup=1, timed_steps=2, imagine_frames=2, lr=1e-3)
    base.update(kw)
    return make_config(**base)


def test_train_and_evaluate_tiny_end_to_end():
    cfg = tiny()
    m = harness.train_and_evaluate(cfg, progress=False)
    for name in ("train_ms_per_step", "data_ms_per_step", "tokens_per_s", "peak_memory", "final_loss",
                 "error_pct", "E_g_pct", "E_l_pct", "teacher_forced_error_pct", "oracle_error_pct",
                 "oracle_error_pct_all_frames", "respawn_pct", "imagine_ms_per_token", "imagine_prefill_ms",
                 "n_params", "error_above_floor_pp"):
        assert name in m, name
    for name, v in m.items():
        assert set(v) >= {"value", "unit"}, name
        assert isinstance(v["unit"], str) and v["unit"]
        assert math.isfinite(float(v["value"])), name
    assert m["peak_memory"]["method"].startswith(("rss_sampler", "cuda_max_allocated"))
    assert 0 <= m["error_pct"]["value"] <= 100 and 0 <= m["oracle_error_pct"]["value"] <= 100
    assert len(m["train_ms_per_step"]["samples_ms"]) == 2
    assert "\n".join(harness.summary_lines(cfg, m))


def test_runs_are_reproducible():
    a = harness.train_and_evaluate(tiny(steps=2, imagine_frames=1), progress=False)
    b = harness.train_and_evaluate(tiny(steps=2, imagine_frames=1), progress=False)
    for k in ("final_loss", "error_pct", "teacher_forced_error_pct", "oracle_error_pct"):
        assert a[k]["value"] == b[k]["value"], k


def test_loss_counts_grid_targets_only():
    torch.manual_seed(0)
    model = GridWorldLM("gru", gw.VOCAB_SIZE, 16, 1)
    tokens = torch.from_numpy(gw.sample_sequences(2, 3, seed=0))
    is_target = torch.zeros(gw.VOCAB_SIZE, dtype=torch.bool)
    is_target[list(gw.CELL_TOKENS)] = True
    got = model.loss(tokens, is_target)
    logits = model(tokens)[:, :-1]
    tgt = tokens[:, 1:]
    keep = tgt < gw.N_CELL_KINDS                       # cell targets; action tokens are never targets
    assert keep.sum() == 2 * (3 * 25 - 1)              # every cell but the very first one
    want = F.cross_entropy(logits[keep], tgt[keep])
    assert torch.allclose(got, want, atol=1e-6)


def test_prefill_and_step_match_forward():
    torch.manual_seed(0)
    model = GridWorldLM("gru", gw.VOCAB_SIZE, 16, 2).eval()
    tokens = torch.from_numpy(gw.sample_sequences(2, 2, seed=1))
    with torch.no_grad():
        full = model(tokens)
        state = model.init_state(2, max_len=tokens.shape[1])
        last, state = model.prefill(tokens[:, :30], state)
        assert torch.allclose(last, full[:, 29], atol=1e-4)
        for t in range(30, 40):
            last, state = model.step(tokens[:, t], state)
            assert torch.allclose(last, full[:, t], atol=1e-4)


class Cheat(nn.Module):
    """A 'model' whose logits at position j point at the true token j+1 of the sequence it is shown."""

    def forward(self, tokens):
        nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
        return F.one_hot(nxt, gw.VOCAB_SIZE).float()


def test_teacher_forced_alignment_with_a_cheating_model():
    tokens_np = gw.sample_sequences(5, 6, seed=4)
    pred = gw_eval.teacher_forced_frames(Cheat(), torch.from_numpy(tokens_np), TASK, chunk=5)
    cells, _ = gw.split_frames(tokens_np)
    assert pred.shape == (5, 5, 25)
    assert np.array_equal(pred, cells[:, 1:])


class Echo(nn.Module):
    """prefill/step 'model' that always predicts AGENT: checks the imagination loop's plumbing."""

    def init_state(self, b, max_len=None):
        return {"n": 0}

    def prefill(self, tokens, state):
        return F.one_hot(torch.full((tokens.shape[0],), gw.NORTH), gw.VOCAB_SIZE).float() + \
            F.one_hot(torch.full((tokens.shape[0],), gw.AGENT), gw.VOCAB_SIZE).float() * 0.5, state

    def step(self, tok, state):
        state["n"] += 1
        return F.one_hot(torch.full_like(tok, gw.AGENT), gw.VOCAB_SIZE).float(), state


def test_imagination_generates_cells_only():
    ctx = torch.from_numpy(gw.sample_sequences(3, 2, seed=0))[:, :26]
    cells, t_pre, t_gen = gw_eval.imagine_frame(Echo(), ctx, TASK, max_len=52)
    # the action logit (NORTH) is the largest after prefill, but generated tokens are restricted to cells
    assert cells.shape == (3, 25) and (cells == gw.AGENT).all()
    assert t_pre >= 0 and t_gen >= 0


@pytest.mark.parametrize("backbone", ["gru", "transformer"])
def test_branched_imagination_matches_fresh_prefills(backbone):
    torch.manual_seed(0)
    model = GridWorldLM(backbone, gw.VOCAB_SIZE, 16, 2).eval()
    tokens = torch.from_numpy(gw.sample_sequences(3, 5, seed=2))
    got = gw_eval.imagine_frames(model, tokens, TASK, [1, 3, 4], max_len=tokens.shape[1])
    assert got.shape == (3, 3, 25)
    for k, t in enumerate([1, 3, 4]):
        want, _, _ = gw_eval.imagine_frame(model, tokens[:, :t * 26], TASK, max_len=tokens.shape[1])
        assert np.array_equal(got[:, k], want)


def test_frame_positions_include_last():
    assert gw_eval._frame_positions(64, 8)[-1] == 63 and gw_eval._frame_positions(64, 8)[0] == 1
    assert gw_eval._frame_positions(2, 8) == [1]


def test_lr_schedule():
    cfg = make_config(steps=100, warmup=10, lr=1.0)
    assert harness.lr_at(0, cfg) == pytest.approx(0.1)
    assert harness.lr_at(9, cfg) == pytest.approx(1.0)
    assert harness.lr_at(10, cfg) == pytest.approx(1.0)
    assert harness.lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    lrs = [harness.lr_at(i, cfg) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_presets_and_overrides():
    cpu, paper = make_config("cpu"), make_config("paper", seq_len=208)
    assert cpu.steps == RunConfig().steps and cpu.preset == "cpu" and cpu.backbone == "mamba2"
    assert paper.d_model == 512 and paper.n_layers == 2 and paper.seq_len == 208 and paper.preset == "paper"
    # per-backbone preset options, with the user's options merged over them
    assert cpu.backbone_options == {"headdim": 16}
    assert make_config(backbone="gru").backbone_options == {}
    assert make_config(backbone_options={"d_state": 8}).backbone_options == {"headdim": 16, "d_state": 8}
    assert make_config(backbone_options={"headdim": 32}).backbone_options == {"headdim": 32}
    assert make_config(steps=None).steps == RunConfig().steps      # None = keep the preset's value
    # the automatic batch keeps the tokens per step constant across lengths
    assert make_config(seq_len=1664).batch_size == 4 and make_config(seq_len=208).batch_size == 32
    assert make_config(seq_len=208, batch_size=5).batch_size == 5
    assert RunConfig(seq_len=208).resolved().batch_size == 32
    # per-backbone run settings of the preset, which explicit values override
    assert make_config(backbone="transformer").lr == 1e-3 and make_config(backbone="mamba").lr == RunConfig().lr
    assert make_config(backbone="transformer", lr=5e-4).lr == 5e-4
    assert make_config("paper", backbone="transformer").lr == 1e-3
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid choices: cpu, paper"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown RunConfig field"):
        make_config(nonsense=1)


@pytest.mark.parametrize("kw, msg", [
    (dict(seq_len=1000), "--len 1000 is not a multiple of the frame length 26; nearest valid lengths: 988, 1014"),
    (dict(seq_len=26), "shorter than 2 frames"),
    (dict(backbone="lstm"), "unknown backbone 'lstm'; valid choices:"),
    (dict(task="chess"), "unknown task 'chess'; valid choices:"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(dtype="fp8"), "unknown dtype 'fp8'"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_check_config_errors(kw, msg):
    with pytest.raises(ValueError) as e:
        harness.check_config(tiny(**kw))
    assert msg in str(e.value) and "\n" not in str(e.value)
