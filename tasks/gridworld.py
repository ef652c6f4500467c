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

Memory variants. In the task above every frame shows the whole state, so the next frame depends only on
the current frame and the action: a model needs no memory, and backbones do not separate. A variant
keeps the world, the random draws and the token layout, and changes only what a frame *shows*: one
object is drawn only on the frames where it (re)appears, frame 0 and the re-spawn frames ("shown"
frames); on every other frame its cell shows FLOOR.
    full        the task above: everything is drawn on every frame (the default).
    goal_once   the goal is hidden after it appears. The agent's move is still visible, but whether
                the next step reaches the goal (and so re-spawns both) depends on where the goal was
                drawn, up to hundreds of frames back: a retrieval memory.
    agent_once  the agent is hidden after it appears. Where it is now is its spawn cell moved by every
                action since, each clipped at the walls: an integration (state-tracking) memory.
What is predicted and scored. With an object hidden, the drawn frame says almost nothing a model must
remember (the hidden cell is FLOOR whatever the past), so scoring drawn frames would not test memory.
In a variant the model reads the drawn frames (the observations) and predicts the *state*: the full
frame of the next step, hidden object included, exactly the frames of `full` with the same seed. The
A.6 metric above is applied to these state frames, with one change: logic(P) also fails when the
hidden object's cell is wrong, so in goal_once logic(P) = geometric(P), or the agent cell or the goal
cell of P differs from T's (in agent_once the hidden object is the agent, which A.6 already scores).
A frame is *predictable* when it is not a re-spawn frame: there the past observations determine the
state exactly, and any error is a failure to remember.

Floors. The oracle is `oracle_predict` on the true previous state: it knows the rules and the hidden
state, not the re-spawn draw. It is exact on predictable frames and writes a valid frame on re-spawn
frames, right with probability q (its agent guess, or in goal_once its (agent, goal) pair, against a
uniform draw over the m = (l_g-2)^2 interior cells):
    q = 1/m (full, agent_once),  q = 1/(m(m-1)) (goal_once);   floor = 100 * (1 - q) * r / 2 %,
with r the share of re-spawn frames (`floor_pct`). In the long run r is 1 / (mean number of steps a
uniformly random walk takes from a uniform (agent, goal) pair to the goal), computed exactly by
`respawn_rate`; `respawn_share` gives its expectation over frames 1..n-1 of an n-frame sequence.
A reference without memory (`fit_memoryless` / `memoryless_predict`) predicts from the previous
observation and action alone: the dynamics when that frame shows everything, else the most frequent
next state seen after that (observation, action) in a separate sample. In `full` it equals the oracle;
in a variant its distance above the floor is what memory is worth.
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
# 4: the smallest interior (2x2) that holds an agent and a goal with room to move. 16: a frame is then
# 257 tokens, so the longest benchmarked sequence (16,384 tokens) holds only 63 frames, while the walk
# needs 577 steps per re-spawn on average (`respawn_rate`): too few re-spawns to measure a floor on.
MIN_GRID_SIZE, MAX_GRID_SIZE = 4, 16

# the variants (module docstring): the cell kind each one hides between the frames that show it
VARIANTS = {"full": None, "goal_once": GOAL, "agent_once": AGENT}
DEFAULT_VARIANT = "full"


def check_grid_size(grid_size: int) -> int:
    if (not isinstance(grid_size, (int, np.integer)) or isinstance(grid_size, bool)
            or not MIN_GRID_SIZE <= grid_size <= MAX_GRID_SIZE):
        raise ValueError(f"the grid side l_g (--grid) must be an integer from {MIN_GRID_SIZE} (a 2x2 interior) "
                         f"to {MAX_GRID_SIZE}, got {grid_size!r}")
    return int(grid_size)


def check_variant(variant: str) -> str:
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
    return variant


