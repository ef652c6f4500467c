"""Runs one sweep run as a child process and returns its exit code; the same function runs on every executor.

On Linux the child is tied to its parent with PR_SET_PDEATHSIG: if the sweep (or the SLURM/Ray worker)
is killed, even with `kill -9`, the run dies with it instead of living on as an orphan that a resumed
sweep would start a second time. Every file a run writes (records, checkpoints) is written atomically,
so a run killed at any moment leaves nothing half-written; re-running its command resumes or redoes it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
try:   # resolved here, not in the child: between fork and exec only the call itself should run
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def command_line(argv: list[str]) -> list[str]:
    """The child's command: this Python running the wmbench CLI (the same install as the sweep's)."""
    return [sys.executable, "-m", "wmbench.cli", *argv]


def start(argv: list[str], log_path: str | os.PathLike, cwd: str | os.PathLike | None = None,
          pass_fds: tuple = ()) -> subprocess.Popen:
    """Start one run with stdout and stderr in `log_path` (appended, with a header line)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} wmbench {' '.join(argv)}\n".encode())
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.Popen(command_line(argv), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, pass_fds=pass_fds,
                                preexec_fn=_die_with_parent if _prctl is not None else None)


def run_one(argv: list[str], log_path: str, cwd: str | None = None) -> int:
    """Run to completion and return the exit code: the function SLURM (submitit) and Ray workers call."""
    proc = start(argv, log_path, cwd)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:      # the worker is being cancelled: take the run with it
            proc.kill()
            proc.wait()
