"""Where sweep runs execute: local child processes, SLURM through submitit, or Ray tasks.

Each backend starts a run (`submit`, with the file where the run lists its records), says whether it
has finished (`poll` -> exit code or None), asks it to stop (`stop`: one SIGTERM, so an agent saves a
checkpoint) and kills it (`cancel`); the scheduling, retries and bookkeeping live in driver.py, the same
for all three. submitit and Ray are the optional extra `wmbench[sweep]`, imported only when chosen.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from wmbench.sweep import worker


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ValueError(f"--executor {'slurm' if name == 'submitit' else name} needs {name}: "
                         "pip install 'wmbench[sweep]'") from None


class LocalBackend:
    """N child processes on this machine. The run's lock file descriptor is inherited by the child, so
    the lock is held for as long as the run lives, even past the death of the sweep that started it."""
    name = "local"

    def __init__(self, workers: int = 1):
        if int(workers) < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.capacity = int(workers)

    def submit(self, argv: list[str], log: Path, receipt: Path, lock_fd: int | None = None):
        return worker.start(argv, log, pass_fds=(lock_fd,) if lock_fd is not None else (), receipt=receipt)

    def poll(self, proc) -> int | None:
        return proc.poll()

    def stop(self, proc) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def cancel(self, proc) -> None:
        """Kill the run and whatever it started: it leads its own process group."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def close(self) -> None:
        pass


class SubmititBackend:
    """SLURM jobs through submitit's AutoExecutor: the first submission goes as one job array; retries go
    as single jobs. `cluster="local"` or `"debug"` runs the same code path without SLURM (tests).

    A job near its time limit or pre-empted checkpoints its run and is requeued (worker.CheckpointableRun);
    SLURM warns it `grace_s` + 30 s before the limit, the time the run has to save. Stopping the sweep
    cancels its jobs: SLURM sends them SIGTERM, then SIGKILL after its KillWait."""
    name = "slurm"
    capacity = None                 # SLURM queues everything; array_parallelism bounds what runs at once

    def __init__(self, folder: Path, params: dict, cluster: str | None = None, grace_s: float = 300.0):
        submitit = _import("submitit")
        self.ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self.ex.update_parameters(**slurm_parameters(params, grace_s))
        self.job = worker.CheckpointableRun(grace_s)

    def submit_many(self, items: list[tuple]) -> list:
        with self.ex.batch():          # one array job on SLURM
            jobs = [self.ex.submit(self.job, argv, str(log), os.getcwd(), str(receipt))
                    for argv, log, receipt in items]
        return jobs

    def submit(self, argv: list[str], log: Path, receipt: Path, lock_fd: int | None = None):
        return self.ex.submit(self.job, argv, str(log), os.getcwd(), str(receipt))

    def poll(self, job) -> int | None:
        if not job.done():
            return None
        try:
            return int(job.result())
        except Exception as e:  # noqa: BLE001 - a job killed by SLURM (time limit, node failure) is a failed run
            self.last_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            return -1

    def stop(self, job) -> None:
        self.cancel(job)

    def cancel(self, job) -> None:
        try:
            job.cancel(check=False)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    def close(self) -> None:
        pass


def slurm_parameters(params: dict, grace_s: float = 300.0) -> dict:
    """The spec's [executor] keys as submitit AutoExecutor parameters. SLURM signals a job
    `slurm_signal_delay_s` before its time limit: enough for the run to checkpoint within the grace."""
    names = {"partition": "slurm_partition", "time_min": "timeout_min", "cpus": "cpus_per_task",
             "gpus": "gpus_per_node", "mem_gb": "mem_gb", "parallelism": "slurm_array_parallelism",
             "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint"}
    out = {"timeout_min": 60 * 24, "cpus_per_task": 1, "name": "wmbench", "slurm_signal_delay_s": int(grace_s) + 30}
    for k, v in params.items():
        if k in names:
            out[names[k]] = v
        elif k.startswith("slurm_"):
            out[k] = v
    return out


def sbatch_script(folder: Path, params: dict, n_runs: int, grace_s: float = 300.0) -> str:
    """The sbatch file submitit writes for the sweep's job array (for --dry-run), rendered by submitit's
    own function (private to submitit: the text is only shown, never submitted from here). Works where
    SLURM is not installed."""
    _import("submitit")             # the one-line error where it is missing
    import shlex
    import sys
    from submitit.slurm import slurm
    p = slurm_parameters(params, grace_s)
    kw = {k: v for k, v in {
        "partition": p.get("slurm_partition"), "time": p["timeout_min"], "cpus_per_task": p["cpus_per_task"],
        "gpus_per_node": p.get("gpus_per_node"), "mem": f"{p['mem_gb']}GB" if p.get("mem_gb") else None,
        "array_parallelism": p.get("slurm_array_parallelism", 256), "job_name": p["name"],
        "account": p.get("slurm_account"), "qos": p.get("slurm_qos"), "constraint": p.get("slurm_constraint"),
        "signal_delay_s": p["slurm_signal_delay_s"],
    }.items() if v is not None}
    command = f"{sys.executable} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return slurm._make_sbatch_string(command=command, folder=str(folder), map_count=n_runs, **kw)


class RayBackend:
    """Ray tasks on an existing cluster (`address`), or on a local Ray started for the sweep."""
    name = "ray"
    capacity = None                 # Ray schedules by the CPUs and GPUs each task asks for

    def __init__(self, address: str | None = None, cpus: float = 1, gpus: float = 0):
        self.ray = _import("ray")
        if not self.ray.is_initialized():
            self.ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                          configure_logging=False)
        self.task = self.ray.remote(worker.run_one).options(num_cpus=float(cpus), num_gpus=float(gpus),
                                                            max_retries=0)

    def submit(self, argv: list[str], log: Path, receipt: Path, lock_fd: int | None = None):
        return self.task.remote(argv, str(log), os.getcwd(), str(receipt))

    def poll(self, ref) -> int | None:
        ready, _ = self.ray.wait([ref], timeout=0)
        if not ready:
            return None
        try:
            return int(self.ray.get(ref))
        except Exception as e:  # noqa: BLE001 - a worker lost with its node is a failed run
            self.last_error = type(e).__name__
            return -1

    def stop(self, ref) -> None:
        self.cancel(ref)

    def cancel(self, ref) -> None:
        try:
            self.ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        pass
