"""Runs one sweep run as a child process and returns its exit code; the same code runs on every executor.

Each run leads its own session, so a signal to the sweep's process group (Ctrl-C in its terminal, a
scheduler's `kill -TERM -PGID`) reaches only the driver, which forwards one SIGTERM to each run:
`wmbench atari` saves a checkpoint on the first signal and takes a second as "abort now".

On Linux the child is also tied to its parent with PR_SET_PDEATHSIG: if the sweep (or the SLURM/Ray
worker) is killed, even with `kill -9`, the run dies with it instead of living on as an orphan that a
resumed sweep would start a second time. Every file a run writes (records, checkpoints) is written
atomically, so a run killed at any moment leaves nothing half-written; re-running its command resumes or
redoes it.

The run's $WMBENCH_RECEIPT names the attempt's receipt file, where the run lists the records it put in
--runs-dir (wmbench.core.records.note_record); the driver marks the run done only on that list.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from wmbench.core.records import RECEIPT_ENV

_PR_SET_PDEATHSIG = 1
try:   # resolved here, not in the child: between fork and exec only the call itself should run
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _child_setup(ignore: tuple) -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    for sig in ignore:                     # an ignored signal stays ignored across exec
        signal.signal(sig, signal.SIG_IGN)


def command_line(argv: list[str]) -> list[str]:
    """The child's command: this Python running the wmbench CLI (the same install as the sweep's)."""
    return [sys.executable, "-m", "wmbench.cli", *argv]


def start(argv: list[str], log_path: str | os.PathLike, cwd: str | os.PathLike | None = None,
          pass_fds: tuple = (), receipt: str | os.PathLike | None = None, ignore: tuple = ()) -> subprocess.Popen:
    """Start one run with stdout and stderr in `log_path` (appended, with a header line), its records
    listed in `receipt`, and the signals in `ignore` ignored."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} wmbench {' '.join(argv)}\n".encode())
        log.flush()
        env = {k: v for k, v in os.environ.items() if k != RECEIPT_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if receipt is not None:
            env[RECEIPT_ENV] = str(receipt)
        return subprocess.Popen(command_line(argv), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, pass_fds=pass_fds, start_new_session=True,
                                preexec_fn=lambda: _child_setup(ignore))


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:      # the worker is being cancelled: take the run with it
            proc.kill()
            proc.wait()


def run_one(argv: list[str], log_path: str, cwd: str | None = None, receipt: str | None = None) -> int:
    """Run to completion and return the exit code: the function Ray workers call."""
    return _wait(start(argv, log_path, cwd, receipt=receipt))


class CheckpointableRun:
    """What a SLURM job (submitit) calls: `run_one`, plus submitit's checkpoint-and-requeue protocol
    (that of submitit.helpers.Checkpointable, not subclassed so that this module imports without
    submitit). Near its time limit, or when pre-empted, submitit calls `checkpoint` with the call's
    arguments: it SIGTERMs the run, waits up to `grace_s` for it to save its checkpoint and exit, and
    returns the same call, which submitit requeues; the requeued job resumes the run from there."""

    _proc: subprocess.Popen | None = None      # the live run (not pickled: submitit pickles the call)
    _got_sigterm = False

    def __init__(self, grace_s: float = 300.0):
        self.grace_s = float(grace_s)

    def __getstate__(self) -> dict:
        return {"grace_s": self.grace_s}

    def __call__(self, argv: list[str], log_path: str, cwd: str | None = None, receipt: str | None = None) -> int:
        # SLURM signals every process of the job: its pre-emption signal would kill the run before it
        # could save, and a SIGTERM to this worker reached the run too (see checkpoint)
        preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
        self._proc = start(argv, log_path, cwd, receipt=receipt, ignore=(preempt,))
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._note_sigterm) if main else None
        try:
            return _wait(self._proc)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

    def _note_sigterm(self, signum, frame) -> None:
        self._got_sigterm = True       # submitit ignores SIGTERM itself; the run is already saving

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if not self._got_sigterm:        # a second SIGTERM would abort the run's checkpoint
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return DelayedSubmission(CheckpointableRun(self.grace_s), *args, **kwargs)
