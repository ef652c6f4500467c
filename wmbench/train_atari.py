"""`wmbench atari`: train the Drama agent (world model + actor-critic in imagination) on one game.

Reads top to bottom like a CleanRL script. Algorithm 1 of the paper (appendix A.5), per env step:

    1. collect:   a_t ~ π(a | s_t) (random before warm-up), store (O_t, a_t, r_t, e_t) in replay
    2. world model: sample b windows of length l (DFS), one optimiser step (eq. 6-7)
    3. behaviour:   sample b_img contexts of length l_img (DFS), prefill l_img-1 of them, imagine h
                    steps with the actor, one actor-critic step
    4. every `eval_every` steps: evaluate; every `checkpoint_every` steps or `checkpoint_minutes` of
       wall time: checkpoint

Schedule (official code, drama-official-code.md s4): random actions and no updates until the buffer
holds more than `warmup_steps` = 1032 transitions, then `train_ratio` (1.0) world-model updates and
as many agent updates per env step; the Atari100k budget is 100k env steps (400k frames). DFS runs with
the official code's settings by default (wmbench/replay.py explains why the literal formula collapses).

Acting (section 2.3): the policy sees s_t = [ẑ_t, d_{t-1}], ẑ_t sampled from the prior after
re-running the backbone over the last `act_context` real (frame, action) pairs (WorldModel.policy_state;
the official code's "no recurrent cache in the real env"), so acting states are imagination states.
The current frame is not looked at; an episode's first action is random (nothing to predict from).
`policy_latent="posterior"` acts on the current frame's posterior instead. `faithful="code"` switches
every paper-vs-code choice to the code's (wmbench.presets.PAPER_VS_CODE), including, on request of
`stale_reset_frame`, its bug of storing the terminal frame in place of the next reset frame.

Resume: the same command with the same --run-dir continues from the newest checkpoint: models,
optimisers and schedulers, replay buffer (incl. DFS counters and its sampler RNG), python / numpy /
torch RNG states, the acting RNG, step and update counters, the episode log, the acting context and
the environment itself (ALE state incl. its RNG, or the grid world's state), so a resumed run takes
exactly the steps an uninterrupted one would have taken. If an environment cannot be restored
(unknown env class), its current episode restarts instead (the partial episode is closed in replay and
not logged). SIGINT (Ctrl-C) and SIGTERM save a checkpoint at the next step boundary; a second one
aborts at once.

The record's headline `score` is the paper's: the mean of the last 5 training episodes. The final
evaluation (100 full greedy games, as the code's eval.py) is a second metric, with its action counts.

Outputs in the run dir: config.json, metrics.jsonl (train / episode / eval rows), tb/ (TensorBoard),
checkpoints/, record.json (also written to --runs-dir for `wmbench report`).
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmbench import checkpoint as ckpt
from wmbench.errors import UserError

# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    game: str = "Krull"
    backbone: str = "mamba2"
    sampler: str = "dfs"              # "dfs" (Drama) or "uniform"
    size: str = "XS"                  # model preset (wmbench.presets): XS, S, tiny, cpu
    steps: int = 100_000              # env steps (agent steps of 4 frames on Atari): Atari100k
    seed: int = 0
    run_dir: str = ""                 # "" -> runs/atari/<game>-<backbone>-<sampler>-<size>-seed<seed>
    preset: str = ""                  # run preset that set the defaults below (RUN_PRESETS); informative
    protocol: str = "drama"           # Atari protocol (tasks/atari.py PROTOCOLS)
    train_ratio: float = 1.0          # world-model (and agent) updates per env step after warm-up
    warmup_steps: int = 1032          # code: updates and policy acting start once len(buffer) > 1032
    replay_capacity: int = 100_000    # code: BufferMaxLength 100000 (pages are allocated as it fills)
    dfs_mode: str = "official"        # the official code's DFS (what produced the paper's numbers), or
                                      # "literal": section 2.4 as printed (collapses at scale; README)
    faithful: str = "paper"           # "code": every choice of the official code at once (README table)
    stale_reset_frame: bool | None = None  # the official code's bug: store the terminal frame in place of
                                      # the next episode's first frame (None: only with faithful=code)
    eval_every: int = 10_000          # env steps between in-training evaluations (0: none; code: 1000)
    eval_episodes: int = 10           # code: 10 episodes
    eval_greedy: bool = True          # code: argmax actions in evaluation
    final_eval_episodes: int = 100    # Drama eval.py: 100 episodes of the final model
    eval_envs: int = 16               # episodes run side by side (one batched forward per step)
    checkpoint_every: int = 2000      # code: SaveEverySteps 2000
    checkpoint_minutes: float = 10.0  # also checkpoint after this much wall time (0: off); and on SIGTERM/INT
    log_every: int = 100              # env steps between train-metric rows
    device: str = "cpu"               # cpu, cuda, cuda:1, auto
    threads: int = 0                  # torch CPU threads (0: torch's default)
    model_overrides: dict = field(default_factory=dict)  # DramaConfig fields, e.g. {"wm_lr": 1e-3}
    env_options: dict = field(default_factory=dict)      # protocol fields / GridGoalEnv kwargs
    runs_dir: str = "results/runs"    # where the final run record goes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = frozenset({"steps", "run_dir", "device", "threads", "eval_every", "eval_episodes",
                               "eval_greedy", "final_eval_episodes", "eval_envs", "checkpoint_every",
                               "checkpoint_minutes", "log_every", "runs_dir", "preset"})
FAITHFUL = ("paper", "code")

# Run presets: a model size plus a schedule sized for it. Explicit options override them.
RUN_PRESETS: dict[str, dict] = {
    "XS": dict(size="XS"),   # the paper: 100k steps, warm-up 1032, 1 update per step
    "S": dict(size="S"),
    # smoke test: every code path in a couple of minutes on CPU
    "tiny": dict(size="tiny", steps=2000, warmup_steps=100, eval_every=1000, eval_episodes=2,
                 final_eval_episodes=4, checkpoint_every=500, log_every=50, replay_capacity=10_000),
    # the CPU learning check on gridgoal: ~1000 updates of the `cpu` model (tests/test_train_atari.py)
    "cpu": dict(size="cpu", steps=1200, warmup_steps=500, train_ratio=1.0, eval_every=500,
                eval_episodes=8, final_eval_episodes=32, checkpoint_every=250, log_every=50,
                replay_capacity=10_000),
}


def resolve_config(preset: str | None = None, **given) -> TrainConfig:
    """TrainConfig defaults <- run preset <- explicitly given values (None means 'not given')."""
    values: dict[str, Any] = {}
    if preset:
        key = {k.lower(): k for k in RUN_PRESETS}.get(str(preset).lower())
        if key is None:
            raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(RUN_PRESETS)}")
        values.update(RUN_PRESETS[key], preset=key)
    values.update({k: v for k, v in given.items() if v is not None})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(values) - names)
    if bad:
        raise ValueError(f"unknown training option(s) {', '.join(bad)}")
    return TrainConfig(**values)


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Canonicalise names and validate every field (ValueError with the valid choices)."""
    from wmbench.presets import list_presets
    from wmbench.registry import list_backbones
    from wmbench.replay import SAMPLERS
    from wmbench.tasks.atari import GRIDGOAL, canonical_game, get_protocol

    cfg = copy.deepcopy(cfg)
    cfg.game = canonical_game(cfg.game)
    if cfg.backbone not in list_backbones():
        raise ValueError(f"unknown backbone {cfg.backbone!r}; valid choices: {', '.join(list_backbones())}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg.sampler!r}; valid choices: {', '.join(SAMPLERS)}")
    sizes = {k.lower(): k for k in list_presets()}
    if str(cfg.size).lower() not in sizes:
        raise ValueError(f"unknown size {cfg.size!r}; valid choices: {', '.join(list_presets())}")
    cfg.size = sizes[str(cfg.size).lower()]
    if not isinstance(cfg.env_options, dict) or not isinstance(cfg.model_overrides, dict):
        raise ValueError("env_options and model_overrides must be dicts")
    if cfg.game == GRIDGOAL:
        import inspect
        from wmbench.tasks.gridgoal import GridGoalEnv
        valid = [k for k in inspect.signature(GridGoalEnv).parameters if k != "seed"]
    else:
        from wmbench.tasks.atari import AtariProtocol
        get_protocol(cfg.protocol)
        valid = [f.name for f in dataclasses.fields(AtariProtocol) if f.name not in ("name", "source")]
    bad = sorted(set(cfg.env_options) - set(valid))
    if bad:
        raise ValueError(f"unknown env option(s) {', '.join(bad)} for {cfg.game}; valid: {', '.join(valid)}")
    from wmbench.replay import DFS_MODES
    if cfg.dfs_mode not in DFS_MODES:
        hint = " ('paper' is now called 'literal')" if cfg.dfs_mode == "paper" else ""
        raise ValueError(f"dfs_mode must be one of {', '.join(DFS_MODES)}, got {cfg.dfs_mode!r}{hint}")
    if cfg.faithful not in FAITHFUL:
        raise ValueError(f"faithful must be one of {', '.join(FAITHFUL)}, got {cfg.faithful!r}")
    if cfg.stale_reset_frame is None:
        cfg.stale_reset_frame = cfg.faithful == "code"
    if not isinstance(cfg.stale_reset_frame, bool):
        raise ValueError(f"stale_reset_frame must be true or false, got {cfg.stale_reset_frame!r}")
    if not (cfg.checkpoint_minutes >= 0 and math.isfinite(cfg.checkpoint_minutes)):
        raise ValueError(f"checkpoint_minutes must be a finite number >= 0, got {cfg.checkpoint_minutes}")
    device = resolve_device(cfg.device)
    if cfg.faithful == "code":   # the code's choices under anything given explicitly
        from wmbench.presets import code_choices
        cfg.model_overrides = {**code_choices(bf16_native(device)), **cfg.model_overrides}
    for k in ("steps", "eval_envs", "log_every"):
        if int(getattr(cfg, k)) < 1:
            raise ValueError(f"{k} must be >= 1, got {getattr(cfg, k)}")
    for k in ("warmup_steps", "eval_every", "eval_episodes", "final_eval_episodes", "checkpoint_every",
              "threads"):
        if int(getattr(cfg, k)) < 0:
            raise ValueError(f"{k} must be >= 0, got {getattr(cfg, k)}")
    if not (cfg.train_ratio >= 0 and math.isfinite(cfg.train_ratio)):
        raise ValueError(f"train_ratio must be a finite number >= 0, got {cfg.train_ratio}")
    m = model_config(cfg)  # unknown / invalid model overrides raise here
    need = max(m.batch_length, m.imag_context)
    if cfg.warmup_steps < need:
        raise ValueError(f"warmup_steps must be >= {need} (the longest replay window: batch_length "
                         f"{m.batch_length}, imag_context {m.imag_context}), got {cfg.warmup_steps}")
    if cfg.replay_capacity < need:
        raise ValueError(f"replay_capacity must be >= {need}, got {cfg.replay_capacity}")
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / "atari" / f"{cfg.game}-{cfg.backbone}-{cfg.sampler}-{cfg.size}-seed{cfg.seed}")
    return cfg