def tracked_kinds(variant: str = DEFAULT_VARIANT) -> tuple[int, ...]:
    """The cell kinds whose position the logic error checks: A.6's agent, plus the kind the variant hides."""
    hidden = VARIANTS[check_variant(variant)]
    return (AGENT,) if hidden in (None, AGENT) else (AGENT, hidden)


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
                     return_info: bool = False, variant: str = DEFAULT_VARIANT):
    """Random trajectories as token ids, int64 (batch_size, n_frames * l_f): the frames as `variant` draws them.

    Vectorised over the batch (the only Python loop is over frames, a few array ops each) and
    reproducible: the same (batch_size, n_frames, grid_size, seed) always gives the same array.
    `seed` is anything np.random.default_rng accepts (an int, or a list of ints for seed streams).
    The variant does not touch the random draws: every variant has the world of `full` with that seed.
    With return_info=True also returns a dict of per-frame arrays:
        respawn (B, n) bool  frame t shows a re-spawn (agent reached the goal from frame t-1)
        shown   (B, n) bool  frame t draws the variant's hidden kind (frame 0 and re-spawn frames)
        agent   (B, n, 2)    agent (row, col); goal (B, n, 2) likewise
        action  (B, n)       the action token that follows frame t
        state   (B, n*l_f)   the full frames (the tokens of `full`; the same array when variant is full)
    """
    g_ = check_grid_size(grid_size)
    check_variant(variant)
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
    state = tokens.reshape(B, n * l_f)
    shown = respawn.copy()
    shown[:, 0] = True
    tokens = observe(state, shown, variant, g_)
    if return_info:
        return tokens, {"respawn": respawn, "shown": shown, "agent": agent, "goal": goal, "action": actions,
                        "state": state}
    return tokens


def observe(state: np.ndarray, shown: np.ndarray, variant: str, grid_size: int = DEFAULT_GRID_SIZE) -> np.ndarray:
    """What a variant draws: state tokens (..., n*l_f) with the hidden kind's cell turned to FLOOR on every
    frame where shown (..., n) is False. `full` returns `state` itself (no copy)."""
    hidden = VARIANTS[check_variant(variant)]
    if hidden is None:
        return state
    state, shown = np.asarray(state), np.asarray(shown, dtype=bool)
    per_token = np.repeat(shown, frame_len(grid_size), axis=-1)
    if per_token.shape != state.shape:
        raise ValueError(f"shown {shown.shape} does not give one flag per frame of state {state.shape}")
    return np.where((state == hidden) & ~per_token, FLOOR, state)


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
                 action: np.ndarray | None = None, variant: str = DEFAULT_VARIANT) -> dict[str, np.ndarray]:
    """Per-frame error flags for predicted frames, all arrays batched over N frames.

    pred, target (N, l_g^2) cell tokens of full (state) frames; prev (N, l_g^2) the true state frame
    before target and action (N,) the action token taken from it (optional). Returns bool arrays (N,):
        geometric    the predicted frame violates the grid's structure
        logic        geometric, or the predicted agent cell differs from the target's (in goal_once,
                     or the goal cell: `tracked_kinds`)
        predictable  (only with prev and action) the target is what the dynamics give without a
                     re-spawn, i.e. a perfect model could predict it
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must both be (N, l_g*l_g), got {pred.shape} and {target.shape}")
    geometric = invalid_frames(pred)
    logic = geometric.copy()
    for kind in tracked_kinds(variant):
        # with exactly one cell of the kind in a valid frame, argmax of the indicator is that cell
        logic |= (pred == kind).argmax(axis=-1) != (target == kind).argmax(axis=-1)
    out = {"geometric": geometric, "logic": logic}
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


# ---- floors ------------------------------------------------------------------------------------------

def oracle_hit_probability(grid_size: int = DEFAULT_GRID_SIZE, variant: str = DEFAULT_VARIANT) -> float:
    """q: the chance that the oracle's (valid) guess of a re-spawn frame passes the logic check. The new
    pair is uniform over the m(m-1) ordered (agent, goal) pairs of distinct interior cells, so one
    guessed agent cell is right with probability 1/m, a guessed (agent, goal) pair with 1/(m(m-1))."""
    m = (check_grid_size(grid_size) - 2) ** 2
    return 1.0 / m if len(tracked_kinds(variant)) == 1 else 1.0 / (m * (m - 1))


def floor_pct(respawn_share: float, grid_size: int = DEFAULT_GRID_SIZE, variant: str = DEFAULT_VARIANT) -> float:
    """The oracle's expected Error (%) on frames of which a share `respawn_share` are re-spawns:
    E_g = 0 (it always writes a valid frame), E_l = (1 - q) * share, Error = (E_g + E_l) / 2."""
    return 100.0 * (1.0 - oracle_hit_probability(grid_size, variant)) * float(respawn_share) / 2.0


def respawn_rate(grid_size: int = DEFAULT_GRID_SIZE) -> float:
    """Re-spawns per step in the long run, exactly: 1 / E[h], with h the number of uniformly random steps
    the agent takes from a uniform (agent, goal) pair until it steps onto the goal (every re-spawn starts
    such a walk afresh, so re-spawns form a renewal process). Per goal cell g the hitting times solve
    (I - Q_g) h = 1, with Q_g the walk's transition matrix among the cells other than g."""
    step = _transition_table(check_grid_size(grid_size))              # (m, 4)
    m = step.shape[0]
    P = np.zeros((m, m))
    np.add.at(P, (np.repeat(np.arange(m), 4), step.reshape(-1)), 0.25)
    total = 0.0
    for g in range(m):
        keep = np.arange(m) != g
        h = np.linalg.solve(np.eye(m - 1) - P[np.ix_(keep, keep)], np.ones(m - 1))
        total += h.sum()
    return 1.0 / (total / (m * (m - 1)))


