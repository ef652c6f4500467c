"""The grid-world long-sequence task of the Drama paper (section 3.2.3, Table 2, appendix A.6).

World. A square grid of side l_g (default 5). Border cells are walls; the (l_g-2)^2 interior cells hold
one agent and one goal on distinct cells, floor elsewhere. Each step a uniformly random action
(north / east / south / west) moves the agent one cell; a move into a wall leaves it in place. When
the agent reaches the goal, agent and goal both re-spawn on distinct, uniformly random interior cells,
and that frame already shows the new positions ("respawn" frames).

Tokens. A frame is its l_g^2 cells row by row followed by the action taken from it, so a frame is
l_f = l_g^2 + 1 tokens and a sequence of n frames is n * l_f tokens:

    [c_0 ... c_{l_g^2-1} a_0] [c_0 ... a_1] ... [c_0 ... a_{n-1}]       (a_t moves frame t to t+1)

Token ids: cell kinds first (WALL 0, FLOOR 1, AGENT 2, GOAL 3), then actions (NORTH 4, EAST 5,
SOUTH 6, WEST 7); VOCAB_SIZE = 8. Rows grow southwards, columns eastwards.

Error (%), our reading of appendix A.6. For each predicted frame P of a target frame T:
    geometric(P) = some border cell of P is not WALL, or the interior of P does not hold exactly one
                   AGENT, exactly one GOAL and FLOOR everywhere else;
    logic(P)     = geometric(P), or the AGENT cell of P != the AGENT cell of T.
Over N predicted frames, E_g = 100 * #geometric / N, E_l = 100 * #logic / N, and
    Error (%) = (E_g + E_l) / 2.
A.6 calls E_g a "number of boundary cells"; we count frames instead (a frame is wrong or not) so that
E_g is a percentage like E_l. The goal cell only matters through the validity check: A.6's logic error
is about the agent's position alone. Frame 0 is never scored: it has no previous frame and action.

Irreducible floor. A respawn frame's positions are random, so no model can predict it. The oracle
(`oracle_predict`) knows the exact dynamics but not the random re-spawn: it moves the agent, and if the
agent lands on the goal it predicts the agent on that (old goal) cell and the goal on the cell the
agent just left. That frame is valid (E_g = 0) and its agent cell is right with probability
1/(l_g-2)^2, the same as any other guess, so the oracle's error on data is the floor:
about (1 - 1/(l_g-2)^2) * respawn_share / 2.
"""
from __future__ import annotations

import numpy as np

# ---- public token ids: cell kinds first, then actions -------------------------------------------
WALL, FLOOR, AGENT, GOAL = 0, 1, 2, 3
NORTH, EAST, SOUTH, WEST = 4, 5, 6, 7
CELL_TOKENS = (WALL, FLOOR, AGENT, GOAL)
ACTION_TOKENS = (NORTH, EAST, SOUTH, WEST)
VOCAB_SIZE = 8
N_CELL_KINDS = 4
# (d_row, d_col) per action, indexed by token - NORTH
MOVES = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]], dtype=np.int64)

DEFAULT_GRID_SIZE = 5


def check_grid_size(grid_size: int) -> int:
    if not isinstance(grid_size, (int, np.integer)) or isinstance(grid_size, bool) or grid_size < 4:
        raise ValueError(f"grid_size must be an integer >= 4 (an interior of at least 2x2 cells), got {grid_size!r}")
    return int(grid_size)


def frame_len(grid_size: int = DEFAULT_GRID_SIZE) -> int:
    """l_f = l_g^2 + 1 tokens per frame (cells + one action)."""
    return check_grid_size(grid_size) ** 2 + 1


