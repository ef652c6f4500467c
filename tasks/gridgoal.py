"""gridgoal: the Drama grid world as a pixel game, so the agent's learning can be checked on CPU.

Rules (those of `wmbench.tasks.gridworld`): an l_g x l_g grid whose border cells are walls, an
(l_g-2) x (l_g-2) interior holding one agent and one goal on distinct cells. Actions 0..3 =
north, east, south, west move the agent one cell; a move into a wall leaves it in place.
Reaching the goal gives reward +1, and agent and goal re-spawn on distinct, uniformly random
interior cells (the returned frame already shows the new positions). There is no game over: an
episode is truncated after a fixed `episode_length` steps.

Observation: 64x64x3 uint8, each cell a (64 // l_g)-pixel square block of its kind's colour, the
grid centred, any margin wall-coloured.

Defaults: l_g = 4 (a 2x2 interior) and 100 steps, chosen so that an optimal policy earns ~5x
the random policy (the calibration the learning check "reach 2x random" was written for). The
expected returns are computed exactly (`expected_return`: a Markov chain over the n(n-1)
(agent, goal) placements), and Monte Carlo agrees (tests):
    l_g  interior  random  optimal  optimal/random    (E[return] over 100 steps)
     4     2x2      15.02    74.94      4.99          <- default
     5     3x3       5.91    49.85      8.44          (the paper's grid-world size)
     6     4x4       3.10    37.30     12.03
The ratio barely depends on the episode length (it is ~ the random policy's mean hitting time
over the optimal mean distance), so only the grid size moves it. `grid_size=5` gives the
paper's 5x5 world with the same rules.

API like tasks/atari.py's AtariEnv: reset(seed) -> obs, info; step(a) -> obs, reward,
terminated, truncated, info, with the same info keys (lives 0, life_lost False, ...).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from wmbench.tasks.gridworld import AGENT, FLOOR, GOAL, MOVES, WALL

GRID_SIZE = 4  # see the table above: 4 gives optimal ~5x random
EPISODE_LENGTH = 100
IMAGE_SIZE = 64
N_ACTIONS = 4
ACTION_MEANINGS = ("NORTH", "EAST", "SOUTH", "WEST")  # rows grow southwards, as in gridworld.py
# RGB per cell kind (indexed by the gridworld token ids WALL/FLOOR/AGENT/GOAL = 0..3)
COLOURS = np.zeros((4, 3), np.uint8)
COLOURS[WALL] = (40, 40, 40)
COLOURS[FLOOR] = (210, 210, 210)
COLOURS[AGENT] = (220, 40, 40)
COLOURS[GOAL] = (40, 180, 60)


def _interior(grid_size: int) -> np.ndarray:
    """(n, 2) interior cells (row, col), row-major."""
    r = np.arange(1, grid_size - 1)
    return np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)


@lru_cache(maxsize=8)
def _background(grid_size: int, image_size: int) -> np.ndarray:
    """The empty grid (walls + floor) as pixels; agent and goal blocks are painted on a copy."""
    cell = image_size // grid_size
    if cell < 1:
        raise ValueError(f"image_size must be >= grid_size, got {image_size} < {grid_size}")
    kinds = np.full((grid_size, grid_size), FLOOR, np.int64)
    kinds[0, :] = kinds[-1, :] = kinds[:, 0] = kinds[:, -1] = WALL
    pad = (image_size - cell * grid_size) // 2
    img = np.empty((image_size, image_size, 3), np.uint8)
    img[:] = COLOURS[WALL]  # any margin reads as more wall
    block = np.repeat(np.repeat(COLOURS[kinds], cell, 0), cell, 1)  # (cell*l_g, cell*l_g, 3)
    img[pad:pad + cell * grid_size, pad:pad + cell * grid_size] = block
    img.flags.writeable = False
    return img


def render(agent, goal, grid_size: int = GRID_SIZE, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(image_size, image_size, 3) uint8 picture of the grid; agent/goal are (row, col)."""
    img = _background(grid_size, image_size).copy()
    cell = image_size // grid_size
    pad = (image_size - cell * grid_size) // 2
    for (r, c), kind in ((goal, GOAL), (agent, AGENT)):
        img[pad + r * cell:pad + (r + 1) * cell, pad + c * cell:pad + (c + 1) * cell] = COLOURS[kind]
    return img


def greedy_action(agent, goal) -> int:
    """Optimal move: close the row gap first, then the column gap (Manhattan, no obstacles)."""
    dr, dc = goal[0] - agent[0], goal[1] - agent[1]
    if dr < 0:
        return 0  # north
    if dr > 0:
        return 2  # south
    return 1 if dc > 0 else 3  # east / west


