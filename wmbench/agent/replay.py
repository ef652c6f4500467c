"""Replay buffer of uint8 frames with contiguous-window sampling: uniform or DFS (Drama, s2.4).

Storage is a ring of `capacity` transitions (o_t, a_t, r_t, term_t, life_lost_t, is_last_t), where
r_t and term_t result from taking a_t at o_t (the official code's layout; the observation after the
last step of an episode is not stored). `term_t` is the learner's termination target
(`info["done_for_learning"]` of tasks/atari.py); `is_last_t` marks the last transition of an
episode (game over or truncation). Windows may span episode boundaries, as in the official code:
the termination flags tell the world model where one ended.

Windows. `sample(B, L)` draws B start positions and returns B windows of L consecutive transitions
in time order. Positions are "logical": 0 is the oldest stored transition, so a window starting at
k covers physical slots (oldest + k + [0..L)) % capacity. The valid starts are k in [0, n - L],
so a window may wrap around the end of the array (which is contiguous in time) but never crosses
the write head, where the newest transition sits next to the oldest (overwritten) one.

DFS (Dynamic Frequency-based Sampling). Per transition i the buffer keeps
    v_i  how often i was used to train the world model
    b_i  how often i was used as imagination context
and draws window starts with
    world model:  p = softmax(-v / tau)
    imagination:  p = softmax(f / tau_img),  f = v - alpha * b~ - beta * max(0, v - b~),  b~ = b / img_scale
With alpha = beta = 1, f = min(0, v - b~): starts the world model has seen at least as often as
imagination has are uniform; the others are penalised by how far imagination ran ahead.

Two modes (`DFS_MODES`):
- "official" (the default): what produced the paper's Atari100k numbers, the official code's
  settings (drama-official-code.md s5): temperature 10 for both samplers, b divided by
  ImagineBatchSize / BatchSize (1024 / 16 = 64), and only the *start* of a window counted.
- "literal": section 2.4 as printed: temperature 1, no scaling of b, every transition of a window
  counted. At the paper's shapes one update adds 16 x 128 counts to v and 1024 x 8 to b, so within
  ~100 updates f(v, b) reaches -thousands and nearly all probability sits on a handful of starts.
  It stays available, numerically safe: probabilities come from a log-space softmax, and when
  fewer than B starts have non-zero probability the batch is drawn with replacement (one warning).

Both draw the B starts of a batch without replacement when they can. Counters are reset when a
slot is overwritten. `last_stats` holds, per sampler, the effective sample size 1 / sum(p^2) of the
last draw and the largest counter, so a collapsing sampler is visible in the training logs.

Checkpointing: `state_dict()` returns only numpy arrays (storage, counters, pointers and the
sampler's RNG state), so it can be written with safetensors / np.savez without pickle.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

SAMPLERS = ("uniform", "dfs")
COUNT_MODES = ("window", "start")
DFS_MODES = ("official", "literal")


@dataclass(frozen=True)
class DFSConfig:
    """DFS knobs; the field defaults are section 2.4's formula as printed ("literal" mode)."""
    tau: float = 1.0            # world-model temperature: softmax(-v / tau)
    tau_img: float = 1.0        # imagination temperature: softmax(f / tau_img)
    img_scale: float = 1.0      # b is divided by this (code: ImagineBatchSize / BatchSize = 64)
    alpha: float = 1.0          # f = v - alpha * b - beta * max(0, v - b)
    beta: float = 1.0
    count: str = "window"       # "window": count every transition of a window; "start": its start only

    def __post_init__(self):
        if self.count not in COUNT_MODES:
            raise ValueError(f"DFS count must be one of {', '.join(COUNT_MODES)}, got {self.count!r}")
        if not (self.tau > 0 and self.tau_img > 0 and self.img_scale > 0):
            raise ValueError("DFS tau, tau_img and img_scale must be positive")

    @classmethod
    def official(cls, batch_size: int = 16, imagine_batch_size: int = 1024) -> "DFSConfig":
        """The official code's settings (configure.yaml Tau/ImaginationTau 10, Alpha/Beta 1)."""
        return cls(tau=10.0, tau_img=10.0, img_scale=imagine_batch_size / batch_size,
                   alpha=1.0, beta=1.0, count="start")

    @classmethod
    def from_mode(cls, mode: str, batch_size: int = 16, imagine_batch_size: int = 1024) -> "DFSConfig":
        if mode == "official":
            return cls.official(batch_size, imagine_batch_size)
        if mode == "literal":
            return cls()
        raise ValueError(f"unknown DFS mode {mode!r}; valid choices: {', '.join(DFS_MODES)}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    """softmax in log space: exp(x - logsumexp(x)); never NaN for finite input (tiny terms become 0)."""
    m = logits.max()
    lse = m + np.log(np.exp(logits - m).sum())
    return np.exp(logits - lse)


class ReplayBuffer:
    def __init__(self, capacity: int = 100_000, obs_shape: tuple = (64, 64, 3),
                 sampler: str = "dfs", dfs: DFSConfig | None = None, replace: bool = False,
                 seed: int = 0):
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid choices: {', '.join(SAMPLERS)}")
        self.capacity = int(capacity)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.sampler = sampler
        self.dfs = dfs if dfs is not None else DFSConfig.official()
        self.replace = bool(replace)
        N = self.capacity
        # np.zeros maps pages lazily: a 100k x 64x64x3 buffer costs memory only as it fills
        self.obs = np.zeros((N,) + self.obs_shape, np.uint8)
        self.action = np.zeros(N, np.int64)
        self.reward = np.zeros(N, np.float32)
        self.termination = np.zeros(N, bool)
        self.life_lost = np.zeros(N, bool)
        self.is_last = np.zeros(N, bool)
        self.wm_count = np.zeros(N, np.int64)   # v
        self.img_count = np.zeros(N, np.int64)  # b
        self.ptr = 0          # next slot to write
        self.size = 0         # stored transitions
        self.n_added = 0      # transitions ever added
        self.rng = np.random.Generator(np.random.PCG64(seed))
        # per sampler ("wm", "img"): ESS of the last draw, its number of starts, the largest counter
        self.last_stats: dict[str, dict[str, float]] = {}
        self._warned_replacement = False

    def config(self) -> dict:
        """Settings for run records / resume checks (not the contents)."""
        return {"capacity": self.capacity, "obs_shape": list(self.obs_shape), "sampler": self.sampler,
                "replace": self.replace, "dfs": dataclasses.asdict(self.dfs)}

    # ------------------------------------------------------------------ writing
    def __len__(self) -> int:
        return self.size

    def add(self, obs, action: int, reward: float, termination: bool, life_lost: bool = False,
            is_last: bool = False) -> None:
        obs = np.asarray(obs)
        if obs.shape != self.obs_shape or obs.dtype != np.uint8:
            raise ValueError(f"obs must be uint8 of shape {self.obs_shape}, got {obs.dtype} {obs.shape}")
        i = self.ptr
        self.obs[i] = obs
        self.action[i] = int(action)
        self.reward[i] = float(reward)
        self.termination[i] = bool(termination)
        self.life_lost[i] = bool(life_lost)
        self.is_last[i] = bool(is_last)
        self.wm_count[i] = self.img_count[i] = 0  # a new transition: never sampled
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.n_added += 1

    # ------------------------------------------------------------------ sampling
    @property
    def oldest(self) -> int:
        """Physical slot of the oldest stored transition (logical position 0)."""
        return (self.ptr - self.size) % self.capacity

    def num_starts(self, seq_len: int) -> int:
        """Number of valid window starts for length `seq_len`."""
        return max(self.size - int(seq_len) + 1, 0)

    def _starts_phys(self, seq_len: int) -> np.ndarray:
        M = self.num_starts(seq_len)
        return (self.oldest + np.arange(M)) % self.capacity  # (M,) physical slot of each start

    def _logical(self, a: np.ndarray, M: int) -> np.ndarray:
        """a[(oldest + k) % capacity] for k < M, by two slices (no index arithmetic over M)."""
        o = self.oldest
        return np.concatenate((a[o:], a[:o]))[:M] if o else a[:M]

    def probabilities(self, seq_len: int, imagination: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(physical start slots (M,), their sampling probabilities (M,)) for the current sampler."""
        return self._starts_phys(seq_len), self._probs(seq_len, imagination)

    def _probs(self, seq_len: int, imagination: bool) -> np.ndarray:
        M = self.num_starts(seq_len)
        if M == 0:
            raise ValueError(f"need at least seq_len={seq_len} stored transitions, have {self.size}")
        if self.sampler == "uniform":
            return np.full(M, 1.0 / M)
        d = self.dfs
        v = self._logical(self.wm_count, M).astype(np.float64)      # (M,) v of each start
        if not imagination:
            return _softmax(v * (-1.0 / d.tau))
        b = self._logical(self.img_count, M) * (1.0 / d.img_scale)  # (M,) scaled b
        f = v - d.alpha * b - d.beta * np.maximum(0.0, v - b)
        return _softmax(f * (1.0 / d.tau_img))

    def sample(self, batch_size: int, seq_len: int, imagination: bool = False,
               obs_out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """B windows of L consecutive transitions: {obs (B,L,*obs_shape) uint8, action (B,L) int64,
        reward (B,L) float32, termination / life_lost / is_last (B,L) bool, index (B,L) slots}.

        `imagination=True` draws imagination contexts (DFS: softmax(f(v, b))) and counts them in b;
        otherwise world-model windows (DFS: softmax(-v)) counted in v. `obs_out`: a reusable
        (B, L, *obs_shape) uint8 array to gather the frames into (saves page faults on big batches).
        """
        return self.gather(self.sample_indices(batch_size, seq_len, imagination), obs_out)

    def sample_indices(self, batch_size: int, seq_len: int, imagination: bool = False) -> np.ndarray:
        """(B, L) physical slots of B sampled windows; updates the DFS counters and `last_stats`."""
        B, L = int(batch_size), int(seq_len)
        if B < 1 or L < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        M = self.num_starts(L)
        if M == 0:
            raise ValueError(f"need at least seq_len={L} stored transitions, have {self.size}")
        replace = self.replace or M < B
        if self.sampler == "uniform":
            k = self.rng.choice(M, size=B, replace=replace)  # (B,) logical starts
            ess = float(M)
        else:
            p = self._probs(L, imagination)
            if not replace and np.count_nonzero(p) < B:
                # the literal formula at scale: (almost) all mass on fewer than B starts
                replace = True
                if not self._warned_replacement:
                    self._warned_replacement = True
                    warnings.warn(f"DFS: fewer than {B} of {M} window starts have non-zero probability "
                                  f"(effective sample size {1.0 / float(p @ p):.1f}); drawing this and any "
                                  "such batch with replacement", RuntimeWarning, stacklevel=2)
            k = self.rng.choice(M, size=B, replace=replace, p=p)
            ess = 1.0 / float(p @ p)
        # (B, L) physical slots: logical start + offset, wrapped around the array end only
        idx = (self.oldest + k[:, None] + np.arange(L)) % self.capacity
        self._count(idx, imagination)
        counter = self.img_count if imagination else self.wm_count
        self.last_stats["img" if imagination else "wm"] = {
            "ess": ess, "starts": float(M), "max_count": float(counter.max()),
            "with_replacement": float(replace and not self.replace)}
        return idx

    def gather(self, idx: np.ndarray, obs_out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The stored fields at slots `idx` (any shape), frames optionally into `obs_out`."""
        idx = np.asarray(idx)
        if obs_out is None:
            obs = self.obs[idx]
        else:
            if obs_out.shape != idx.shape + self.obs_shape or obs_out.dtype != np.uint8:
                raise ValueError(f"obs_out must be uint8 {idx.shape + self.obs_shape}, got "
                                 f"{obs_out.dtype} {obs_out.shape}")
            # mode="wrap" lets numpy skip its buffered copy when `out` is given
            obs = np.take(self.obs, idx, axis=0, out=obs_out, mode="wrap")
        return {"obs": obs, "action": self.action[idx], "reward": self.reward[idx],
                "termination": self.termination[idx], "life_lost": self.life_lost[idx],
                "is_last": self.is_last[idx], "index": idx}

    def _count(self, idx: np.ndarray, imagination: bool) -> None:
        counter = self.img_count if imagination else self.wm_count
        used = idx[:, 0] if self.dfs.count == "start" else idx.ravel()
        np.add.at(counter, used, 1)  # add.at: repeated slots (overlapping windows) count each time

    # ------------------------------------------------------------------ checkpointing
    _ARRAYS = ("obs", "action", "reward", "termination", "life_lost", "is_last", "wm_count", "img_count")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Numpy arrays only (views of the filled slots; no copy of the frames)."""
        n = self.size  # filled slots are 0..n-1 (writes start at 0, wrap only once full)
        sd = {k: getattr(self, k)[:n] for k in self._ARRAYS}
        sd["meta"] = np.array([self.capacity, self.ptr, self.size, self.n_added], np.int64)
        sd["obs_shape"] = np.array(self.obs_shape, np.int64)
        sd["rng"] = _pack_rng(self.rng)
        return sd

    def load_state_dict(self, sd: dict[str, np.ndarray]) -> None:
        missing = [k for k in self._ARRAYS + ("meta", "obs_shape", "rng") if k not in sd]
        if missing:
            raise ValueError(f"replay state is missing {', '.join(missing)}")
        capacity, ptr, size, n_added = (int(x) for x in np.asarray(sd["meta"]))
        obs_shape = tuple(int(s) for s in np.asarray(sd["obs_shape"]))
        if capacity != self.capacity or obs_shape != self.obs_shape:
            raise ValueError(f"replay state has capacity {capacity}, obs {obs_shape}; this buffer has "
                             f"capacity {self.capacity}, obs {self.obs_shape}")
        if not (0 <= size <= capacity and 0 <= ptr < max(capacity, 1)):
            raise ValueError(f"corrupt replay state: ptr={ptr}, size={size}, capacity={capacity}")
        for k in self._ARRAYS:
            a = np.asarray(sd[k])
            dst = getattr(self, k)
            if a.shape != (size,) + dst.shape[1:]:
                raise ValueError(f"replay state {k!r} has shape {a.shape}, "
                                 f"expected {(size,) + dst.shape[1:]}")
            dst[:size] = a
            if self.size > size:  # clear only slots this buffer had filled beyond the loaded state
                dst[size:self.size] = 0
        self.ptr, self.size, self.n_added = ptr, size, n_added
        self.rng = _unpack_rng(np.asarray(sd["rng"]))


_MASK64 = (1 << 64) - 1


def _pack_rng(rng: np.random.Generator) -> np.ndarray:
    """PCG64 state (two 128-bit ints + buffered uint32) as six uint64 words."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise ValueError(f"only PCG64 generators can be saved, got {st['bit_generator']}")
    s, inc = st["state"]["state"], st["state"]["inc"]
    return np.array([s >> 64, s & _MASK64, inc >> 64, inc & _MASK64, st["has_uint32"], st["uinteger"]],
                    np.uint64)


def _unpack_rng(words: np.ndarray) -> np.random.Generator:
    if words.shape != (6,):
        raise ValueError(f"replay rng state must have 6 words, got shape {words.shape}")
    w = [int(x) for x in words]
    bg = np.random.PCG64()
    bg.state = {"bit_generator": "PCG64",
                "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
                "has_uint32": w[4], "uinteger": w[5]}
    return np.random.Generator(bg)


def make_replay(sampler: str = "dfs", capacity: int = 100_000, dfs_mode: str = "official",
                batch_size: int = 16, imagine_batch_size: int = 1024, seed: int = 0,
                **dfs_overrides) -> ReplayBuffer:
    """Buffer with DFS as the official code ran it ('official') or section 2.4 as printed ('literal')."""
    cfg = DFSConfig.from_mode(dfs_mode, batch_size, imagine_batch_size)
    if dfs_overrides:
        cfg = dataclasses.replace(cfg, **dfs_overrides)
    return ReplayBuffer(capacity=capacity, sampler=sampler, dfs=cfg, seed=seed)
