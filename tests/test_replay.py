"""Replay buffer: ring storage, window sampling across the wrap, DFS probabilities, checkpoints."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from wmbench.agent.replay import DFSConfig, ReplayBuffer, make_replay

OBS = (4, 4, 3)


def filled(capacity, n, sampler="uniform", dfs=None, seed=0, replace=False):
    """Buffer where transition t (0-based, in insertion order) has action t and obs value t % 256."""
    rb = ReplayBuffer(capacity, OBS, sampler=sampler, dfs=dfs, seed=seed, replace=replace)
    for t in range(n):
        rb.add(np.full(OBS, t % 256, np.uint8), t, float(t), t % 7 == 6, life_lost=t % 5 == 4,
               is_last=t % 7 == 6)
    return rb


# ---------------------------------------------------------------- storage and windows

def test_ring_overwrites_oldest():
    rb = filled(10, 25)
    assert len(rb) == 10 and rb.ptr == 5 and rb.n_added == 25
    assert sorted(rb.action.tolist()) == list(range(15, 25))
    assert rb.action[rb.oldest] == 15


def test_windows_are_consecutive_and_never_cross_the_write_head():
    rb = filled(10, 25)  # physical slots hold t = 20..24, 15..19: the head sits between 24 and 15
    seen = set()
    for _ in range(200):
        b = rb.sample(3, 4)
        a = b["action"]
        assert np.all(np.diff(a, axis=1) == 1)           # contiguous in time (wrap at slot 9 -> 0 ok)
        assert a.min() >= 15 and a.max() <= 24           # only stored transitions
        seen.update(a[:, 0].tolist())
    assert seen == set(range(15, 22))                    # every valid start, and only those
    b = rb.sample(2, 4)
    assert np.array_equal(b["obs"][..., 0, 0, 0], b["action"] % 256)
    assert np.array_equal(b["reward"], b["action"].astype(np.float32))
    assert np.array_equal(b["termination"], b["action"] % 7 == 6)
    assert np.array_equal(b["life_lost"], b["action"] % 5 == 4)
    assert b["obs"].shape == (2, 4) + OBS and b["obs"].dtype == np.uint8


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 40), n=st.integers(1, 120), L=st.integers(1, 12), B=st.integers(1, 6),
       sampler=st.sampled_from(["uniform", "dfs"]))
def test_window_property(capacity, n, L, B, sampler):
    rb = filled(capacity, n, sampler=sampler)
    size = min(n, capacity)
    if L > size:
        with pytest.raises(ValueError):
            rb.sample(B, L)
        return
    a = rb.sample(B, L)["action"]
    assert a.shape == (B, L)
    assert np.all(np.diff(a, axis=1) == 1)
    assert a.min() >= n - size and a.max() <= n - 1


def test_without_replacement_when_possible():
    rb = filled(50, 50)
    for sampler in ("uniform", "dfs"):
        rb.sampler = sampler
        starts = rb.sample(43, 8)["action"][:, 0]          # 43 valid starts, all drawn once
        assert sorted(starts.tolist()) == list(range(43))
    rb = filled(10, 10)
    assert rb.sample(20, 8)["action"].shape == (20, 8)    # 3 starts < 20: falls back to replacement


def test_bad_arguments():
    with pytest.raises(ValueError, match="uniform, dfs"):
        ReplayBuffer(10, OBS, sampler="prioritized")
    rb = ReplayBuffer(10, OBS)
    with pytest.raises(ValueError, match="uint8"):
        rb.add(np.zeros(OBS, np.float32), 0, 0.0, False)
    with pytest.raises(ValueError, match="seq_len"):
        rb.sample(1, 2)
    with pytest.raises(ValueError, match="window, start"):
        DFSConfig(count="all")


# ---------------------------------------------------------------- DFS

def softmax_ref(x):
    e = [np.exp(xi - max(x)) for xi in x]
    return np.array(e) / sum(e)


def dfs_buffer(cfg, v, b, capacity=None, n=None):
    n = n if n is not None else len(v)
    rb = filled(capacity or n, n, sampler="dfs", dfs=cfg)
    rb.wm_count[:] = v
    rb.img_count[:] = b
    return rb


def test_dfs_probabilities_paper_formula():
    v = np.array([0, 1, 2, 5, 3, 0, 4, 1])
    b = np.array([0, 3, 1, 5, 9, 2, 0, 1])
    rb = dfs_buffer(DFSConfig(), v, b)
    L = 3
    starts, p = rb.probabilities(L)
    assert starts.tolist() == list(range(6))
    assert np.allclose(p, softmax_ref([-x for x in v[:6]]))
    _, p_img = rb.probabilities(L, imagination=True)
    # f = v - b - max(0, v - b), by hand: v-b = [0,-2,1,0,-6,-2] -> f = [0,-2,0,0,-6,-2]
    assert np.allclose(p_img, softmax_ref([0, -2, 0, 0, -6, -2]))


def test_dfs_probabilities_official_options():
    v = np.array([0, 1, 2, 5, 30, 0, 4, 1, 7, 2])
    b = np.array([0, 64, 320, 0, 2000, 128, 0, 64, 1000, 5])
    cfg = DFSConfig.official(batch_size=16, imagine_batch_size=1024)
    assert (cfg.tau, cfg.tau_img, cfg.img_scale, cfg.count) == (10.0, 10.0, 64.0, "start")
    rb = dfs_buffer(cfg, v, b)
    _, p = rb.probabilities(2)
    assert np.allclose(p, softmax_ref([-x / 10 for x in v[:9]]))
    _, p_img = rb.probabilities(2, imagination=True)
    bs = b[:9] / 64
    f = [vi - bi - max(0.0, vi - bi) for vi, bi in zip(v[:9], bs)]
    assert np.allclose(p_img, softmax_ref([x / 10 for x in f]))
    # alpha / beta weights as in the code's score
    cfg2 = DFSConfig(alpha=0.5, beta=2.0)
    _, p2 = dfs_buffer(cfg2, v, b).probabilities(2, imagination=True)
    f2 = [vi - 0.5 * bi - 2.0 * max(0, vi - bi) for vi, bi in zip(v[:9], b[:9])]
    assert np.allclose(p2, softmax_ref(f2))


def test_dfs_probabilities_follow_logical_order_after_wrap():
    rb = filled(6, 9, sampler="dfs", dfs=DFSConfig())   # physical slots hold t = 6,7,8,3,4,5; oldest slot 3
    rb.wm_count[:] = [10, 11, 12, 0, 1, 2]
    starts, p = rb.probabilities(2)
    assert starts.tolist() == [3, 4, 5, 0, 1]
    assert np.allclose(p, softmax_ref([0, -1, -2, -10, -11]))


def test_dfs_counters_window_vs_start():
    for count, per_window in (("window", 4), ("start", 1)):
        rb = filled(30, 30, sampler="dfs", dfs=DFSConfig(count=count))
        b = rb.sample(5, 4)
        assert rb.wm_count.sum() == 5 * per_window and rb.img_count.sum() == 0
        want = np.zeros(30, int)
        np.add.at(want, b["index"].ravel() if count == "window" else b["index"][:, 0], 1)
        assert np.array_equal(rb.wm_count, want)
        rb.sample(7, 3, imagination=True)
        assert rb.img_count.sum() == 7 * (3 if count == "window" else 1)


def test_dfs_prefers_unvisited_and_avoids_overimagined():
    rb = filled(20, 20, sampler="dfs", dfs=DFSConfig())
    rb.wm_count[:] = 50
    rb.wm_count[[2, 7]] = 0                  # softmax(-v): mass e^-50 elsewhere
    assert sorted(rb.sample(2, 3)["index"][:, 0].tolist()) == [2, 7]
    rb.wm_count[:] = 5
    rb.img_count[:] = 60
    rb.img_count[[4, 9, 11]] = 0             # f = min(0, v - b): 0 there, -55 elsewhere
    assert sorted(rb.sample(3, 3, imagination=True)["index"][:, 0].tolist()) == [4, 9, 11]


def test_overwrite_resets_counters():
    rb = filled(5, 5, sampler="dfs")
    rb.wm_count[:] = 7
    rb.img_count[:] = 3
    rb.add(np.zeros(OBS, np.uint8), 0, 0.0, False)
    assert rb.wm_count[0] == 0 and rb.img_count[0] == 0 and rb.wm_count[1] == 7


def test_uniform_sampler_is_uniform():
    rb = filled(12, 12)
    _, p = rb.probabilities(4)
    assert np.allclose(p, 1 / 9)
    counts = np.bincount(np.concatenate([rb.sample(1, 4)["action"][:, 0] for _ in range(1800)]), minlength=9)
    assert counts.min() > 120 and counts.max() < 280  # ~200 each
    assert rb.wm_count.sum() > 0  # counters are kept for either sampler (cheap; useful for logs)


def test_make_replay_modes():
    cfg = make_replay("uniform", capacity=10).config()
    assert cfg["sampler"] == "uniform" and cfg["capacity"] == 10 and cfg["dfs"]["count"] == "start"
    # the default is what produced the paper's numbers: the official code's settings
    assert make_replay("dfs", capacity=10).dfs == DFSConfig.official() == ReplayBuffer(10).dfs
    assert make_replay("dfs", capacity=10, dfs_mode="literal").dfs == DFSConfig()
    assert make_replay("dfs", capacity=10, dfs_mode="official", imagine_batch_size=256).dfs.img_scale == 16
    assert make_replay("dfs", capacity=10, tau=3.0).dfs.tau == 3.0
    with pytest.raises(ValueError):
        make_replay(dfs_mode="codeish")


# ---------------------------------------------------------------- the paper's scale

def drive_like_xs(mode: str | None = None, env_steps: int = 3000, sampler: str = "dfs"):
    """The replay buffer as the training loop drives it at XS: capacity 100k, 1,032 warm-up steps, then
    per env step one 16 x 128 world-model batch and one 1024 x 8 imagination batch. Returns the buffer,
    the (step, wm ESS, img ESS) of every update and the RuntimeWarnings raised. mode None: the default."""
    kw = {} if mode is None else {"dfs_mode": mode}
    rb = make_replay(sampler, capacity=100_000, batch_size=16, imagine_batch_size=1024, seed=0, **kw)
    frame = np.zeros((64, 64, 3), np.uint8)
    ess = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, env_steps + 1):
            rb.add(frame, t % 6, 0.0, False)
            if len(rb) <= 1032:
                continue
            row = [t]
            for B, L, img in ((16, 128, False), (1024, 8, True)):
                p = rb.probabilities(L, imagination=img)[1] if t % 97 == 0 else None
                idx = rb.sample_indices(B, L, imagination=img)
                assert idx.shape == (B, L)
                stats = getattr(rb, "last_stats", {}).get("img" if img else "wm", {})
                if not stats.get("with_replacement", 0):
                    assert len(np.unique(idx[:, 0])) == B
                if p is not None and stats:   # the logged ESS is 1 / sum(p^2) of the probabilities it drew from
                    assert stats.get("ess") == pytest.approx(1.0 / float(np.sum(p * p)), rel=1e-9)
                row.append(stats.get("ess"))
            ess.append(tuple(row))
    return rb, ess, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_default_dfs_survives_the_paper_schedule_with_a_spread_out_sampler():
    """The default crashed at env step ~1164 of `wmbench atari --game Krull` (softmax underflow)."""
    rb, ess, warned = drive_like_xs()
    assert rb.dfs == DFSConfig.official(16, 1024)
    assert len(ess) == 3000 - 1032 and not warned
    assert min(e[1] for e in ess) >= 64 and min(e[2] for e in ess) >= 64
    # start-only counting: exactly 16 world-model and 1024 imagination counts per update
    assert rb.wm_count.sum() == 16 * len(ess) and rb.img_count.sum() == 1024 * len(ess)


def test_literal_formula_never_raises_and_warns_once_when_it_collapses():
    rb, ess, warned = drive_like_xs("literal")
    assert rb.dfs == DFSConfig() and len(ess) == 3000 - 1032
    assert len(warned) == 1 and "with replacement" in str(warned[0].message)
    # the collapse that the warning and the logged ESS report: ~1 effective start out of thousands
    assert ess[-1][1] < 8 and ess[-1][2] < 8


def test_uniform_sampler_at_the_paper_scale():
    _, ess, warned = drive_like_xs(env_steps=1500, sampler="uniform")
    assert not warned
    assert all(wm == t - 128 + 1 and img == t - 8 + 1 for t, wm, img in ess)   # ESS = number of starts


def test_softmax_in_log_space_is_exact_and_safe():
    from wmbench.agent.replay import _softmax
    x = np.array([0.0, -1.0, -2000.0, -1e6])
    p = _softmax(x)
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-12
    assert np.allclose(p[:2], softmax_ref([0.0, -1.0])) and p[2] == 0 and p[3] == 0
    assert np.allclose(_softmax(np.array([1e6, 1e6])), [0.5, 0.5])


def test_ess_and_counter_stats_hand_case():
    rb = filled(6, 6, sampler="dfs", dfs=DFSConfig(count="start"))
    rb.wm_count[:] = [0, 0, 50, 50, 50, 50]          # L=2: 5 starts, mass on the first two
    rb.sample_indices(1, 2)
    assert abs(rb.last_stats["wm"]["ess"] - 2.0) < 1e-6 and rb.last_stats["wm"]["starts"] == 5
    assert rb.last_stats["wm"]["max_count"] == 50


# ---------------------------------------------------------------- checkpointing

def _same_next_samples(a, b):
    for kw in ({}, {"imagination": True}):
        x, y = a.sample(6, 5, **kw), b.sample(6, 5, **kw)
        for k in x:
            assert np.array_equal(x[k], y[k]), k
    assert np.array_equal(a.wm_count, b.wm_count) and np.array_equal(a.img_count, b.img_count)


@pytest.mark.parametrize("n", [17, 40])  # not full / wrapped
def test_state_round_trip(n, tmp_path):
    rb = filled(30, n, sampler="dfs", seed=5)
    for _ in range(3):
        rb.sample(4, 5)
        rb.sample(8, 3, imagination=True)
    sd = rb.state_dict()
    assert all(isinstance(x, np.ndarray) for x in sd.values())
    # through npz without pickle, and through safetensors
    np.savez(tmp_path / "r.npz", **sd)
    with np.load(tmp_path / "r.npz", allow_pickle=False) as z:
        sd_npz = {k: z[k] for k in z.files}
    from safetensors.numpy import load_file, save_file
    save_file({k: np.ascontiguousarray(x) for k, x in sd.items()}, str(tmp_path / "r.safetensors"))
    sd_st = load_file(str(tmp_path / "r.safetensors"))
    for loaded in (sd_npz, sd_st):
        other = ReplayBuffer(30, OBS, sampler="dfs", seed=999)
        other.load_state_dict(loaded)
        assert (other.ptr, other.size, other.n_added) == (rb.ptr, rb.size, rb.n_added)
        ref = ReplayBuffer(30, OBS, sampler="dfs")
        ref.load_state_dict(sd)
        _same_next_samples(ref, other)
    other = ReplayBuffer(30, OBS, sampler="dfs")
    other.load_state_dict(sd_st)
    _same_next_samples(rb, other)  # and the original continues identically
    rb.add(np.zeros(OBS, np.uint8), 1, 1.0, False)
    other.add(np.zeros(OBS, np.uint8), 1, 1.0, False)
    assert rb.ptr == other.ptr and np.array_equal(rb.action, other.action)


def test_load_state_rejects_mismatch():
    sd = filled(30, 10).state_dict()
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(20, OBS).load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        ReplayBuffer(30, OBS).load_state_dict({k: v for k, v in sd.items() if k != "rng"})
    bad = dict(sd, action=sd["action"][:3])
    with pytest.raises(ValueError, match="shape"):
        ReplayBuffer(30, OBS).load_state_dict(bad)