def model_config(cfg: TrainConfig):
    from wmbench.presets import get_preset
    return get_preset(cfg.size, backbone=cfg.backbone, **cfg.model_overrides)


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or
    AMX (elsewhere bf16 autocast emulates and runs slower than fp32: 0.5-0.7x measured on an Intel Xeon)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def env_makers(cfg: TrainConfig):
    """(training env, evaluation env) constructors of run `cfg`, by seed. Evaluation plays full games:
    a lost life ends nothing and does not cut an action repeat short (the official eval env)."""
    from wmbench.tasks.atari import GRIDGOAL, make_env
    eval_extra = {} if cfg.game == GRIDGOAL else {"break_on_life_loss": False}

    def make(seed: int):
        return make_env(cfg.game, cfg.protocol, seed=seed, **cfg.env_options)

    def make_eval(seed: int):
        return make_env(cfg.game, cfg.protocol, seed=seed, **{**cfg.env_options, **eval_extra})
    return make, make_eval


# ----------------------------------------------------------------------------------------------
# environment state (so a resumed run continues the very same episode)

def env_state(env) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(JSON part, array part) of the environment's full state, or None if we do not know the class."""
    if hasattr(env, "get_state") and hasattr(env, "set_state"):
        return env.get_state()
    from wmbench.tasks.atari import AtariEnv
    from wmbench.tasks.gridgoal import GridGoalEnv
    if isinstance(env, GridGoalEnv):
        return ({"kind": "gridgoal", "rng": ckpt.generator_state(env._rng), "agent": env.agent.tolist(),
                 "goal": env.goal.tolist(), "steps": env._steps, "return": env._return,
                 "needs_reset": env._needs_reset}, {})
    if isinstance(env, AtariEnv) and hasattr(env.emu, "ale"):
        ale = env.emu.ale.cloneState(include_rng=True).serialize()
        return ({"kind": "atari", "noop_rng": ckpt.generator_state(env._noop_rng), "frames": env._frames,
                 "steps": env._steps, "return": env._return, "lives": env._lives, "seeded": env._seeded,
                 "needs_reset": env._needs_reset},
                {"env_ale_state": np.frombuffer(ale, np.uint8).copy(), "env_buf": env._buf.copy()})
    return None


