"""The grid-world task: dynamics against an independent step function, the A.6 metric, the oracle."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wmbench
from wmbench.tasks import gridworld as gw

W, F, A, G = gw.WALL, gw.FLOOR, gw.AGENT, gw.GOAL
N, E, S, Wst = gw.NORTH, gw.EAST, gw.SOUTH, gw.WEST


# ---- an independent reference: one frame at a time, plain Python on a 2-D grid ------------------------

def find(grid, kind):
    return [(r, c) for r in range(len(grid)) for c in range(len(grid)) if grid[r][c] == kind]


def is_valid(grid) -> bool:
    n = len(grid)
    for r in range(n):
        for c in range(n):
            if (r in (0, n - 1) or c in (0, n - 1)) and grid[r][c] != W:
                return False
    inner = [grid[r][c] for r in range(1, n - 1) for c in range(1, n - 1)]
    return inner.count(A) == 1 and inner.count(G) == 1 and inner.count(F) == len(inner) - 2


def ref_step(grid, action):
    """-> (next grid or None if the agent reached the goal (re-spawn), whether the move was blocked)."""
    (r, c), = find(grid, A)
    dr, dc = {N: (-1, 0), E: (0, 1), S: (1, 0), Wst: (0, -1)}[action]
    tr, tc = r + dr, c + dc
    if grid[tr][tc] == W:
        return [row[:] for row in grid], True
    if grid[tr][tc] == G:
        return None, False
    nxt = [row[:] for row in grid]
    nxt[r][c], nxt[tr][tc] = F, A
    return nxt, False


def frame(agent, goal, n=5):
    g = [[W] * n for _ in range(n)]
    for r in range(1, n - 1):
        for c in range(1, n - 1):
            g[r][c] = F
    g[agent[0]][agent[1]] = A
    g[goal[0]][goal[1]] = G
    return np.array(g, dtype=np.int64).reshape(-1)


# ---- sampling -----------------------------------------------------------------------------------------

def test_token_ids_cells_first_then_actions():
    assert (W, F, A, G) == (0, 1, 2, 3) and (N, E, S, Wst) == (4, 5, 6, 7)
    assert gw.VOCAB_SIZE == 8 and gw.frame_len(5) == 26 and gw.frame_len(4) == 17


@pytest.mark.parametrize("grid_size", [5, 4, 6])
def test_dynamics_match_independent_step(grid_size):
    B, n = 48, 60
    tokens, info = gw.sample_sequences(B, n, grid_size=grid_size, seed=3, return_info=True)
    l_f = grid_size ** 2 + 1
    assert tokens.shape == (B, n * l_f) and tokens.dtype == np.int64
    seen_block = seen_respawn = seen_move = 0
    for b in range(B):
        seq = tokens[b].reshape(n, l_f)
        grids = [seq[t, :-1].reshape(grid_size, grid_size).tolist() for t in range(n)]
        assert np.isin(seq[:, -1], gw.ACTION_TOKENS).all()
        assert not info["respawn"][b, 0]
        for t in range(n):
            assert is_valid(grids[t]), (b, t)
            assert find(grids[t], A) == [tuple(info["agent"][b, t])]
            assert find(grids[t], G) == [tuple(info["goal"][b, t])]
        for t in range(n - 1):
            nxt, blocked = ref_step(grids[t], int(seq[t, -1]))
            if nxt is None:                     # reached the goal: new random positions, flagged
                seen_respawn += 1
                assert info["respawn"][b, t + 1]
            else:
                seen_block += blocked
                seen_move += not blocked
                assert not info["respawn"][b, t + 1]
                assert nxt == grids[t + 1], (b, t)
    assert seen_block > 0 and seen_respawn > 0 and seen_move > 0


def test_respawn_positions_cover_the_interior():
    _, info = gw.sample_sequences(512, 64, seed=5, return_info=True)
    r = info["respawn"]
    ag, go = info["agent"][r], info["goal"][r]
    assert len(ag) > 500
    assert (ag != go).any(axis=-1).all()
    # every interior cell is used by both agent and goal after re-spawns
    assert len({tuple(p) for p in ag}) == 9 and len({tuple(p) for p in go}) == 9


def test_actions_uniform():
    _, info = gw.sample_sequences(256, 64, seed=11, return_info=True)
    freq = np.bincount(info["action"].reshape(-1) - N, minlength=4) / info["action"].size
    assert np.allclose(freq, 0.25, atol=0.01)


def test_seeding_reproducible():
    a = gw.sample_sequences(8, 10, seed=7)
    assert np.array_equal(a, gw.sample_sequences(8, 10, seed=7))
    assert not np.array_equal(a, gw.sample_sequences(8, 10, seed=8))
    # seeds may be any default_rng seed, e.g. the harness's [seed, stream, step] lists
    assert np.array_equal(gw.sample_sequences(4, 5, seed=[1, 0, 2]), gw.sample_sequences(4, 5, seed=[1, 0, 2]))


def test_sampling_is_vectorised():
    gw.sample_sequences(8, 64, seed=0)
    t0 = time.perf_counter()
    gw.sample_sequences(2048, 64, seed=0)
    assert time.perf_counter() - t0 < 2.0  # ~0.07 s measured; a per-sequence Python loop takes far longer


@pytest.mark.parametrize("kwargs", [dict(batch_size=0, n_frames=3), dict(batch_size=2, n_frames=0),
                                    dict(batch_size=2, n_frames=3, grid_size=3),
                                    dict(batch_size=2.5, n_frames=3)])
def test_sample_bad_input(kwargs):
    with pytest.raises(ValueError):
        gw.sample_sequences(**kwargs)


def test_check_length_messages():
    assert gw.check_length(1664) == 64 and gw.check_length(208) == 8 and gw.check_length(26) == 1
    with pytest.raises(ValueError, match=r"^--len 1000 is not a multiple of the frame length 26; "
                                         r"nearest valid lengths: 988, 1014$"):
        gw.check_length(1000)
    with pytest.raises(ValueError, match="shortest valid length is 26, then 52"):
        gw.check_length(5)
    with pytest.raises(ValueError, match="frame length 17"):
        gw.check_length(20, grid_size=4)


# ---- the A.6 metric --------------------------------------------------------------------------------

def test_frame_errors_hand_built_cases():
    prev = frame((2, 2), (1, 3))
    target = frame((2, 3), (1, 3))                      # moved east
    missing_wall = target.copy()
    missing_wall[0] = F
    wrong_cell = frame((3, 2), (1, 3))                  # a valid frame, agent elsewhere
    two_agents = target.copy()
    two_agents[3 * 5 + 3] = A
    no_goal = target.copy()
    no_goal[1 * 5 + 3] = F
    goal_elsewhere = frame((2, 3), (3, 1))              # agent right, goal wrong: A.6 scores the agent only
    pred = np.stack([target, missing_wall, wrong_cell, two_agents, no_goal, goal_elsewhere])
    k = len(pred)
    fe = gw.frame_errors(pred, np.stack([target] * k), np.stack([prev] * k), np.full(k, E))
    assert fe["geometric"].tolist() == [False, True, False, True, True, False]
    assert fe["logic"].tolist() == [False, True, True, True, True, False]
    assert fe["predictable"].all()


def test_frame_errors_flags_respawn_as_unpredictable():
    prev = frame((2, 2), (2, 3))
    target = frame((1, 1), (3, 3))                      # the agent stepped east onto the goal
    fe = gw.frame_errors(target[None], target[None], prev[None], np.array([E]))
    assert fe["predictable"].tolist() == [False]
    assert "predictable" not in gw.frame_errors(target[None], target[None])


def test_error_percent_hand_computed():
    geo = np.array([True, False, False, False])
    log = np.array([True, True, False, False])
    out = gw.error_percent(geo, log)
    assert out == {"E_g": 25.0, "E_l": 50.0, "error": 37.5}
    with pytest.raises(ValueError):
        gw.error_percent(np.zeros(0, bool), np.zeros(0, bool))


def test_frame_errors_shape_checks():
    with pytest.raises(ValueError):
        gw.frame_errors(np.zeros((2, 25), int), np.zeros((3, 25), int))
    with pytest.raises(ValueError):
        gw.frame_errors(np.zeros((2, 24), int), np.zeros((2, 24), int))
    f = np.stack([frame((1, 1), (2, 2))] * 2)
    with pytest.raises(ValueError, match="prev must be"):
        gw.frame_errors(f, f, f[:1], np.array([E, E]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=25, max_size=25), st.integers(1, 3), st.integers(1, 3))
def test_frame_errors_properties(cells, r, c):
    pred = np.array(cells, dtype=np.int64)[None]
    target = frame((r, c), (1, 1) if (r, c) != (1, 1) else (3, 3))[None]
    fe = gw.frame_errors(pred, target)
    assert not (fe["geometric"] & ~fe["logic"]).any()            # an invalid frame is always a logic failure
    assert fe["geometric"][0] == (not is_valid(pred.reshape(5, 5).tolist()))
    if not fe["geometric"][0]:
        assert fe["logic"][0] == (find(pred.reshape(5, 5).tolist(), A) != [(r, c)])


# ---- the oracle --------------------------------------------------------------------------------------

def test_oracle_is_the_floor():
    tokens, info = gw.sample_sequences(256, 64, seed=2, return_info=True)
    cells, actions = gw.split_frames(tokens)
    prev, tgt, act = cells[:, :-1].reshape(-1, 25), cells[:, 1:].reshape(-1, 25), actions[:, :-1].reshape(-1)
    orc = gw.oracle_predict(prev, act)
    respawn = info["respawn"][:, 1:].reshape(-1)
    assert np.array_equal(orc[~respawn], tgt[~respawn])          # exact on every predictable frame
    fe = gw.frame_errors(orc, tgt, prev, act)
    assert np.array_equal(~fe["predictable"], respawn)
    assert not fe["geometric"].any()                              # it always writes a valid frame
    # on re-spawn frames its agent cell is right about 1 time in 9
    hit = 1 - fe["logic"][respawn].mean()
    assert 0.06 < hit < 0.17
    err = gw.error_percent(fe["geometric"], fe["logic"])["error"]
    assert err == pytest.approx(50 * fe["logic"].mean())
    assert 1.0 < err < 5.0


def test_oracle_on_goal_reach_and_walls():
    prev = np.stack([frame((2, 2), (2, 3)), frame((1, 1), (3, 3))])
    out = gw.oracle_predict(prev, np.array([E, N]))
    assert np.array_equal(out[0], frame((2, 3), (2, 2)))         # agent on the old goal, goal where it was
    assert np.array_equal(out[1], prev[1])                       # blocked by the wall
    with pytest.raises(ValueError):
        gw.oracle_predict(prev, np.array([E, 0]))


def test_registered_task():
    task = wmbench.get_task("gridworld")()
    assert "gridworld" in wmbench.list_tasks()
    assert (task.vocab_size, task.frame_len, task.n_cells) == (8, 26, 25)
    assert task.sample(2, 3, seed=1).shape == (2, 78)
    assert task.check_length(208) == 8