def respawn_share(grid_size: int, n_frames: int) -> float:
    """The expected share of re-spawn frames among frames 1..n-1 of an n-frame sequence (frame 0 is a fresh
    uniform pair): the distribution over (agent, goal) pairs pushed through the walk frame by frame, its
    mass on the goal re-spawned uniformly. Tends to `respawn_rate` as n grows."""
    step = _transition_table(check_grid_size(grid_size))
    m = step.shape[0]
    if not isinstance(n_frames, (int, np.integer)) or n_frames < 2:
        raise ValueError(f"n_frames must be an integer >= 2 (frame 0 is never scored), got {n_frames!r}")
    goal = np.tile(np.arange(m), m)                                    # flat index a * m + g
    dest = step[np.repeat(np.arange(m), m)] * m + goal[:, None]        # (m*m, 4) pair after each action
    fresh = np.full((m, m), 1.0 / (m * (m - 1)))
    np.fill_diagonal(fresh, 0.0)
    p, hits = fresh.reshape(-1), 0.0
    for _ in range(int(n_frames) - 1):
        p = np.bincount(dest.reshape(-1), weights=np.repeat(p / 4, 4), minlength=m * m)
        hit = p.reshape(m, m).trace()                                  # the agent stands on the goal
        hits += hit
        p = p * (goal != np.repeat(np.arange(m), m)) + hit * fresh.reshape(-1)
    return hits / (int(n_frames) - 1)


# ---- a reference without memory -------------------------------------------------------------------------

def _transitions(observed: np.ndarray, state: np.ndarray, grid_size: int):
    """(previous observed frame (N, c), action (N,), next state frame (N, c)) over frames 1..n-1."""
    obs_cells, actions = split_frames(observed, grid_size)
    state_cells, _ = split_frames(state, grid_size)
    c = obs_cells.shape[-1]
    return (obs_cells[..., :-1, :].reshape(-1, c), actions[..., :-1].reshape(-1),
            state_cells[..., 1:, :].reshape(-1, c))


def fit_memoryless(observed: np.ndarray, state: np.ndarray, grid_size: int = DEFAULT_GRID_SIZE) -> dict:
    """The memoryless reference's table, counted on sequences (B, n*l_f) as observed and as they are:
    for each (previous observation that hides an object, action), the most frequent next state frame
    (ties go to the lowest token row, so the table is deterministic). Observations that show everything
    need no table: the dynamics (`oracle_predict`) are the best memoryless guess there."""
    prev, act, nxt = _transitions(observed, state, grid_size)
    partial = invalid_frames(prev)
    c = prev.shape[-1]
    rows = np.ascontiguousarray(np.concatenate([prev[partial], act[partial, None], nxt[partial]], axis=1),
                                dtype=np.int8)                    # token ids < 8: one byte each
    if not len(rows):
        return {}
    # unique over whole rows as byte strings (far faster than np.unique(axis=0)); the sort is bytewise,
    # so the rows of one key are contiguous
    _, first_seen, counts = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))).ravel(),
                                      return_index=True, return_counts=True)
    rows = rows[first_seen].astype(np.int64)
    key_id = np.cumsum(np.r_[True, (rows[1:, :c + 1] != rows[:-1, :c + 1]).any(axis=1)]) - 1
    order = np.lexsort((-counts, key_id))                        # per key, the most frequent row first
    first = order[np.r_[True, key_id[order][1:] != key_id[order][:-1]]]
    return {rows[i, :c + 1].tobytes(): rows[i, c + 1:].copy() for i in first}