def set_env_state(env, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    if hasattr(env, "get_state") and hasattr(env, "set_state"):
        env.set_state(meta, arrays)
        return
    if meta["kind"] == "gridgoal":
        env._rng = ckpt.generator_from_state(meta["rng"])
        env.agent, env.goal = np.array(meta["agent"]), np.array(meta["goal"])
        env._steps, env._return, env._needs_reset = meta["steps"], meta["return"], meta["needs_reset"]
    elif meta["kind"] == "atari":
        import ale_py
        env.emu.ale.restoreState(ale_py.ALEState(arrays["env_ale_state"].tobytes()))
        env._buf[...] = arrays["env_buf"]
        env._noop_rng = ckpt.generator_from_state(meta["noop_rng"])
        env._frames, env._steps, env._return = meta["frames"], meta["steps"], meta["return"]
        env._lives, env._seeded, env._needs_reset = meta["lives"], meta["seeded"], meta["needs_reset"]
    else:
        raise ValueError(f"unknown environment state kind {meta['kind']!r}")


# ----------------------------------------------------------------------------------------------
# acting

class ActingContext:
    """The last T real frames (current one last) and the T-1 actions between them."""

    def __init__(self, T: int):
        self.T = T
        self.obs: collections.deque = collections.deque(maxlen=T)
        self.act: collections.deque = collections.deque(maxlen=max(T - 1, 0))

    @classmethod
    def for_model(cls, mcfg) -> "ActingContext":
        """act_context past (frame, action) pairs for the prior latent (the code's RealityContextLength),
        plus the current frame, which the posterior latent also encodes."""
        return cls(mcfg.act_context + 1 if mcfg.policy_latent == "prior" else mcfg.act_context)

    def reset(self, obs: np.ndarray) -> None:
        self.obs.clear(), self.act.clear()
        self.obs.append(obs)

    def push(self, action: int, next_obs: np.ndarray) -> None:
        if self.T > 1:
            self.act.append(int(action))
        self.obs.append(next_obs)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.stack(self.obs), np.array(self.act, np.int64).reshape(len(self.obs) - 1)

    def load(self, obs: np.ndarray, act: np.ndarray) -> None:
        self.obs.clear(), self.act.clear()
        self.obs.extend(list(obs)), self.act.extend(int(a) for a in act)


@torch.no_grad()
def policy_actions(wm, agent, contexts: list[ActingContext], greedy: bool,
                   rng: np.random.Generator) -> np.ndarray:
    """One action per context; contexts of equal length share one batched forward pass. With the prior
    latent an episode's first step has no past to predict from: its action is drawn uniformly from `rng`
    (as in the official code)."""
    out = np.zeros(len(contexts), np.int64)
    by_len: dict[int, list[int]] = collections.defaultdict(list)
    for i, c in enumerate(contexts):
        by_len[len(c.obs)].append(i)
    for T, idx in sorted(by_len.items()):
        if T == 1 and wm.cfg.policy_latent == "prior":
            out[idx] = rng.integers(wm.n_actions, size=len(idx))
            continue
        obs, act = zip(*(contexts[i].arrays() for i in idx))
        obs_t = torch.from_numpy(np.stack(obs)).to(wm.device)           # (B, T, 64, 64, 3) uint8
        act_t = torch.from_numpy(np.stack(act)).to(wm.device)           # (B, T-1)
        s = wm.policy_state(obs_t, act_t)                               # (B, latent + d)
        out[idx] = agent.act(s, greedy=greedy).cpu().numpy()
    return out


@dataclass
class EvalResult:
    """Evaluation episodes: returns and lengths (agent steps) in the order they ended, and how often
    each action was taken over all of them."""
    returns: list[float]
    lengths: list[int]
    action_counts: list[int]

    @property
    def mean(self) -> float:
        return _mean(self.returns)

    def action_fractions(self) -> list[float]:
        n = sum(self.action_counts)
        return [c / n for c in self.action_counts] if n else []


def evaluate(wm, agent, make, n_episodes: int, n_envs: int, mcfg, greedy: bool, seed: int) -> EvalResult:
    """`n_episodes` full games (life loss ends nothing, and does not cut an action repeat short: the
    official code's evaluation env), run `n_envs` at a time (no bias to short episodes).

    Runs under its own torch RNG (fork_rng + manual_seed) and with the actor-input statistics frozen, so
    evaluating never changes what training does afterwards and the same model + seed gives the same scores.
    """
    if n_episodes <= 0:
        return EvalResult([], [], [0] * wm.n_actions)
    n_envs = max(1, min(n_envs, n_episodes))
    res = EvalResult([], [], [0] * wm.n_actions)
    rng = np.random.default_rng([seed, 2])
    with torch.random.fork_rng(devices=[wm.device] if wm.device.type == "cuda" else []), \
            agent.frozen_input_stats():
        torch.manual_seed(seed)
        envs = [make(seed + i) for i in range(n_envs)]
        ctxs = [ActingContext.for_model(mcfg) for _ in envs]
        for e, c in zip(envs, ctxs):
            obs, _ = e.reset()
            c.reset(obs)
        started, live = n_envs, [True] * n_envs
        while any(live):
            ids = [i for i, ok in enumerate(live) if ok]
            acts = policy_actions(wm, agent, [ctxs[i] for i in ids], greedy, rng)
            for i, a in zip(ids, acts):
                res.action_counts[int(a)] += 1
                obs, r, term, trunc, info = envs[i].step(int(a))
                if term or trunc:
                    res.returns.append(float(info["episode_return"]))
                    res.lengths.append(int(info["episode_step"]))
                    if started < n_episodes:
                        obs, _ = envs[i].reset()
                        ctxs[i].reset(obs)
                        started += 1
                    else:
                        live[i] = False
                else:
                    ctxs[i].push(int(a), obs)
        for e in envs:
            e.close()
    return res


# ----------------------------------------------------------------------------------------------
# small helpers

class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm went NaN/inf: the run stops, the last checkpoint is kept."""


class _StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (kill, a scheduler's pre-emption): finish the current step, checkpoint,
    exit. A second signal aborts at once (the last checkpoint stays as it was)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
              "(send it again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def replay_stats(replay) -> dict[str, float]:
    """The samplers' health for the logs: effective sample size 1 / sum(p^2) of the last draw of each
    sampler and its number of window starts, the largest use counters (v: world model, b: imagination)
    and whether a batch had to be drawn with replacement."""
    out = {}
    for kind, st in replay.last_stats.items():
        out[f"replay_{kind}_ess"] = st["ess"]
        out[f"replay_{kind}_starts"] = st["starts"]
        out[f"replay_{kind}_max_count"] = st["max_count"]
        out[f"replay_{kind}_with_replacement"] = st["with_replacement"]
    return out


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _num(x) -> float | None:
    """JSON-safe number: None instead of NaN / inf (e.g. a mean over zero episodes)."""
    return float(x) if x is not None and math.isfinite(x) else None


def _rewrite_jsonl(path: Path, keep_until_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if int(row.get("step", 0)) <= keep_until_step:
            keep.append(line)
    from wmbench.records import atomic_write_text
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def _time_updates(mcfg, obs_shape, n_actions, device, n: int = 2) -> float:
    """Seconds per (world-model + imagination + agent) update, timed on throw-away models."""
    from wmbench.agent import ActorCritic
    from wmbench.world_model import WorldModel
    B, L = mcfg.batch_size, mcfg.batch_length
    rng = np.random.default_rng(0)
    batch = {"obs": rng.integers(0, 256, (B, L) + obs_shape, dtype=np.uint8),
             "action": rng.integers(0, n_actions, (B, L)), "reward": np.zeros((B, L), np.float32),
             "termination": np.zeros((B, L), bool)}
    ctx_o = rng.integers(0, 256, (mcfg.imag_batch, mcfg.imag_context) + obs_shape, dtype=np.uint8)
    ctx_a = rng.integers(0, n_actions, (mcfg.imag_batch, mcfg.imag_context))
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        wm_c, ag_c = WorldModel(mcfg, n_actions).to(device), ActorCritic(mcfg, n_actions).to(device)
        for _ in range(n + 1):
            t0 = time.perf_counter()
            wm_c.train_step(batch)
            ag_c.update(wm_c.imagine(ctx_o, ctx_a, ag_c))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))  # the first call pays one-off costs


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    h, rem = divmod(int(s), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


# ----------------------------------------------------------------------------------------------
# the training loop

def train(cfg: TrainConfig, progress: bool = True, stop_at: int | None = None,
          estimate: bool | None = None) -> dict:
    """Train (or resume) the run `cfg` describes; returns a summary dict.

    stop_at: stop after this env step with a checkpoint, as if killed there (tests, time-boxing).
    estimate: print a wall-time estimate first (default: on CPU with the XS / S model).
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, progress, stop_at, estimate)
    finally:
        torch.set_num_threads(threads)   # cfg.threads is this run's setting, not the process's


