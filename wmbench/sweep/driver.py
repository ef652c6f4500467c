"""`wmbench sweep`: run every run of a spec once, on one executor, resumably.

The sweep keeps its state in one folder (default runs/sweeps/<name>/):

    plan.json             the expanded runs (key, command line)
    done/<key>.json       written atomically when a run exits 0: a run with one is never run again
    logs/<key>.<n>.log    every attempt's output, kept
    locks/<key>.lock      held (flock) while a run is alive, so two sweeps never run it twice at once

and agent runs keep their checkpoints in runs/sweeps/agent/<key>/ (beside the state folder, so two
sweeps that contain the same run share it); re-running an agent's command resumes it.

Resuming is re-running the same command. A run that was killed half-way has no done file and runs
again; the commands themselves skip a run whose record exists and resume an agent from its checkpoint,
so a run killed between writing its record and its done file costs seconds. Records go to --runs-dir,
written by the runs themselves under unique names.
"""
from __future__ import annotations

import collections
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wmbench.core.records import atomic_write_text
from wmbench.sweep.spec import Run


@dataclass
class Outcome:
    done: list = field(default_factory=list)          # [(run, wall_s, attempts)]
    skipped: list = field(default_factory=list)       # runs done by an earlier sweep
    failed: list = field(default_factory=list)        # [(run, log path)]
    busy: list = field(default_factory=list)          # runs alive in another process


def run_argv(run: Run, runs_dir: Path, state: Path, threads: int | None = None) -> list[str]:
    """The command line of a run: the spec's options, plus where records (and agent checkpoints) go and
    the executor's thread count. These extras are not part of the run's key: the same run resumes under
    another executor or worker count."""
    argv = run.argv() + ["--runs-dir", str(runs_dir), "--no-progress"]
    if threads is not None and run.option("threads") is None:
        argv += ["--threads", str(threads)]
    if run.command == "atari" and run.option("run_dir") is None:
        argv += ["--run-dir", str(state.parent / "agent" / run.key)]    # shared by sweeps with this parent
    return argv


def _lock(path: Path) -> int | None:
    """An exclusive lock on `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _next_attempt(logs: Path, key: str) -> int:
    return 1 + sum(1 for _ in logs.glob(f"{key}.*.log"))


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """done / running / failed with an ETA from the mean wall time of the runs finished so far."""

    def __init__(self, total: int, workers: int | None, show: bool):
        self.total, self.workers, self.show, self.t0 = total, workers, show, time.monotonic()
        self.bar = None
        if show and total:
            import tqdm
            tqdm.tqdm.monitor_interval = 0          # no monitor thread: children are forked from here
            self.bar = tqdm.tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)

    def update(self, n_done: int, running: int, failed: int, walls: list[float]) -> None:
        left = self.total - n_done - failed
        eta = "?"
        if walls:
            parallel = max(1, min(self.workers or running or 1, left or 1))
            eta = _fmt_s(sum(walls) / len(walls) * max(0, left - running / 2) / parallel)
        if self.bar is not None:
            self.bar.n = n_done + failed
            self.bar.set_postfix_str(f"done {n_done}, running {running}, failed {failed}, ETA {eta}", refresh=True)

    def say(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_sweep(runs: list[Run], backend, state: Path, runs_dir: Path, retries: int = 1, threads: int | None = None,
              progress: bool = True, poll_s: float = 0.5) -> Outcome:
    for sub in ("done", "logs", "locks"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_text(state / "plan.json", json.dumps(
        [{"key": r.key, "label": r.label, "argv": run_argv(r, runs_dir, state, threads)} for r in runs], indent=1))
    out = Outcome()
    queue = collections.deque()
    for run in runs:
        (out.skipped if (state / "done" / f"{run.key}.json").exists() else queue).append(run)
    bar = _Progress(len(queue), getattr(backend, "capacity", None), progress)
    if out.skipped:
        bar.say(f"{len(out.skipped)} of {len(runs)} runs already done (state: {state}); running the other {len(queue)}")
    active: dict[str, tuple] = {}      # key -> (run, handle, lock fd, attempt, start time, log)
    attempts = collections.Counter()
    walls: list[float] = []

    def start(batch: list[Run]) -> None:
        items = []
        for run in batch:
            fd = _lock(state / "locks" / f"{run.key}.lock")
            if fd is None:
                out.busy.append(run)
                bar.say(f"busy    {run.label}: another process is running it (lock {state / 'locks'})")
                continue
            attempts[run.key] += 1
            log = state / "logs" / f"{run.key}.{_next_attempt(state / 'logs', run.key)}.log"
            items.append((run, fd, log))
        if not items:
            return
        argvs = [(run_argv(r, runs_dir, state, threads), log) for r, _, log in items]
        if hasattr(backend, "submit_many") and len(items) > 1:
            handles = backend.submit_many(argvs)
        else:
            handles = [backend.submit(a, log, fd) for (a, log), (_, fd, _) in zip(argvs, items)]
        for (run, fd, log), h in zip(items, handles):
            active[run.key] = (run, h, fd, attempts[run.key], time.monotonic(), log)

    try:
        while queue or active:
            room = len(queue) if backend.capacity is None else backend.capacity - len(active)
            if room > 0 and queue:
                start([queue.popleft() for _ in range(min(room, len(queue)))])
            for key in list(active):
                run, h, fd, attempt, t0, log = active[key]
                rc = backend.poll(h)
                if rc is None:
                    continue
                del active[key]
                os.close(fd)
                wall = time.monotonic() - t0
                if rc == 0:
                    atomic_write_text(state / "done" / f"{key}.json", json.dumps({
                        "key": key, "label": run.label, "argv": run_argv(run, runs_dir, state, threads), "wall_s": wall,
                        "attempts": attempt, "log": str(log), "executor": backend.name,
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
                    out.done.append((run, wall, attempt))
                    walls.append(wall)
                    bar.say(f"done    {run.label} ({_fmt_s(wall)})")
                elif attempt <= retries:
                    bar.say(f"retry   {run.label}: exit {rc}, attempt {attempt} of {retries + 1} (log {log})")
                    queue.append(run)
                else:
                    out.failed.append((run, log))
                    bar.say(f"FAILED  {run.label}: exit {rc} after {attempt} attempt(s); log {log}")
            bar.update(len(out.done), len(active), len(out.failed), walls)
            if active or queue:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for run, h, fd, *_ in active.values():
            backend.cancel(h)
            os.close(fd)
        bar.close()
        print(f"sweep interrupted: {len(out.done) + len(out.skipped)} of {len(runs)} runs done; "
              "re-run the same command to resume", file=sys.stderr)
        raise
    bar.close()
    backend.close()
    return out


def summary(out: Outcome, total: int, state: Path) -> list[str]:
    lines = [f"sweep: {len(out.done)} run now, {len(out.skipped)} done before, {len(out.failed)} failed, "
             f"{len(out.busy)} busy elsewhere, of {total} (state: {state})"]
    for run, log in out.failed:
        lines.append(f"  failed: {run.label}  (log {log})")
    for run in out.busy:
        lines.append(f"  busy:   {run.label}  (re-run the sweep when its other process ends)")
    return lines
