"""The state of a `wmbench atari` run as one object: built identically for a fresh and a resumed run,
saved whole to a checkpoint and restored whole from one.

    run_dir_lock(d)  an exclusive lock on the run dir for a run's lifetime (a second process is refused)
    Run.start(cfg)   refuses a run dir made with another config, builds env / models / replay, then
                     either starts fresh or restores the newest checkpoint (and says so)
    run.note_start() adds this session's choices (precision, threads, compile, why) to `progress.starts`
    run.save()       writes one atomic checkpoint (wmbench.agent.checkpoint) of every field

What is saved, by field (`SAVED`; a test checks that every field is saved or derived from the config):
- `progress`: counters and logs (env step, updates, fractional update credit, episodes, evaluations,
  wall time of earlier sessions, time spent updating, the choices of each start), as JSON;
- `wm`, `agent`: weights, buffers (BatchNorm, the actor's input statistics), optimisers, warm-up schedules;
- `replay`: frames, transitions, DFS counters, the sampler's RNG;
- `env`: the emulator's full state (ALE state and RNG, or the grid world's), so the very same episode
  continues; `ctx`, `obs`, `store_obs`: the acting context and the frames of the current step;
- `act_rng` and the global python / numpy / torch (and CUDA) RNG states.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmbench.agent import checkpoint as ckpt
from wmbench.agent.acting import ActingContext, env_makers, env_state, set_env_state
from wmbench.agent.config import RESUMABLE_CHANGES, TrainConfig, check_config, model_config, resolve_device
from wmbench.core.errors import UserError
from wmbench.core.paths import writable_dir
from wmbench.core.readback import iter_jsonl, read_json_object


@dataclass
class Progress:
    """Counters and logs of a run (checkpoint meta.json)."""
    step: int = 0                     # env steps taken
    n_updates: int = 0                # (world-model, agent) update pairs done
    credit: float = 0.0               # fractional updates owed (train_ratio)
    episodes: list = field(default_factory=list)       # every finished training episode
    eval_history: list = field(default_factory=list)   # every in-training evaluation
    elapsed_s: float = 0.0            # wall time of earlier sessions
    update_time_s: float = 0.0        # seconds spent in updates, all sessions
    starts: list = field(default_factory=list)         # each session: its env step and choices (note_start)


@dataclass
class Run:
    cfg: TrainConfig
    mcfg: Any                         # DramaConfig
    device: torch.device
    run_dir: Path
    env: Any
    wm: Any                           # WorldModel
    agent: Any                        # ActorCritic
    replay: Any                       # ReplayBuffer
    ctx: ActingContext
    act_rng: np.random.Generator      # random actions (warm-up, an episode's first step)
    obs: np.ndarray | None = None     # the current frame
    store_obs: np.ndarray | None = None   # the frame stored with the next action (stale_reset_frame)
    progress: Progress = field(default_factory=Progress)
    t_session: float = field(default_factory=time.perf_counter)   # when this session started
    resumed_from: int | None = None   # the checkpoint step this session started from
    estimate: float | None = None     # measured seconds per update before the loop (agent/estimate.py)

    SAVED = ("progress", "wm", "agent", "replay", "env", "ctx", "obs", "store_obs", "act_rng")
    DERIVED = ("cfg", "mcfg", "device", "run_dir", "t_session", "resumed_from", "estimate")  # config / now

    # --- building
    @classmethod
    def start(cls, cfg: TrainConfig) -> "Run":
        """A fresh run, or the newest checkpoint of `cfg.run_dir` restored (after refusing a run dir or
        checkpoint made with another config, or a corrupt one, before writing anything)."""
        from wmbench.agent.actor_critic import ActorCritic
        from wmbench.agent.replay import make_replay
        from wmbench.world_model import WorldModel

        cfg = check_config(cfg)
        mcfg, device, run_dir = model_config(cfg), resolve_device(cfg.device), Path(cfg.run_dir)
        writable_dir(cfg.runs_dir, "--runs-dir")
        writable_dir(run_dir, "--run-dir")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        _refuse_other_config(cfg, run_dir)
        state = ckpt.load_checkpoint(run_dir, map_location=device)
        if state is not None:   # the checkpoint carries its config too (config.json may have been removed)
            check_meta(state.meta, state.path)
            _refuse_diff(state.meta.get("config", {}), cfg, f"checkpoint {state.path}")

        # seeding, environment, models, replay: built identically for fresh and resumed runs
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        act_rng = np.random.default_rng([cfg.seed, 1])
        env = env_makers(cfg)[0](cfg.seed)
        n_actions, obs_shape = int(env.num_actions), tuple(env.observation_space.shape)
        wm = WorldModel(mcfg, n_actions).to(device)
        if cfg.compile:
            wm.compile_rollout()
        agent = ActorCritic(mcfg, n_actions).to(device)
        replay = make_replay(cfg.sampler, capacity=cfg.replay_capacity, dfs_mode=cfg.dfs_mode,
                             batch_size=mcfg.batch_size, imagine_batch_size=mcfg.imag_batch, seed=cfg.seed)
        if replay.obs_shape != obs_shape:
            raise ValueError(f"replay frames {replay.obs_shape} do not match the env's {obs_shape}")
        run = cls(cfg, mcfg, device, run_dir, env, wm, agent, replay, ActingContext.for_model(mcfg), act_rng)
        if state is None:
            run._begin()
        else:
            run._restore(state)
        return run

    def _begin(self) -> None:
        from wmbench.core.records import atomic_write_text
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.json",
                          json.dumps({"train": self.cfg.to_dict(), "model": self.mcfg.to_dict()}, indent=1))
        rewrite_jsonl(self.run_dir / "metrics.jsonl", 0)         # leftovers of a run killed before its
        shutil.rmtree(self.run_dir / "tb", ignore_errors=True)   # first checkpoint: it starts over
        self.obs, _ = self.env.reset(seed=self.cfg.seed)
        self.ctx.reset(self.obs)
        self.store_obs = self.obs

    def _restore(self, state: ckpt.Checkpoint) -> None:
        m, s, a = state.meta, state.state, state.arrays
        try:
            self.wm.load_training_state(s["wm"])          # weights + buffers, optimiser, warm-up schedule
            self.agent.load_training_state(s["agent"])
            self.replay.load_state_dict({k[len("replay."):]: v for k, v in a.items() if k.startswith("replay.")})
            torch.set_rng_state(s["torch_rng"].cpu())
            if self.device.type == "cuda" and "cuda_rng" in s:
                torch.cuda.set_rng_state(s["cuda_rng"].cpu(), self.device)
            ckpt.set_python_rng_state(m["python_rng"])
            ckpt.set_numpy_global_rng_state(m["numpy_rng"])
            self.act_rng = ckpt.generator_from_state(m["act_rng"])
            # check_meta made sure every field is there, except those an older checkpoint lacks
            self.progress = Progress(**{f.name: m[f.name] for f in dataclasses.fields(Progress) if f.name in m})
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {state.path} does not fit this run "
                                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        step = self.progress.step
        if step > self.cfg.steps:
            raise UserError(f"{self.run_dir} is already at env step {step}, beyond --steps {self.cfg.steps}; "
                            f"use --steps {step} or more to continue it, or another --run-dir")
        restored = False
        if m.get("env") is not None and step < self.cfg.steps:
            try:
                set_env_state(self.env, m["env"], {k: v for k, v in a.items() if k.startswith("env_")})
                self.obs = a["current_obs"]
                self.store_obs = a["store_obs"] if "store_obs" in a else self.obs
                self.ctx.load(a["ctx_obs"], a["ctx_act"])
                restored = True
            except Exception as e:  # noqa: BLE001 - fall back to a fresh episode
                print(f"warning: could not restore the environment ({e}); its episode restarts", file=sys.stderr)
        if not restored:
            if len(self.replay):
                self.replay.is_last[(self.replay.ptr - 1) % self.replay.capacity] = True   # close the cut episode
            self.obs, _ = self.env.reset(seed=self.cfg.seed + 7919 * (step + 1))
            self.ctx.reset(self.obs)
            self.store_obs = self.obs
        rewrite_jsonl(self.run_dir / "metrics.jsonl", step)
        self.resumed_from = step
        print(f"resuming {self.run_dir} from env step {step} ({self.progress.n_updates} updates, "
              f"{len(self.progress.episodes)} episodes)", file=sys.stderr)

    def note_start(self) -> None:
        """Add this session's choices to `progress.starts` (call once its thread count is set): the auto
        choices are made again at each start, so one resumed run may have used several."""
        cfg = self.cfg
        self.progress.starts.append({"step": self.progress.step, "auto_choices": dict(cfg.auto_choices),
                                     "precision": cfg.precision, "threads": torch.get_num_threads(),
                                     "compile": cfg.compile})

    # --- saving
    def elapsed(self) -> float:
        """Wall time of the whole run so far, all sessions."""
        return self.progress.elapsed_s + (time.perf_counter() - self.t_session)

    def save(self) -> Path:
        """One atomic checkpoint of every field in SAVED, named by the current env step."""
        es = env_state(self.env)
        arrays = {f"replay.{k}": v for k, v in self.replay.state_dict().items()}
        o, a = self.ctx.arrays()
        arrays.update(current_obs=np.asarray(self.obs), store_obs=np.asarray(self.store_obs), ctx_obs=o, ctx_act=a)
        if es is not None:
            arrays.update(es[1])
        st = {"wm": self.wm.training_state(), "agent": self.agent.training_state(),
              "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        meta = {**dataclasses.asdict(self.progress), "elapsed_s": self.elapsed(), "config": self.cfg.to_dict(),
                "python_rng": ckpt.python_rng_state(), "numpy_rng": ckpt.numpy_global_rng_state(),
                "act_rng": ckpt.generator_state(self.act_rng), "env": None if es is None else es[0]}
        del meta["step"]   # the checkpoint's own step
        return ckpt.save_checkpoint(self.run_dir, self.progress.step, st, arrays, meta)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# meta.json fields a run restores, and what each must hold (a hand-edited file is refused, not trusted)
META_CHECKS = {
    "step": _is_int, "n_updates": _is_int, "credit": _is_num, "elapsed_s": _is_num, "update_time_s": _is_num,
    "episodes": lambda v: isinstance(v, list) and all(
        isinstance(e, dict) and _is_int(e.get("step")) and _is_num(e.get("return")) and _is_int(e.get("length"))
        for e in v),
    "eval_history": lambda v: isinstance(v, list) and all(isinstance(e, dict) and _is_int(e.get("step")) for e in v),
    "config": lambda v: isinstance(v, dict),
    "python_rng": lambda v: isinstance(v, list) and len(v) == 3 and isinstance(v[1], list),
    "numpy_rng": lambda v: isinstance(v, list) and len(v) == 5 and isinstance(v[1], list),
    "act_rng": lambda v: isinstance(v, dict) and "bit_generator" in v,
    "env": lambda v: v is None or isinstance(v, dict),
    "starts": lambda v: isinstance(v, list) and all(isinstance(e, dict) and _is_int(e.get("step")) for e in v),
}
META_ADDED_LATER = frozenset({"starts"})   # an older checkpoint lacks them: restored as their default


def check_meta(meta: dict, path) -> None:
    """Every field of meta.json the run restores has the type it was written with."""
    bad = [k for k, ok in META_CHECKS.items() if not (ok(meta[k]) if k in meta else k in META_ADDED_LATER)]
    if bad:
        raise ckpt.CheckpointError(f"checkpoint {path} has an invalid meta.json ({', '.join(bad)}); "
                                   "was it edited? delete the run dir or restore the file")


def _refuse_diff(saved: dict, cfg: TrainConfig, what: str) -> None:
    diff = ckpt.config_diff(saved, cfg.to_dict(), ignore=RESUMABLE_CHANGES)
    if diff:
        raise UserError(f"{what} was made with a different config ({'; '.join(diff)}); "
                        f"use the same options or another --run-dir")


def _refuse_other_config(cfg: TrainConfig, run_dir: Path) -> None:
    path = run_dir / "config.json"
    if not os.path.lexists(path):
        return
    saved = read_json_object(path, "run config").get("train")
    if not isinstance(saved, dict):
        raise UserError(f"run config {path} has no \"train\" object; restore the file or use another --run-dir")
    _refuse_diff(saved, cfg, f"run dir {run_dir}")


def rewrite_jsonl(path: Path, keep_until_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again), and lines that
    are no row of ours (cut by a crash, hand-edited): skipped with a warning, never trusted."""
    from wmbench.core.records import atomic_write_text
    if not path.exists():
        return
    keep, bad = [], []
    for n, row in iter_jsonl(path, bad):
        if not _is_int(row.get("step")):
            bad.append((n, "no env step"))
        elif row["step"] <= keep_until_step:
            keep.append(json.dumps(row))     # as RunLog wrote it
    warn_skipped(path, sorted(bad))
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def warn_skipped(path: Path, bad: list[tuple[int, str]], most: int = 5) -> None:
    """One warning per skipped line, up to `most`, then one for the rest."""
    for n, reason in bad[:most]:
        print(f"warning: skipping line {n} of {path}: {reason}", file=sys.stderr)
    if len(bad) > most:
        print(f"warning: skipping {len(bad) - most} more bad lines of {path}", file=sys.stderr)


LOCK = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold an exclusive lock on RUN_DIR/.lock (holding this process's pid) while the block runs, so two
    processes never train one run dir (each would log every row again). Another holder: one-line
    UserError naming its pid, before anything is written."""
    writable_dir(run_dir, "--run-dir")
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"run dir {run_dir} is in use by another process (pid {holder}, lock {path}); "
                            "wait for it to end, or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)     # no holder; the file stays (unlinking it would let two lock it at once)
    finally:
        os.close(fd)                # releases the lock