def _fill_missing(prev: np.ndarray) -> np.ndarray:
    """Observations with an absent AGENT or GOAL given one on the first free interior cell (a valid guess)."""
    out = prev.copy()
    for kind in (AGENT, GOAL):
        rows = np.flatnonzero(~(out == kind).any(axis=-1))
        out[rows, (out[rows] == FLOOR).argmax(axis=-1)] = kind
    return out


def memoryless_predict(table: dict, prev: np.ndarray, action: np.ndarray) -> np.ndarray:
    """The memoryless reference: (N, l_g^2) previous observations, (N,) actions -> (N, l_g^2) state frames.
    The dynamics where the observation shows everything; else the table's frame for (observation, action),
    or, for a pair the fitting sample never saw, the dynamics from a fixed guess of the absent object."""
    prev, action = np.asarray(prev), np.asarray(action)
    partial = invalid_frames(prev)
    out = oracle_predict(_fill_missing(prev), action)
    keys = np.concatenate([prev, action[:, None]], axis=1).astype(np.int64)
    for i in np.flatnonzero(partial):
        hit = table.get(keys[i].tobytes())
        if hit is not None:
            out[i] = hit
    return out


# ---- the task object the harness and the registry use ----------------------------------------------

class GridWorldTask:
    """What the harness needs: vocabulary, frame layout, sampling, metric and oracle."""

    name = "gridworld"
    vocab_size = VOCAB_SIZE
    cell_tokens = CELL_TOKENS
    action_tokens = ACTION_TOKENS

    def __init__(self, grid_size: int = DEFAULT_GRID_SIZE, variant: str = DEFAULT_VARIANT):
        self.grid_size = check_grid_size(grid_size)
        self.variant = check_variant(variant)
        self.hidden_kind = VARIANTS[self.variant]   # None in `full`
        self.n_cells = self.grid_size ** 2          # tokens generated per frame
        self.frame_len = self.n_cells + 1           # l_f

    def check_length(self, n_tokens: int, min_frames: int = 1) -> int:
        return check_length(n_tokens, self.grid_size, min_frames)

    def sample(self, batch_size: int, n_frames: int, seed: int = 0, return_info: bool = False):
        """The observed tokens (what a model reads); see sample_sequences."""
        return sample_sequences(batch_size, n_frames, self.grid_size, seed, return_info=return_info,
                                variant=self.variant)

    def sample_views(self, batch_size: int, n_frames: int, seed: int = 0):
        """(observed tokens, state tokens, shown (B, n)): what a model reads and what it must predict.
        In `full` both are the same array."""
        obs, info = self.sample(batch_size, n_frames, seed, return_info=True)
        return obs, info["state"], info["shown"]

    def frame_errors(self, pred, target, prev=None, action=None):
        return frame_errors(pred, target, prev, action, variant=self.variant)

    def floor_pct(self, respawn_share: float) -> float:
        return floor_pct(respawn_share, self.grid_size, self.variant)

    error_percent = staticmethod(error_percent)
    oracle_predict = staticmethod(oracle_predict)
    memoryless_predict = staticmethod(memoryless_predict)

    def fit_memoryless(self, observed, state) -> dict:
        return fit_memoryless(observed, state, self.grid_size)

    def split_frames(self, tokens):
        return split_frames(tokens, self.grid_size)

    def __repr__(self) -> str:
        return (f"GridWorldTask(grid_size={self.grid_size}, variant={self.variant!r}, frame_len={self.frame_len}, "
                f"vocab_size={self.vocab_size})")


def _register() -> None:
    from wmbench.core.registry import register_task
    register_task("gridworld", GridWorldTask)


_register()