def _train(cfg: TrainConfig, progress: bool, stop_at: int | None, estimate: bool | None) -> dict:
    from wmbench.agent import ActorCritic
    from wmbench.records import atomic_write_text, write_record
    from wmbench.replay import make_replay
    from wmbench.tasks.atari import GRIDGOAL
    from wmbench.world_model import WorldModel

    cfg = check_config(cfg)
    mcfg = model_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    is_grid = cfg.game == GRIDGOAL

    # --- refuse a run dir made with another config, or a corrupt checkpoint, before writing anything
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        try:
            saved = json.loads(cfg_path.read_text())["train"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{cfg_path} is unreadable ({e}); use another --run-dir") from None
        diff = ckpt.config_diff(saved, cfg.to_dict(), ignore=RESUMABLE_CHANGES)
        if diff:
            raise UserError(f"run dir {run_dir} was made with a different config ({'; '.join(diff)}); "
                            f"use the same options or another --run-dir")
    state = ckpt.load_checkpoint(run_dir, map_location=device)
    if state is not None:   # the checkpoint carries its config too (config.json may have been removed)
        diff = ckpt.config_diff(state.meta.get("config", {}), cfg.to_dict(), ignore=RESUMABLE_CHANGES)
        if diff:
            raise UserError(f"checkpoint {state.path} was made with a different config ({'; '.join(diff)}); "
                            f"use the same options or another --run-dir")

    # --- seeding, environment, models, replay (built identically for fresh and resumed runs)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    act_rng = np.random.default_rng([cfg.seed, 1])      # random actions during warm-up

    make, make_eval = env_makers(cfg)

    env = make(cfg.seed)
    n_actions = int(env.num_actions)
    obs_shape = tuple(env.observation_space.shape)
    wm = WorldModel(mcfg, n_actions).to(device)
    agent = ActorCritic(mcfg, n_actions).to(device)
    replay = make_replay(cfg.sampler, capacity=cfg.replay_capacity, dfs_mode=cfg.dfs_mode,
                         batch_size=mcfg.batch_size, imagine_batch_size=mcfg.imag_batch, seed=cfg.seed)
    if replay.obs_shape != obs_shape:
        raise ValueError(f"replay frames {replay.obs_shape} do not match the env's {obs_shape}")
    ctx = ActingContext.for_model(mcfg)

    step = 0                 # env steps taken
    n_updates = 0            # (world-model, agent) update pairs done
    credit = 0.0             # fractional updates owed (train_ratio)
    episodes: list[dict] = []        # every finished training episode
    eval_history: list[dict] = []
    elapsed_prev = 0.0       # wall time of earlier sessions
    update_time_prev = 0.0   # seconds spent in updates in earlier sessions
    obs = None
    store_obs = None         # the frame stored with the next action (obs, or a stale one: stale_reset_frame)
    if state is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_path, json.dumps({"train": cfg.to_dict(), "model": mcfg.to_dict()}, indent=1))
        _rewrite_jsonl(run_dir / "metrics.jsonl", 0)      # leftovers of a run killed before its
        shutil.rmtree(run_dir / "tb", ignore_errors=True)  # first checkpoint: it starts over
        obs, _ = env.reset(seed=cfg.seed)
        ctx.reset(obs)
        store_obs = obs
    else:
        m, s, a = state.meta, state.state, state.arrays
        try:
            wm.load_training_state(s["wm"])          # weights + buffers, optimiser, warm-up schedule
            agent.load_training_state(s["agent"])
            replay.load_state_dict({k[len("replay."):]: v for k, v in a.items() if k.startswith("replay.")})
            torch.set_rng_state(s["torch_rng"].cpu())
            if device.type == "cuda" and "cuda_rng" in s:
                torch.cuda.set_rng_state(s["cuda_rng"].cpu(), device)
            ckpt.set_python_rng_state(m["python_rng"])
            ckpt.set_numpy_global_rng_state(m["numpy_rng"])
            act_rng = ckpt.generator_from_state(m["act_rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {state.path} does not fit this run "
                                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        step, n_updates, credit = m["step"], m["n_updates"], m["credit"]
        episodes, eval_history = m["episodes"], m["eval_history"]
        elapsed_prev, update_time_prev = m["elapsed_s"], m["update_time_s"]
        restored = False
        if m.get("env") is not None and step < cfg.steps:
            try:
                set_env_state(env, m["env"], {k: v for k, v in a.items() if k.startswith("env_")})
                obs = a["current_obs"]
                store_obs = a["store_obs"] if "store_obs" in a else obs
                ctx.load(a["ctx_obs"], a["ctx_act"])
                restored = True
            except Exception as e:  # noqa: BLE001 - fall back to a fresh episode
                print(f"warning: could not restore the environment ({e}); its episode restarts",
                      file=sys.stderr)
        if not restored:
            if len(replay):
                replay.is_last[(replay.ptr - 1) % replay.capacity] = True   # close the cut episode
            obs, _ = env.reset(seed=cfg.seed + 7919 * (step + 1))
            ctx.reset(obs)
            store_obs = obs
        _rewrite_jsonl(run_dir / "metrics.jsonl", step)
        print(f"resuming {run_dir} from env step {step} ({n_updates} updates, {len(episodes)} episodes)",
              file=sys.stderr)

    def save(at_step: int) -> Path:
        es = env_state(env)
        arrays = {f"replay.{k}": v for k, v in replay.state_dict().items()}
        o, a_ = ctx.arrays()
        arrays.update(current_obs=np.asarray(obs), store_obs=np.asarray(store_obs), ctx_obs=o, ctx_act=a_)
        if es is not None:
            arrays.update(es[1])
        st = {"wm": wm.training_state(), "agent": agent.training_state(), "torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state(device)
        meta = {"config": cfg.to_dict(), "n_updates": n_updates, "credit": credit, "episodes": episodes,
                "eval_history": eval_history, "elapsed_s": elapsed_prev + (time.perf_counter() - t_start),
                "update_time_s": update_time_prev + update_time, "python_rng": ckpt.python_rng_state(),
                "numpy_rng": ckpt.numpy_global_rng_state(), "act_rng": ckpt.generator_state(act_rng),
                "env": None if es is None else es[0]}
        return ckpt.save_checkpoint(run_dir, at_step, st, arrays, meta)

    # --- logging
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=step if step else None)
    jsonl = open(run_dir / "metrics.jsonl", "a")

    def log(row: dict) -> None:
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()

    human_norm = None
    if not is_grid:
        from wmbench.tasks.atari import human_normalized
        human_norm = lambda score: human_normalized(cfg.game, score)  # noqa: E731

    # --- wall-time estimate on CPU for the big models
    if estimate is None:
        estimate = device.type == "cpu" and mcfg.name in ("XS", "S") and step < cfg.steps
    if estimate:
        t_upd = _time_updates(mcfg, obs_shape, n_actions, device)
        n_left = max(cfg.steps - max(step, cfg.warmup_steps), 0) * cfg.train_ratio
        print(f"estimate: {t_upd:.2f} s per world-model + agent update on {device}; "
              f"{n_left:.0f} updates left -> about {_fmt_duration(t_upd * n_left)} of training "
              f"(plus acting and evaluation)", file=sys.stderr)

    # --- the loop
    from tqdm import tqdm
    t_start = time.perf_counter()
    update_time = 0.0
    step0, updates0 = step, n_updates
    window: dict[str, list] = collections.defaultdict(list)   # train metrics since the last log row
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True,
               desc=f"{cfg.game} {cfg.backbone}/{cfg.sampler}/{cfg.size}", file=sys.stderr)
    last_ckpt = state.step if state is not None else None
    last_save_t = t_start    # wall-clock checkpoints: every checkpoint_minutes of this session
    stopped = False
    try:
        with _StopFlag() as stop:
            while step < cfg.steps:
                # 1. collect one transition: random during warm-up, then the policy (sampled actions)
                if len(replay) <= cfg.warmup_steps:
                    action = int(act_rng.integers(n_actions))
                else:
                    action = int(policy_actions(wm, agent, [ctx], greedy=False, rng=act_rng)[0])
                next_obs, reward, term, trunc, info = env.step(action)
                replay.add(store_obs, action, reward, info["done_for_learning"], info.get("life_lost", False),
                           term or trunc)
                step += 1
                if term or trunc:
                    ep = {"step": step, "return": float(info["episode_return"]),
                          "length": int(info["episode_step"])}
                    episodes.append(ep)
                    log({"type": "episode", **ep})
                    writer.add_scalar("episode/return", ep["return"], step)
                    if human_norm is not None:
                        writer.add_scalar("episode/human_normalized", human_norm(ep["return"]), step)
                    obs, _ = env.reset()
                    ctx.reset(obs)
                    # the official code's bug, on request: the terminal frame stands in for the reset frame
                    store_obs = next_obs if cfg.stale_reset_frame else obs
                else:
                    obs = store_obs = next_obs
                    ctx.push(action, obs)

                # 2-3. world-model update, then imagination + actor-critic update (Algorithm 1)
                if len(replay) > cfg.warmup_steps:
                    credit += cfg.train_ratio
                while credit >= 1.0:
                    t0 = time.perf_counter()
                    try:
                        wm_out = wm.train_step(replay.sample(mcfg.batch_size, mcfg.batch_length))
                        c = replay.sample(mcfg.imag_batch, mcfg.imag_context, imagination=True)
                        imag = wm.imagine(c["obs"], c["action"], agent)
                        ac_out = agent.update(imag)
                    except FloatingPointError as e:
                        where = (f"the last good checkpoint (env step {last_ckpt}) in {run_dir / 'checkpoints'} "
                                 "is kept" if last_ckpt is not None else "no checkpoint had been written yet")
                        raise NonFiniteLossError(f"non-finite loss at env step {step}, update {n_updates + 1}: "
                                                 f"{e}; the run stopped and {where}") from None
                    update_time += time.perf_counter() - t0
                    credit -= 1.0
                    n_updates += 1
                    for k, v in {**wm_out, **ac_out, **replay_stats(replay)}.items():
                        window[k].append(v)

                # 4. logging, evaluation, checkpoints
                if step % cfg.log_every == 0 or step == cfg.steps:
                    el = time.perf_counter() - t_start
                    row = {"type": "train", "step": step, "updates": n_updates,
                           "env_steps_per_s": (step - step0) / max(el, 1e-9),
                           "updates_per_s": (n_updates - updates0) / max(el, 1e-9),
                           **{k: _mean(v) for k, v in window.items()}}
                    log(row)
                    for k, v in row.items():
                        if k not in ("type", "step"):
                            group = ("perf/" if k.endswith("_per_s") or k == "updates" else
                                     "replay/" if k.startswith("replay_") else "train/")
                            writer.add_scalar(group + k, v, step)
                    window.clear()
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    res = evaluate(wm, agent, make_eval, cfg.eval_episodes, cfg.eval_envs, mcfg,
                                   cfg.eval_greedy, seed=cfg.seed * 1_000_003 + step)
                    ev = {"step": step, "mean": _num(res.mean), "returns": res.returns,
                          "action_counts": res.action_counts}
                    eval_history.append(ev)
                    log({"type": "eval", **ev})
                    if res.returns:
                        writer.add_scalar("eval/return", ev["mean"], step)
                if progress and (step % 10 == 0 or step == cfg.steps):
                    el = time.perf_counter() - t_start
                    last5 = [e["return"] for e in episodes[-5:]]
                    bar.set_postfix_str(f"sps={(step - step0) / max(el, 1e-9):.1f} "
                                        f"ups={(n_updates - updates0) / max(el, 1e-9):.2f} "
                                        f"ret={episodes[-1]['return'] if episodes else float('nan'):.1f} "
                                        f"ret5={_mean(last5):.1f}", refresh=False)
                bar.update(1)
                if stop_at is not None and step >= stop_at:
                    stopped = True
                elif stop.requested:
                    stopped = True
                due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or \
                    (cfg.checkpoint_minutes and time.perf_counter() - last_save_t >= 60 * cfg.checkpoint_minutes)
                if stopped or due or step == cfg.steps:
                    save(step)
                    last_ckpt, last_save_t = step, time.perf_counter()
                if stopped:
                    break
    finally:
        bar.close()
        jsonl.close()
        writer.flush()

    summary = {"run_dir": str(run_dir), "step": step, "updates": n_updates, "episodes": len(episodes),
               "stopped": stopped}
    if stopped:
        writer.close()
        print(f"stopped at env step {step}; checkpoint saved in {run_dir / 'checkpoints'}; "
              f"re-run the same command to resume", file=sys.stderr)
        return summary

    # --- final evaluation and the run record
    final = evaluate(wm, agent, make_eval, cfg.final_eval_episodes, cfg.eval_envs, mcfg, cfg.eval_greedy,
                     seed=cfg.seed * 1_000_003 + 10**9)
    writer.add_scalar("eval/final_return", final.mean, step)
    writer.close()
    elapsed = elapsed_prev + (time.perf_counter() - t_start)    # the final evaluation included
    rec = _run_record(cfg, mcfg, wm, device, run_dir, make, human_norm, step, n_updates, episodes, eval_history,
                      final, elapsed, update_time_prev + update_time)
    name = f"atari-{cfg.game}-{cfg.backbone}-{cfg.sampler}-{cfg.size}-seed{cfg.seed}-" + \
        rec["created_at"].replace(":", "").replace("-", "")[:15]
    path = write_record(rec, cfg.runs_dir, name=name)
    write_record(rec, run_dir, name="record", overwrite=True)   # the run dir's latest record
    summary.update(record=str(path), final_eval_return=final.mean, score=rec["metrics"]["score"]["value"],
                   metrics=rec["metrics"], final_eval_action_fractions=final.action_fractions())
    return summary


SCORE_METHOD = ("mean return of the last 5 training episodes: the paper's score (a 5-episode running "
                "average of training performance, Machado et al. 2018, read at the end of training; the "
                "paper reports its mean over 5 seeds per game)")


def _run_record(cfg, mcfg, wm, device, run_dir, make, human_norm, step, n_updates, episodes, eval_history,
                final: EvalResult, elapsed: float, update_time: float) -> dict:
    from wmbench.presets import PAPER_VS_CODE
    from wmbench.records import make_record
    from wmbench.tasks.atari import ale_version
    rets = [e["return"] for e in episodes]
    late = [e["return"] for e in episodes if e["step"] > cfg.steps - 2500]   # last 10k frames (DreamerV3)
    score = _mean(rets[-5:])
    how = "greedy" if cfg.eval_greedy else "sampled"
    fr = final.action_fractions()
    metrics: dict[str, dict] = {
        "score": {"value": _num(score), "unit": "return", "n": len(rets[-5:]), "method": SCORE_METHOD},
        "final_eval_return": {"value": _num(final.mean), "unit": "return", "n": len(final.returns),
                              "std": _num(float(np.std(final.returns))) if final.returns else None,
                              "method": f"mean over {len(final.returns)} full games of the final model, {how} "
                                        "actions, separate env seeds (the official eval.py's protocol)"},
        "final_eval_top_action_fraction": {
            "value": _num(max(fr)) if fr else None, "unit": "fraction",
            "method": "share of the final evaluation's steps taken with its most frequent action "
                      "(near 1: the policy is stuck on one action)"},
        "train_return_last_10k_frames": {"value": _num(_mean(late)), "unit": "return", "n": len(late),
                                         "method": "mean of training episodes ending in the last 2500 env "
                                                   "steps (DreamerV3's Atari100k score)"},
        "env_steps_per_s": {"value": step / max(elapsed, 1e-9), "unit": "steps/s",
                            "method": "env steps / wall time of the whole run (acting + updates + eval), "
                                      "all sessions"},
        "updates_per_s": {"value": n_updates / max(elapsed, 1e-9), "unit": "updates/s",
                          "method": "(world-model + agent) update pairs / wall time of the whole run"},
        "s_per_update": {"value": update_time / max(n_updates, 1), "unit": "s",
                         "method": "mean wall time of one world-model update + imagination + agent update"},
        "wall_time": {"value": elapsed, "unit": "s",
                      "method": "sum over sessions (resumes), the final evaluation included"},
    }
    choices = [{"field": f, "value": getattr(mcfg, f), "paper": p, "code": c, "what": what}
               for f, p, c, what in PAPER_VS_CODE]
    choices += [{"field": "dfs_mode", "value": cfg.dfs_mode, "paper": "official", "code": "official",
                 "what": "DFS as the official code ran it (the paper's numbers); 'literal': s2.4 as printed"},
                {"field": "stale_reset_frame", "value": cfg.stale_reset_frame, "paper": False, "code": True,
                 "what": "the code's bug: the terminal frame stored in place of the next reset frame"}]
    extra: dict[str, Any] = {"episodes": episodes, "eval_history": eval_history,
                             "final_eval": {"returns": final.returns, "lengths": final.lengths,
                                            "action_counts": final.action_counts, "action_fractions": fr},
                             "faithful": cfg.faithful, "paper_vs_code": choices,
                             "parameters": wm.param_counts(), "run_dir": str(run_dir)}
    if cfg.game == "gridgoal":
        from wmbench.tasks import gridgoal
        g = make(cfg.seed)
        kw = dict(episode_length=g.episode_length, grid_size=g.grid_size)
        rnd, opt = gridgoal.expected_return("random", **kw), gridgoal.expected_return("optimal", **kw)
        metrics["random_return"] = {"value": rnd, "unit": "return", "method": "exact expectation (Markov chain)"}
        metrics["optimal_return"] = {"value": opt, "unit": "return", "method": "exact expectation (Markov chain)"}
        metrics["score_over_random"] = {"value": _num(score / rnd), "unit": "ratio", "method": "score / random_return"}
        metrics["final_eval_over_random"] = {"value": _num(final.mean / rnd), "unit": "ratio",
                                             "method": "final_eval_return / random_return"}
        extra["protocol"] = g.config()
    else:
        from wmbench.tasks.atari import protocol_dict
        hns = "(x - random) / (human - random), wmbench/data/atari100k_scores.csv"
        metrics["score_human_normalized"] = {"value": _num(human_norm(score)), "unit": "fraction",
                                             "method": f"the score's {hns}"}
        metrics["final_eval_human_normalized"] = {"value": _num(human_norm(final.mean)), "unit": "fraction",
                                                  "method": f"the final evaluation's {hns}"}
        extra["protocol"] = protocol_dict(cfg.protocol)
        extra["protocol"].update(cfg.env_options)
        extra["eval_protocol"] = {**extra["protocol"], "break_on_life_loss": False}
        extra["action_meanings"] = make(cfg.seed).action_meanings
    extra["ale_py_version"] = ale_version()
    config = {**cfg.to_dict(), "model": mcfg.to_dict()}
    return make_record("atari", config, metrics, extra=extra, device=device)


def summary_lines(cfg: TrainConfig, summary: dict) -> list[str]:
    m = summary["metrics"]
    v = lambda name, d=2: "n/a" if m[name]["value"] is None else f"{m[name]['value']:.{d}f}"  # noqa: E731
    head = (f"{cfg.game} {cfg.backbone}/{cfg.sampler}/{cfg.size} seed {cfg.seed}: score {v('score')} "
            f"(mean of the last {m['score']['n']} training episodes, as the paper reports)")
    if "score_human_normalized" in m:
        head += f", human-normalised {v('score_human_normalized', 3)}"
    if "score_over_random" in m:
        head += f", {v('score_over_random')}x the random policy"
    out = [head,
           f"{summary['step']} env steps, {summary['updates']} updates, {summary['episodes']} training episodes; "
           f"{v('env_steps_per_s')} env steps/s, {v('s_per_update', 3)} s per update",
           f"final evaluation ({'greedy' if cfg.eval_greedy else 'sampled'}): {v('final_eval_return')} "
           f"(mean of {m['final_eval_return']['n']} full games)"]
    if "final_eval_human_normalized" in m:
        out[-1] += f", human-normalised {v('final_eval_human_normalized', 3)}"
    if "random_return" in m:
        out.append(f"random policy {v('random_return')}, optimal {v('optimal_return')}, "
                   f"final evaluation / random = {v('final_eval_over_random')}")
    top = m["final_eval_top_action_fraction"]["value"]
    if top is not None and top >= 0.9:
        fr = summary.get("final_eval_action_fractions") or []
        a = int(np.argmax(fr)) if fr else -1
        out.append(f"warning: the evaluated policy took action {a} in {100 * top:.0f}% of its steps")
    return out


# ----------------------------------------------------------------------------------------------
# command line

def _kv(s: str) -> tuple[str, Any]:
    """'key=value' with value parsed as JSON when possible (numbers, booleans, lists), else a string."""
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except ValueError:
        return k.strip(), v


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("atari", help="train the Drama agent on an Atari100k game (or gridgoal); resumable",
                              description="Train the Drama agent (world model + actor-critic) on one game. "
                                          "Re-run the same command with the same --run-dir to resume.")
    p.add_argument("--game", required=True, help="one of the 26 Atari100k games (case-insensitive) or gridgoal")
    p.add_argument("--backbone", help="sequence model (default mamba2)")
    p.add_argument("--sampler", help="replay sampler: dfs (default) or uniform")
    p.add_argument("--size", help="model size preset: XS (default), S, tiny, cpu")
    p.add_argument("--preset", help="run preset (size + schedule): " + ", ".join(RUN_PRESETS))
    p.add_argument("--steps", type=int, help="env steps (default 100000)")
    p.add_argument("--seed", type=int)
    p.add_argument("--run-dir", help="checkpoints, metrics and TensorBoard logs (resume: same dir)")
    p.add_argument("--protocol", help="Atari protocol: drama (default), dreamerv3, storm, iris")
    p.add_argument("--device", help="cpu (default), cuda, auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--train-ratio", type=float, help="updates per env step after warm-up (default 1)")
    p.add_argument("--warmup", dest="warmup_steps", type=int, help="random-action steps before training (1032)")
    p.add_argument("--replay-capacity", type=int)
    p.add_argument("--dfs-mode", help="official (default: the code's DFS, which produced the paper's numbers) "
                                      "or literal (section 2.4 as printed)")
    p.add_argument("--faithful", help="paper (default) or code: every choice of the official code at once "
                                      "(README: paper vs code)")
    p.add_argument("--stale-reset-frame", action=argparse.BooleanOptionalAction, default=None,
                   help="reproduce the official code's bug of storing the terminal frame in place of the next "
                        "episode's first frame (default: only with --faithful code)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-episodes", type=int)
    p.add_argument("--final-eval-episodes", type=int)
    p.add_argument("--eval-sampled", action="store_true", help="sample actions in evaluation (default greedy)")
    p.add_argument("--checkpoint-every", type=int, help="env steps between checkpoints (2000)")
    p.add_argument("--checkpoint-minutes", type=float,
                   help="also checkpoint after this many minutes of wall time (10; 0: off)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--set", dest="model_overrides", type=_kv, action="append", metavar="FIELD=VALUE",
                   help="override a model/agent hyper-parameter (wmbench.presets.DramaConfig), repeatable")
    p.add_argument("--env-option", dest="env_options", type=_kv, action="append", metavar="KEY=VALUE",
                   help="protocol field or gridgoal option (e.g. episode_length=50), repeatable")
    p.add_argument("--runs-dir", help="where the run record goes (default results/runs)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-estimate", action="store_true", help="skip the CPU wall-time estimate")
    p.set_defaults(func=main_atari)
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    given = {k: getattr(a, k, None) for k in
             ("game", "backbone", "sampler", "size", "steps", "seed", "run_dir", "protocol", "device", "threads",
              "train_ratio", "warmup_steps", "replay_capacity", "dfs_mode", "faithful", "eval_every",
              "eval_episodes", "final_eval_episodes", "checkpoint_every", "checkpoint_minutes", "log_every",
              "runs_dir", "stale_reset_frame")}
    if getattr(a, "eval_sampled", False):
        given["eval_greedy"] = False
    if a.model_overrides:
        given["model_overrides"] = dict(a.model_overrides)
    if a.env_options:
        given["env_options"] = dict(a.env_options)
    return check_config(resolve_config(a.preset, **given))


def main_atari(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)
    try:
        summary = train(cfg, progress=not a.no_progress, estimate=False if a.no_estimate else None)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["stopped"]:
        return 130
    print("\n".join(summary_lines(cfg, summary)))
    print(f"record: {summary['record']}")
    return 0
