"""gridgoal: rendering, rules, rewards, episode length, random vs optimal returns."""
from __future__ import annotations

import numpy as np
import pytest

from wmbench.tasks import gridgoal as gg
from wmbench.tasks.gridworld import AGENT, FLOOR, GOAL, WALL


def decode(img, grid_size):
    """Pixels -> cell kinds, by the colour at each cell's centre (independent of render's code)."""
    cell = img.shape[0] // grid_size
    pad = (img.shape[0] - cell * grid_size) // 2
    kinds = np.empty((grid_size, grid_size), int)
    for r in range(grid_size):
        for c in range(grid_size):
            px = img[pad + r * cell + cell // 2, pad + c * cell + cell // 2]
            matches = [k for k in range(4) if np.array_equal(px, gg.COLOURS[k])]
            assert len(matches) == 1
            kinds[r, c] = matches[0]
    return kinds


def test_colours_distinct():
    cols = {tuple(c) for c in gg.COLOURS}
    assert len(cols) == 4


@pytest.mark.parametrize("grid_size", [4, 5, 6])
def test_render_matches_state(grid_size):
    env = gg.GridGoalEnv(seed=3, grid_size=grid_size)
    obs, _ = env.reset()
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    for _ in range(30):
        k = decode(obs, grid_size)
        border = np.concatenate([k[0], k[-1], k[:, 0], k[:, -1]])
        assert np.all(border == WALL)
        assert k[tuple(env.agent)] == AGENT and k[tuple(env.goal)] == GOAL
        assert (k == AGENT).sum() == 1 and (k == GOAL).sum() == 1
        assert (k == FLOOR).sum() == (grid_size - 2) ** 2 - 2
        # whole blocks: every pixel of the agent's cell has the agent colour
        cell = 64 // grid_size
        pad = (64 - cell * grid_size) // 2
        r, c = env.agent
        block = obs[pad + r * cell:pad + (r + 1) * cell, pad + c * cell:pad + (c + 1) * cell]
        assert np.all(block == gg.COLOURS[AGENT])
        obs, *_ = env.step(env.sample_action())


def place(env, agent, goal):
    env.agent, env.goal = np.array(agent), np.array(goal)


def test_moves_and_wall_blocking():
    env = gg.GridGoalEnv(grid_size=5)
    env.reset(seed=0)
    place(env, (1, 1), (3, 3))
    for a, want in ((0, (1, 1)), (3, (1, 1)), (1, (1, 2)), (2, (2, 2)), (2, (3, 2)), (2, (3, 2))):
        _, r, term, trunc, _ = env.step(a)
        assert tuple(env.agent) == want and r == 0.0 and not term
    assert gg.ACTION_MEANINGS == ("NORTH", "EAST", "SOUTH", "WEST")


def test_goal_reward_and_respawn():
    env = gg.GridGoalEnv(seed=1)
    env.reset()
    firsts = set()
    for _ in range(50):
        place(env, (1, 1), (1, 2))
        obs, r, term, trunc, info = env.step(1)  # east onto the goal
        assert r == 1.0 and not term
        assert not np.array_equal(env.agent, env.goal)
        for p in (env.agent, env.goal):
            assert 1 <= p[0] <= env.grid_size - 2 and 1 <= p[1] <= env.grid_size - 2
        k = decode(obs, env.grid_size)  # the returned frame already shows the new positions
        assert k[tuple(env.agent)] == AGENT and k[tuple(env.goal)] == GOAL
        firsts.add((tuple(env.agent), tuple(env.goal)))
        if info["episode_step"] >= env.episode_length - 1:
            env.reset()
    assert len(firsts) > 5  # respawn is random


def test_fixed_episode_length_and_info():
    env = gg.GridGoalEnv(seed=2, episode_length=37)
    _, info = env.reset()
    assert info == {"lives": 0, "life_lost": False, "done_for_learning": False, "episode_frame": 0,
                    "episode_step": 0, "episode_return": 0.0}
    total = 0.0
    for t in range(37):
        _, r, term, trunc, info = env.step(env.optimal_action())
        total += r
        assert not term and trunc == (t == 36) and not info["done_for_learning"]
    assert info["episode_return"] == total > 0
    with pytest.raises(RuntimeError):
        env.step(0)
    env.reset()
    with pytest.raises(ValueError, match="north, east, south, west"):
        env.step(4)
    with pytest.raises(ValueError):
        gg.GridGoalEnv(episode_length=0)


def test_seeding_reproducible():
    def roll(seed):
        env = gg.GridGoalEnv(seed=seed)
        obs, _ = env.reset()
        out = [obs]
        for _ in range(20):
            out.append(env.step(env.sample_action())[0])
        return np.stack(out)
    assert np.array_equal(roll(4), roll(4)) and not np.array_equal(roll(4), roll(5))


def test_greedy_is_shortest_path():
    cells = gg._interior(5)
    env = gg.GridGoalEnv(grid_size=5)
    env.reset()
    for a in cells:
        for g in cells:
            if np.array_equal(a, g):
                continue
            place(env, a, g)
            steps = 0
            while True:
                steps += 1
                if env.step(env.optimal_action())[1] == 1.0:
                    break
            assert steps == abs(a - g).sum()
            env.reset()


def mean_return(policy: str = "random", episodes: int = 200, seed: int = 0, **env_kwargs) -> float:
    """Monte Carlo mean return of 'random' or 'optimal' over `episodes` episodes (a check)."""
    env = gg.GridGoalEnv(seed=seed, **env_kwargs)
    total = 0.0
    for e in range(episodes):
        env.reset(seed=seed + e) if e == 0 else env.reset()
        done = False
        while not done:
            a = env.sample_action() if policy == "random" else env.optimal_action()
            _, _, term, trunc, info = env.step(a)
            done = term or trunc
        total += info["episode_return"]
    return total / episodes



@pytest.mark.parametrize("grid_size", [4, 5])
def test_exact_returns_match_monte_carlo(grid_size):
    for policy, tol in (("random", 0.8), ("optimal", 0.6)):
        exact = gg.expected_return(policy, 100, grid_size)
        mc = mean_return(policy, episodes=300, seed=11, grid_size=grid_size)
        assert abs(mc - exact) < tol, (policy, mc, exact)


def test_reference_returns_and_ratio():
    assert gg.RANDOM_RETURN == pytest.approx(15.02, abs=0.01)
    assert gg.OPTIMAL_RETURN == pytest.approx(74.94, abs=0.01)
    assert 4.5 < gg.OPTIMAL_RETURN / gg.RANDOM_RETURN < 5.5   # "optimal gets ~5x random"
    # the paper-size 5x5 world is ~8.4x; the ratio hardly moves with the episode length
    def ratio(length, g):
        return gg.expected_return("optimal", length, g) / gg.expected_return("random", length, g)
    assert ratio(100, 5) == pytest.approx(8.44, abs=0.01)
    assert ratio(50, 4) == pytest.approx(4.98, abs=0.01)


def test_same_api_as_atari():
    from wmbench.tasks.atari import make_env
    env = make_env("GridGoal", seed=0, episode_length=10)
    assert isinstance(env, gg.GridGoalEnv) and env.episode_length == 10
    assert env.observation_space.shape == (64, 64, 3) and env.action_space.n == 4
    from wmbench.tasks.atari import INFO_KEYS  # the Atari wrapper's keys (checked in test_atari)
    assert tuple(env.reset()[1]) == INFO_KEYS and tuple(env.step(0)[4]) == INFO_KEYS
