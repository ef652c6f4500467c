"""How long a run will take, and with how many threads, from a few seconds of measurement.

One update (world-model step on b x l windows, imagination from b_img contexts, actor-critic step) is
timed on throw-away models at two reduced batch fractions f1 < f2 of the real batch sizes (sequence
lengths and widths unchanged), and extrapolated linearly to f = 1: t(f) = t0 + f * t_batch, which
separates the fixed per-update cost (optimiser steps, Python) from the part that scales with the
batch. Timing the full update three times took 5.5 minutes at XS on a 2-core CPU; this takes seconds.

Threads (CPU, when --threads is not given): the reduced update is timed at 1 thread and at every core
this process may use; the fastest count is used. A larger batch parallelises at least as well, so the
choice errs toward fewer threads. The global RNGs are not touched (fork_rng, a local numpy generator).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

FRACTIONS = (1 / 16, 1 / 8)


@dataclass
class UpdateEstimate:
    s_per_update: float                       # extrapolated seconds per full update
    threads: int                              # threads it was measured with (and the run uses)
    by_threads: dict = field(default_factory=dict)   # threads -> seconds of the f1 update
    measure_s: float = 0.0                    # how long the measurement itself took
    method: str = (f"one update timed at batch fractions {FRACTIONS[0]:g} and {FRACTIONS[1]:g} of (b, b_img) "
                   "on throw-away models, linear in the batch, extrapolated to the full batch")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def estimate_update(mcfg, obs_shape: tuple, n_actions: int, device: torch.device,
                    threads: int | None = None) -> UpdateEstimate:
    """Seconds per full update on `device`; with threads=None on CPU, also the fastest thread count."""
    from wmbench.agent.actor_critic import ActorCritic
    from wmbench.world_model import WorldModel
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        wm, ac = WorldModel(mcfg, n_actions).to(device), ActorCritic(mcfg, n_actions).to(device)
        batches = {f: random_batches(mcfg, obs_shape, n_actions, f) for f in FRACTIONS}

        def timed(f: float) -> float:
            t0 = time.perf_counter()
            wm.train_step(batches[f][0])
            ac.update(wm.imagine(*batches[f][1], ac))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        if device.type == "cpu" and threads is None:
            candidates = sorted({1, usable_cores()})
        else:
            candidates = [threads or old_threads]
        by_threads = {}
        for n in candidates:
            torch.set_num_threads(n)
            first = timed(FRACTIONS[0])           # the first call at a setting pays one-off costs
            by_threads[n] = min(timed(FRACTIONS[0]) for _ in range(1 if first > 1.0 else 3))
        best = min(by_threads, key=by_threads.get)
        torch.set_num_threads(best)
        t1, reps = by_threads[best], 1 if by_threads[best] > 1.0 else 3
        t2 = min(timed(FRACTIONS[1]) for _ in range(reps))
    torch.set_num_threads(old_threads)
    return UpdateEstimate(extrapolate(t1, t2), best, by_threads, time.perf_counter() - t_start)


def extrapolate(t1: float, t2: float, f1: float = FRACTIONS[0], f2: float = FRACTIONS[1]) -> float:
    """The full-batch time of the line through (f1, t1) and (f2, t2); a smaller t2 (noise) counts as flat."""
    slope = max(t2 - t1, 0.0) / (f2 - f1)
    return t1 + slope * (1.0 - f1)


def random_batches(mcfg, obs_shape: tuple, n_actions: int, f: float):
    """A world-model batch and an imagination context at fraction f of the real batch sizes."""
    rng = np.random.default_rng(0)
    b, bi = max(1, round(mcfg.batch_size * f)), max(1, round(mcfg.imag_batch * f))
    L, C = mcfg.batch_length, mcfg.imag_context
    wm_batch = {"obs": rng.integers(0, 256, (b, L) + obs_shape, dtype=np.uint8),
                "action": rng.integers(0, n_actions, (b, L)), "reward": np.zeros((b, L), np.float32),
                "termination": np.zeros((b, L), bool)}
    ctx = (rng.integers(0, 256, (bi, C) + obs_shape, dtype=np.uint8), rng.integers(0, n_actions, (bi, C)))
    return wm_batch, ctx


def updates_left(cfg, step: int) -> float:
    """Updates still to come at env step `step`: one per env step after the warm-up (train_ratio each)."""
    return max(cfg.steps - max(step, cfg.warmup_steps), 0) * cfg.train_ratio


def fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    d, rem = divmod(int(s), 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"
