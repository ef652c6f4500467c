"""How long a run will take, and with how many threads, from a few seconds of measurement.

One update (world-model step on b x l windows, imagination from b_img contexts, actor-critic step) is
timed on throw-away models at growing fractions f of the real batch sizes (1/16, 1/8, 1/4, ...; sequence
lengths and widths unchanged) while the measurement stays within a few seconds. If the full batch fits,
its time is the estimate; otherwise the line t(f) = t0 + f * t_batch through the two largest fractions
timed is extrapolated to f = 1 (t0: the fixed per-update cost, optimiser steps and Python). Two small
fractions alone were not enough: at the `cpu` size their times differ by less than their noise, and the
16x extrapolation of that difference printed 0.09 s and 0.58 s per update on two starts of the same
command (0.19 s measured). Timing the full XS update three times took 5.5 minutes on a 2-core CPU; this
takes seconds.

Threads (CPU, when --threads is not given): the smallest fraction is timed at 1 thread and at every core
this process may use, the fastest count times the larger fractions, and the others are timed again at
the largest one, where the choice is made: a small batch can favour fewer threads than the real one.
The global RNGs are not touched (fork_rng, a local numpy generator).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)   # timed in turn while the measurement fits MEASURE_BUDGET_S
MEASURE_BUDGET_S = 2.0    # seconds for the fractions after the thread choice


@dataclass
class UpdateEstimate:
    s_per_update: float                       # extrapolated seconds per full update
    threads: int                              # threads it was measured with (and the run uses)
    by_threads: dict = field(default_factory=dict)   # threads -> seconds of the update at `threads_at`
    measure_s: float = 0.0                    # how long the measurement itself took
    by_fraction: dict = field(default_factory=dict)  # batch fraction -> seconds (best of its repeats)
    threads_at: float = 1 / 16                # the batch fraction the thread counts were compared at
    method: str = ("one update timed on throw-away models at batch fractions 1/16, 1/8, ... of (b, b_img) while "
                   f"the measurement fits {MEASURE_BUDGET_S:g} s; the full batch's time if reached, else the line "
                   "through the two largest fractions extrapolated to the full batch")


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
        batches: dict = {}

        def timed(f: float) -> float:
            if f not in batches:
                batches[f] = random_batches(mcfg, obs_shape, n_actions, f)
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
        by_fraction = {FRACTIONS[0]: by_threads[best]}
        t_ladder = time.perf_counter()
        for f in FRACTIONS[1:]:
            predicted = _predict(by_fraction, f)          # one call at f
            reps = 1 if predicted > 1.0 else 3           # the first call at a new size pays one-off costs
            if len(by_fraction) > 1 and time.perf_counter() - t_ladder + predicted * reps > MEASURE_BUDGET_S:
                break                                    # (two fractions are always timed)
            by_fraction[f] = min(timed(f) for _ in range(reps))
        s_full, f_top, threads_at = _predict(by_fraction, 1.0), max(by_fraction), FRACTIONS[0]
        if len(candidates) > 1 and f_top > FRACTIONS[0]:
            # the thread choice again at the largest batch timed: a small batch can favour 1 thread where the
            # real one runs faster on all cores (XS here: 1 thread at 1/16 of the batch, 2 at 1/8)
            at_top = {best: by_fraction[f_top]}
            for n in candidates:
                if n != best:
                    torch.set_num_threads(n)
                    at_top[n] = min(timed(f_top) for _ in range(1 if at_top[best] > 1.0 else 2))
            top = min(at_top, key=at_top.get)
            s_full *= at_top[top] / at_top[best]     # the other count: scaled by its time at f_top
            best, by_threads, threads_at = top, at_top, f_top
    torch.set_num_threads(old_threads)
    return UpdateEstimate(s_full, best, by_threads, time.perf_counter() - t_start, by_fraction, threads_at)


def _predict(by_fraction: dict, f: float) -> float:
    """Seconds at fraction f: measured, or on the line through the two largest fractions timed (with only
    one, proportional to the batch: an upper bound)."""
    if f in by_fraction:
        return by_fraction[f]
    points = sorted(by_fraction.items())
    if len(points) == 1:
        (f1, t1), = points
        return t1 * f / f1
    (f1, t1), (f2, t2) = points[-2:]
    return extrapolate(t1, t2, f1, f2, f)


def extrapolate(t1: float, t2: float, f1: float = FRACTIONS[0], f2: float = FRACTIONS[1],
                f: float = 1.0) -> float:
    """The time at fraction f on the line through (f1, t1) and (f2, t2); a smaller t2 (noise) counts as flat."""
    slope = max(t2 - t1, 0.0) / (f2 - f1)
    return t1 + slope * (f - f1)


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