class GridGoalEnv:
    """The pixel grid world with a fixed episode length (see module docstring)."""

    game = "gridgoal"

    def __init__(self, seed: int = 0, episode_length: int = EPISODE_LENGTH,
                 grid_size: int = GRID_SIZE, image_size: int = IMAGE_SIZE):
        import gymnasium as gym
        if int(episode_length) < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        if int(grid_size) < 4:
            raise ValueError(f"grid_size must be >= 4 (an interior of at least 2x2), got {grid_size}")
        self.episode_length = int(episode_length)
        self.grid_size = int(grid_size)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.num_actions = N_ACTIONS
        self.action_meanings = list(ACTION_MEANINGS)
        self.action_space = gym.spaces.Discrete(N_ACTIONS, seed=self.seed)
        self.observation_space = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self._cells = _interior(self.grid_size)
        self._rng = np.random.default_rng(self.seed)
        self._needs_reset = True
        self.protocol = self.config()

    def config(self) -> dict[str, Any]:
        return {"name": "gridgoal", "grid_size": self.grid_size, "episode_length": self.episode_length,
                "image_size": self.image_size}

    def _spawn(self) -> None:
        i, j = self._rng.choice(len(self._cells), size=2, replace=False)
        self.agent, self.goal = self._cells[i].copy(), self._cells[j].copy()

    def _obs(self) -> np.ndarray:
        return render(self.agent, self.goal, self.grid_size, self.image_size)

    def _info(self) -> dict[str, Any]:
        return {"lives": 0, "life_lost": False, "done_for_learning": False,
                "episode_frame": self._steps, "episode_step": self._steps,
                "episode_return": self._return}

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.seed = int(seed)
            self._rng = np.random.default_rng(self.seed)
            self.action_space.seed(self.seed)
        self._spawn()
        self._steps, self._return = 0, 0.0
        self._needs_reset = False
        return self._obs(), self._info()

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (the episode has ended)")
        a = int(action)
        if not 0 <= a < N_ACTIONS:
            raise ValueError(f"action must be in [0, {N_ACTIONS}) (north, east, south, west), got {action!r}")
        nxt = self.agent + MOVES[a]
        if 1 <= nxt[0] <= self.grid_size - 2 and 1 <= nxt[1] <= self.grid_size - 2:
            self.agent = nxt  # else: blocked by the wall
        reward = 0.0
        if np.array_equal(self.agent, self.goal):
            reward = 1.0
            self._spawn()
        self._steps += 1
        self._return += reward
        truncated = self._steps >= self.episode_length
        self._needs_reset = truncated
        return self._obs(), reward, False, truncated, self._info()

    def sample_action(self) -> int:
        return int(self.action_space.sample())

    def optimal_action(self) -> int:
        return greedy_action(self.agent, self.goal)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# reference returns, exactly

@lru_cache(maxsize=None)
def expected_return(policy: str = "random", episode_length: int = EPISODE_LENGTH,
                    grid_size: int = GRID_SIZE) -> float:
    """Exact E[return] of 'random' (uniform actions) or 'optimal' (greedy) over one episode.

    Markov chain over the n(n-1) placements s = (agent, goal); d_0 uniform; reaching the goal
    pays 1 and re-draws s uniformly. E[return] = sum_t d_t . R with d_{t+1} = d_t T.
    """
    if policy not in ("random", "optimal"):
        raise ValueError(f"policy must be 'random' or 'optimal', got {policy!r}")
    cells = _interior(grid_size)
    n = len(cells)
    index = {tuple(c): k for k, c in enumerate(cells)}
    states = [(i, j) for i in range(n) for j in range(n) if i != j]
    sid = {s: k for k, s in enumerate(states)}
    S = len(states)
    T = np.zeros((S, S))
    R = np.zeros(S)
    for k, (i, j) in enumerate(states):
        if policy == "random":
            acts = [(a, 1.0 / N_ACTIONS) for a in range(N_ACTIONS)]
        else:
            acts = [(greedy_action(cells[i], cells[j]), 1.0)]
        for a, pa in acts:
            nxt = cells[i] + MOVES[a]
            i2 = index.get(tuple(nxt), i)  # a wall leaves the agent in place
            if i2 == j:
                R[k] += pa
                T[k] += pa / S  # respawn uniformly
            else:
                T[k, sid[(i2, j)]] += pa
    d = np.full(S, 1.0 / S)
    total = 0.0
    for _ in range(int(episode_length)):
        total += d @ R
        d = d @ T
    return float(total)


RANDOM_RETURN = expected_return("random")
OPTIMAL_RETURN = expected_return("optimal")
