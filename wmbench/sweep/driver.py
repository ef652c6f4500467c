"""`wmbench sweep`: run every run of a spec once, on one executor, resumably.

The sweep keeps its state in one folder (default runs/sweeps/<name>/):

    plan.json                  the expanded runs (key, command line)
    receipts/<key>.<n>.jsonl   attempt n's receipt: the run appends one line per record it put in --runs-dir
                               (or found there already), through $WMBENCH_RECEIPT
    done/<key>.json            written atomically when an attempt exits 0 and its receipt lists records that
                               are valid records inside --runs-dir; it lists them
    logs/<key>.<n>.log         every attempt's output, kept
    locks/<key>.lock           held (flock) while a run is alive, so two sweeps never run it twice at once

and agent runs keep their checkpoints in runs/sweeps/agent/<key>/ (beside the state folder, so two
sweeps that contain the same run share it); re-running an agent's command resumes it.

A run is done when its record is in --runs-dir, not when it exits 0: an exit 0 whose receipt lists no
valid record there ("exit 0 but no record reached RUNS_DIR") is a failed attempt, retried like any other.
A done file counts only while it is a JSON object with the run's key whose records are still in
--runs-dir; otherwise the run runs again (the commands skip finished work in seconds), with a line saying
why.

Resuming is re-running the same command. A run that was killed half-way has no done file and runs
again; the commands themselves skip a run whose record exists and resume an agent from its checkpoint,
so a run killed between writing its record and its done file costs seconds. Records go to --runs-dir,
written by the runs themselves under unique names.

Stopping: the first SIGINT or SIGTERM starts no more runs and sends each running run one SIGTERM (the
runs lead their own sessions, so a signal to the sweep's process group reaches the driver alone); an
agent saves a checkpoint at the end of its env step and exits. The driver waits for them up to the grace
period (--grace-s), or until a second signal, then kills the rest. Runs stopped this way are neither done
nor failed: the same command resumes them. The CLI then exits 130 (SIGINT) or 143 (SIGTERM).
"""
from __future__ import annotations

import collections
import fcntl
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from wmbench.core.errors import UserError
from wmbench.core.readback import iter_jsonl, read_json_object
from wmbench.core.records import atomic_write_text, validate_record
from wmbench.sweep.spec import Run


@dataclass
class Outcome:
    done: list = field(default_factory=list)          # [(run, wall_s, attempts)]
    skipped: list = field(default_factory=list)       # runs done by an earlier sweep
    failed: list = field(default_factory=list)        # [(run, log path)]
    busy: list = field(default_factory=list)          # runs alive in another process
    stopped: list = field(default_factory=list)       # runs stopped by a signal: the same command resumes them
    left: list = field(default_factory=list)          # runs not started because of a signal
    signal: int | None = None                         # the signal that stopped the sweep


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


# ------------------------------------------------------------------------- records, receipts, done files