def check_length(n_tokens: int, grid_size: int = DEFAULT_GRID_SIZE, min_frames: int = 1) -> int:
    """Validate a sequence length in tokens (`--len`): a multiple of the frame length l_f holding at least
    `min_frames` frames; returns the number of frames n = L / l_f. The error names the nearest valid ones."""
    l_f = frame_len(grid_size)
    if not isinstance(n_tokens, (int, np.integer)) or isinstance(n_tokens, bool):
        raise ValueError(f"--len must be an integer number of tokens, got {n_tokens!r}")
    n_tokens, shortest = int(n_tokens), min_frames * l_f
    if n_tokens >= shortest and n_tokens % l_f == 0:
        return n_tokens // l_f
    if n_tokens < shortest:
        what = "one frame" if min_frames == 1 else f"{min_frames} frames"
        raise ValueError(f"--len {n_tokens} is shorter than {what} ({shortest} tokens); the shortest valid "
                         f"length is {shortest}, then {shortest + l_f}, ... (multiples of {l_f})")
    lo = (n_tokens // l_f) * l_f
    raise ValueError(f"--len {n_tokens} is not a multiple of the frame length {l_f}; "
                     f"nearest valid lengths: {max(lo, shortest)}, {lo + l_f}")


# ---- sampling --------------------------------------------------------------------------------------

def _random_pair(rng: np.random.Generator, n: int, n_interior: int) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct uniformly random interior cell indices per row: (agent, goal), each (n,)."""
    a = rng.integers(0, n_interior, size=n)
    g = rng.integers(0, n_interior - 1, size=n)
    g = g + (g >= a)  # skip the agent's cell: uniform over the other n_interior - 1 cells
    return a, g


def _render(agent: np.ndarray, goal: np.ndarray, grid_size: int) -> np.ndarray:
    """Frames (..., l_g*l_g) from agent / goal positions (..., 2) in full-grid (row, col) coordinates."""
    lead = agent.shape[:-1]
    base = np.full((grid_size, grid_size), WALL, dtype=np.int64)
    base[1:-1, 1:-1] = FLOOR
    frames = np.broadcast_to(base.reshape(-1), lead + (grid_size * grid_size,)).copy()
    flat = frames.reshape(-1, grid_size * grid_size)
    rows = np.arange(flat.shape[0])
    flat[rows, (agent[..., 0] * grid_size + agent[..., 1]).reshape(-1)] = AGENT
    flat[rows, (goal[..., 0] * grid_size + goal[..., 1]).reshape(-1)] = GOAL
    return frames


def _move(agent: np.ndarray, action: np.ndarray, grid_size: int) -> np.ndarray:
    """Agent positions (..., 2) after action tokens (...,); a move into a wall leaves it in place."""
    moved = agent + MOVES[action - NORTH]
    inside = ((moved >= 1) & (moved <= grid_size - 2)).all(axis=-1, keepdims=True)
    return np.where(inside, moved, agent)


def _transition_table(grid_size: int) -> np.ndarray:
    """T[i, a]: the interior cell index reached from interior cell i by action token NORTH + a."""
    side = grid_size - 2
    rc = np.stack(np.divmod(np.arange(side * side), side), axis=-1) + 1      # (m, 2) full-grid (row, col)
    moved = _move(rc[:, None, :], np.arange(NORTH, WEST + 1)[None, :], grid_size)  # (m, 4, 2)
    return (moved[..., 0] - 1) * side + (moved[..., 1] - 1)


def sample_sequences(batch_size: int, n_frames: int, grid_size: int = DEFAULT_GRID_SIZE, seed=0,
                     return_info: bool = False):
    """Random trajectories as token ids, int64 (batch_size, n_frames * l_f).

    Vectorised over the batch (the only Python loop is over frames, a few array ops each) and
    reproducible: the same (batch_size, n_frames, grid_size, seed) always gives the same array.
    `seed` is anything np.random.default_rng accepts (an int, or a list of ints for seed streams).
    With return_info=True also returns a dict of per-frame arrays:
        respawn (B, n) bool  frame t shows a re-spawn (agent reached the goal from frame t-1)
        agent   (B, n, 2)    agent (row, col); goal (B, n, 2) likewise
        action  (B, n)       the action token that follows frame t
    """
    g_ = check_grid_size(grid_size)
    for name, v in (("batch_size", batch_size), ("n_frames", n_frames)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    B, n, side = int(batch_size), int(n_frames), g_ - 2
    m = side * side                                                   # interior cells
    rng = np.random.default_rng(seed)
    l_f = g_ * g_ + 1

    actions = rng.integers(NORTH, WEST + 1, size=(B, n))
    # re-spawn draws for every frame up front, so the stream does not depend on when the goal is hit
    ra, rg = _random_pair(rng, B * n, m)
    ra, rg = ra.reshape(B, n), rg.reshape(B, n)
    step = _transition_table(g_)                                      # (m, 4)
    a_idx = np.empty((B, n), dtype=np.int64)                          # interior index of the agent
    g_idx = np.empty((B, n), dtype=np.int64)                          # ... and of the goal
    respawn = np.zeros((B, n), dtype=bool)
    a_idx[:, 0], g_idx[:, 0] = ra[:, 0], rg[:, 0]                     # frame 0: a random start
    for t in range(1, n):
        nxt = step[a_idx[:, t - 1], actions[:, t - 1] - NORTH]
        hit = nxt == g_idx[:, t - 1]                                  # reached the goal: both re-spawn
        a_idx[:, t] = np.where(hit, ra[:, t], nxt)
        g_idx[:, t] = np.where(hit, rg[:, t], g_idx[:, t - 1])
        respawn[:, t] = hit

    agent = np.stack(np.divmod(a_idx, side), axis=-1) + 1             # (B, n, 2) full-grid (row, col)
    goal = np.stack(np.divmod(g_idx, side), axis=-1) + 1
    tokens = np.empty((B, n, l_f), dtype=np.int64)
    tokens[:, :, :-1] = _render(agent, goal, g_)
    tokens[:, :, -1] = actions
    tokens = tokens.reshape(B, n * l_f)
    if return_info:
        return tokens, {"respawn": respawn, "agent": agent, "goal": goal, "action": actions}
    return tokens


def split_frames(tokens: np.ndarray, grid_size: int = DEFAULT_GRID_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(B, n*l_f) tokens -> cells (B, n, l_g^2) and actions (B, n)."""
    l_f = frame_len(grid_size)
    tokens = np.asarray(tokens)
    if tokens.shape[-1] % l_f:
        raise ValueError(f"sequence length {tokens.shape[-1]} is not a multiple of the frame length {l_f}")
    t = tokens.reshape(tokens.shape[:-1] + (-1, l_f))
    return t[..., :-1], t[..., -1]


# ---- metric --------------------------------------------------------------------------------------

def _grid_size_of(frames: np.ndarray) -> int:
    side = int(round(np.sqrt(frames.shape[-1])))
    if side * side != frames.shape[-1]:
        raise ValueError(f"a frame must have l_g*l_g cells, got {frames.shape[-1]}")
    return check_grid_size(side)


def _border_mask(grid_size: int) -> np.ndarray:
    m = np.ones((grid_size, grid_size), dtype=bool)
    m[1:-1, 1:-1] = False
    return m.reshape(-1)


def invalid_frames(frames: np.ndarray) -> np.ndarray:
    """Geometric violation per frame, (N, l_g^2) -> (N,) bool (see the module docstring)."""
    frames = np.asarray(frames)
    border = _border_mask(_grid_size_of(frames))
    bad_border = (frames[..., border] != WALL).any(axis=-1)
    inner = frames[..., ~border]
    n_agent = (inner == AGENT).sum(axis=-1)
    n_goal = (inner == GOAL).sum(axis=-1)
    n_floor = (inner == FLOOR).sum(axis=-1)
    bad_inner = (n_agent != 1) | (n_goal != 1) | (n_floor != inner.shape[-1] - 2)
    return bad_border | bad_inner


def frame_errors(pred: np.ndarray, target: np.ndarray, prev: np.ndarray | None = None,
                 action: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-frame error flags for predicted frames, all arrays batched over N frames.

    pred, target (N, l_g^2) cell tokens; prev (N, l_g^2) the true frame before target and action (N,)
    the action token taken from it (optional). Returns bool arrays (N,):
        geometric    the predicted frame violates the grid's structure
        logic        geometric, or the predicted agent cell differs from the target's
        predictable  (only with prev and action) the target is what the dynamics give without a
                     re-spawn, i.e. a perfect model could predict it
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must both be (N, l_g*l_g), got {pred.shape} and {target.shape}")
    geometric = invalid_frames(pred)
    # with exactly one AGENT in a valid frame, argmax of the indicator is its cell
    wrong_agent = (pred == AGENT).argmax(axis=-1) != (target == AGENT).argmax(axis=-1)
    out = {"geometric": geometric, "logic": geometric | wrong_agent}
    if prev is not None and action is not None:
        prev, action = np.asarray(prev), np.asarray(action)
        if prev.shape != pred.shape or action.shape != pred.shape[:1]:
            raise ValueError(f"prev must be {pred.shape} and action ({pred.shape[0]},), "
                             f"got {prev.shape} and {action.shape}")
        out["predictable"] = ~respawned(prev, action)
    return out


def error_percent(geometric: np.ndarray, logic: np.ndarray) -> dict[str, float]:
    """E_g %, E_l % and Error % = mean(E_g, E_l) from per-frame flags (appendix A.6)."""
    geometric, logic = np.asarray(geometric, dtype=bool), np.asarray(logic, dtype=bool)
    if geometric.size == 0:
        raise ValueError("error_percent needs at least one frame")
    e_g = 100.0 * float(geometric.mean())
    e_l = 100.0 * float(logic.mean())
    return {"E_g": e_g, "E_l": e_l, "error": 0.5 * (e_g + e_l)}


# ---- oracle --------------------------------------------------------------------------------------

def _positions(frames: np.ndarray, kind: int, grid_size: int) -> np.ndarray:
    idx = (frames == kind).argmax(axis=-1)
    return np.stack([idx // grid_size, idx % grid_size], axis=-1)


def oracle_predict(prev: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Perfect dynamics without knowledge of re-spawns: (N, l_g^2) frames, (N,) actions -> (N, l_g^2).

    The agent moves (walls block). If it lands on the goal, the re-spawned positions are random, so
    the oracle predicts a valid frame with the agent on the old goal cell and the goal on the cell
    the agent left (right with probability 1/(l_g-2)^2, like any other guess).
    """
    prev, action = np.asarray(prev), np.asarray(action)
    g_ = _grid_size_of(prev)
    if action.shape != prev.shape[:1] or not np.isin(action, ACTION_TOKENS).all():
        raise ValueError(f"action must be (N,) action tokens {ACTION_TOKENS}, got shape {action.shape}")
    agent, goal = _positions(prev, AGENT, g_), _positions(prev, GOAL, g_)
    nxt = _move(agent, action, g_)
    hit = (nxt == goal).all(axis=-1, keepdims=True)
    return _render(nxt, np.where(hit, agent, goal), g_)


def respawned(prev: np.ndarray, action: np.ndarray) -> np.ndarray:
    """(N,) bool: `action` takes the agent of `prev` onto the goal, so the next frame's positions are random."""
    g_ = _grid_size_of(np.asarray(prev))
    agent, goal = _positions(np.asarray(prev), AGENT, g_), _positions(np.asarray(prev), GOAL, g_)
    return (_move(agent, np.asarray(action), g_) == goal).all(axis=-1)


# ---- the task object the harness and the registry use ----------------------------------------------

class GridWorldTask:
    """What the harness needs: vocabulary, frame layout, sampling, metric and oracle."""

    name = "gridworld"
    vocab_size = VOCAB_SIZE
    cell_tokens = CELL_TOKENS
    action_tokens = ACTION_TOKENS

    def __init__(self, grid_size: int = DEFAULT_GRID_SIZE):
        self.grid_size = check_grid_size(grid_size)
        self.n_cells = self.grid_size ** 2          # tokens generated per frame
        self.frame_len = self.n_cells + 1           # l_f

    def check_length(self, n_tokens: int, min_frames: int = 1) -> int:
        return check_length(n_tokens, self.grid_size, min_frames)

    def sample(self, batch_size: int, n_frames: int, seed: int = 0, return_info: bool = False):
        return sample_sequences(batch_size, n_frames, self.grid_size, seed, return_info=return_info)

    frame_errors = staticmethod(frame_errors)
    error_percent = staticmethod(error_percent)
    oracle_predict = staticmethod(oracle_predict)

    def split_frames(self, tokens):
        return split_frames(tokens, self.grid_size)

    def __repr__(self) -> str:
        return f"GridWorldTask(grid_size={self.grid_size}, frame_len={self.frame_len}, vocab_size={self.vocab_size})"


def _register() -> None:
    from wmbench.core.registry import register_task
    register_task("gridworld", GridWorldTask)


_register()