def record_problem(path, runs_dir: Path) -> str | None:
    """Why `path` (from a receipt or a done file) is not a valid record inside `runs_dir`; None if it is."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return f"{path!r} is not an absolute path"
    if Path(path).parent.resolve() != runs_dir.resolve():
        return f"record {path} is not in {runs_dir}"
    try:
        validate_record(read_json_object(path, "record"))
    except UserError as e:                        # missing, not a regular file, not JSON: names the path
        return str(e)
    except ValueError as e:
        return f"record {path}: {e}"
    return None


def receipt_records(receipt: Path, runs_dir: Path) -> tuple[list[str], str | None]:
    """The records an attempt that exited 0 listed in its receipt, or why they do not make it done."""
    bad: list = []
    try:
        records = list(dict.fromkeys(row.get("record") for _, row in iter_jsonl(receipt, bad)))
    except UserError as e:
        return [], f"exit 0 but {e}"
    if bad:
        return [], f"exit 0 but line {bad[0][0]} of receipt {receipt} is {bad[0][1]}"
    if not records:
        return [], f"exit 0 but no record reached {runs_dir}"
    for path in records:
        problem = record_problem(path, runs_dir)
        if problem:
            return [], f"exit 0 but {problem}"
    return records, None


def done_problem(run: Run, state: Path, runs_dir: Path) -> str | None:
    """Why `run` is not done (its done file missing, garbage, another run's, or its records gone from
    `runs_dir`); None if it is. A missing done file is the empty reason: nothing to say."""
    marker = state / "done" / f"{run.key}.json"
    if not os.path.lexists(marker):
        return ""
    try:
        done = read_json_object(marker, "done file")
    except UserError as e:
        return str(e)
    if done.get("key") != run.key:
        return f"done file {marker} is not this run's (key {done.get('key')!r})"
    records = done.get("records")
    if not isinstance(records, list) or not records:
        return f"done file {marker} lists no records (written before records were listed?)"
    for path in records:
        problem = record_problem(path, runs_dir)
        if problem:
            return problem
    return None


# ------------------------------------------------------------------------------------- helpers

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


class _Signals:
    """SIGINT and SIGTERM, counted instead of ending the driver at once: the sweep stops its runs on the
    first and kills them on the second."""

    def __init__(self):
        self.received: list[int] = []
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, frame) -> None:
        self.received.append(signum)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


# ------------------------------------------------------------------------------------- the sweep

@dataclass
class _Attempt:
    run: Run
    handle: object
    lock_fd: int
    n: int                 # this run's attempt in this sweep (for retries)
    t0: float
    log: Path
    receipt: Path


class _Sweep:
    def __init__(self, runs: list[Run], backend, state: Path, runs_dir: Path, retries: int,
                 threads: int | None, progress: bool):
        self.runs, self.backend, self.state, self.runs_dir = runs, backend, state, runs_dir
        self.retries, self.threads = retries, threads
        self.out = Outcome()
        self.queue: collections.deque = collections.deque()
        self.active: dict[str, _Attempt] = {}
        self.attempts = collections.Counter()
        self.walls: list[float] = []
        self.plan()
        self.bar = _Progress(len(self.queue), getattr(backend, "capacity", None), progress)
        if self.out.skipped:
            self.bar.say(f"{len(self.out.skipped)} of {len(runs)} runs already done (state: {state}); "
                         f"running the other {len(self.queue)}")

    def argv(self, run: Run) -> list[str]:
        return run_argv(run, self.runs_dir, self.state, self.threads)

    def plan(self) -> None:
        for sub in ("done", "logs", "locks", "receipts"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.state / "plan.json", json.dumps(
            [{"key": r.key, "label": r.label, "argv": self.argv(r)} for r in self.runs], indent=1))
        for run in self.runs:
            problem = done_problem(run, self.state, self.runs_dir)
            if problem is None:
                self.out.skipped.append(run)
                continue
            if problem:
                print(f"run again {run.label}: {problem}")
            self.queue.append(run)

    def start(self, batch: list[Run]) -> None:
        items = []
        for run in batch:
            fd = _lock(self.state / "locks" / f"{run.key}.lock")
            if fd is None:
                self.out.busy.append(run)
                self.bar.say(f"busy    {run.label}: another process is running it (lock {self.state / 'locks'})")
                continue
            self.attempts[run.key] += 1
            n = _next_attempt(self.state / "logs", run.key)
            receipt = self.state / "receipts" / f"{run.key}.{n}.jsonl"
            receipt.write_bytes(b"")          # this attempt's own, empty even where an old one was left
            items.append(_Attempt(run, None, fd, self.attempts[run.key], 0.0,
                                  self.state / "logs" / f"{run.key}.{n}.log", receipt))
        if not items:
            return
        if hasattr(self.backend, "submit_many") and len(items) > 1:
            handles = self.backend.submit_many([(self.argv(a.run), a.log, a.receipt) for a in items])
        else:
            handles = [self.backend.submit(self.argv(a.run), a.log, a.receipt, a.lock_fd) for a in items]
        for a, h in zip(items, handles):
            a.handle, a.t0 = h, time.monotonic()
            self.active[a.run.key] = a

    def poll(self, stopping: bool = False) -> None:
        for key in list(self.active):
            rc = self.backend.poll(self.active[key].handle)
            if rc is not None:
                self.finish(self.active.pop(key), rc, stopping)

    def finish(self, a: _Attempt, rc: int, stopping: bool) -> None:
        """Done only where the receipt shows records in runs_dir; else retried, failed, or (while the
        sweep stops) stopped."""
        os.close(a.lock_fd)
        wall = time.monotonic() - a.t0
        records, problem = receipt_records(a.receipt, self.runs_dir) if rc == 0 else ([], f"exit {rc}")
        run = a.run
        if problem is None:
            atomic_write_text(self.state / "done" / f"{run.key}.json", json.dumps({
                "key": run.key, "label": run.label, "argv": self.argv(run), "records": records, "wall_s": wall,
                "attempts": a.n, "log": str(a.log), "executor": self.backend.name,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
            self.out.done.append((run, wall, a.n))
            self.walls.append(wall)
            self.bar.say(f"done    {run.label} ({_fmt_s(wall)})")
        elif stopping:
            self.out.stopped.append(run)
            self.bar.say(f"stopped {run.label}: {problem} (log {a.log})")
        elif a.n <= self.retries:
            self.bar.say(f"retry   {run.label}: {problem}, attempt {a.n} of {self.retries + 1} (log {a.log})")
            self.queue.append(run)
        else:
            self.out.failed.append((run, a.log))
            self.bar.say(f"FAILED  {run.label}: {problem} after {a.n} attempt(s); log {a.log}")

    def run(self, signals: _Signals, poll_s: float) -> None:
        while (self.queue or self.active) and not signals.received:
            capacity = self.backend.capacity
            room = len(self.queue) if capacity is None else capacity - len(self.active)
            if room > 0 and self.queue:
                self.start([self.queue.popleft() for _ in range(min(room, len(self.queue)))])
            self.poll()
            self.bar.update(len(self.out.done), len(self.active), len(self.out.failed), self.walls)
            if self.active or self.queue:
                time.sleep(poll_s)

    def stop(self, signals: _Signals, grace_s: float, poll_s: float) -> None:
        """One SIGTERM to each running run, a wait of up to `grace_s` for them to save and exit (cut short
        by a second signal), then the rest killed."""
        self.out.signal = signals.received[0]
        self.out.left, self.queue = list(self.queue), collections.deque()
        if self.active:
            self.bar.say(f"{signal.Signals(self.out.signal).name}: stopping {len(self.active)} run(s), waiting up "
                         f"to {_fmt_s(grace_s)} for their checkpoints (send it again to kill them now)")
        for a in self.active.values():
            self.backend.stop(a.handle)
        deadline = time.monotonic() + grace_s
        while self.active and len(signals.received) < 2 and time.monotonic() < deadline:
            time.sleep(poll_s)
            self.poll(stopping=True)
        if self.active:
            why = "second signal" if len(signals.received) >= 2 else "grace period over"
            self.bar.say(f"{why}: killing {len(self.active)} run(s)")
        for key in list(self.active):
            a = self.active.pop(key)
            self.backend.cancel(a.handle)
            self.finish(a, -int(signal.SIGKILL), stopping=True)


def run_sweep(runs: list[Run], backend, state: Path, runs_dir: Path, retries: int = 1, threads: int | None = None,
              progress: bool = True, poll_s: float = 0.5, grace_s: float = 300.0) -> Outcome:
    with _Signals() as signals:
        sweep = _Sweep(runs, backend, state, runs_dir, retries, threads, progress)
        sweep.run(signals, poll_s)
        if signals.received:
            sweep.stop(signals, grace_s, poll_s)
    sweep.bar.close()
    backend.close()
    return sweep.out


def summary(out: Outcome, total: int, state: Path) -> list[str]:
    if out.signal is not None:
        return [f"sweep stopped by {signal.Signals(out.signal).name}: {len(out.done) + len(out.skipped)} done, "
                f"{len(out.stopped)} stopped, {len(out.left)} left, {len(out.failed)} failed, of {total}; "
                f"re-run the same command to resume (state: {state})"]
    lines = [f"sweep: {len(out.done)} run now, {len(out.skipped)} done before, {len(out.failed)} failed, "
             f"{len(out.busy)} busy elsewhere, of {total} (state: {state})"]
    for run, log in out.failed:
        lines.append(f"  failed: {run.label}  (log {log})")
    for run in out.busy:
        lines.append(f"  busy:   {run.label}  (re-run the sweep when its other process ends)")
    return lines
