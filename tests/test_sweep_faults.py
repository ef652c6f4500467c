"""`wmbench sweep` under faults (issue 28): a run is done only when its record reached --runs-dir, bad or
stale done markers do not count, SIGINT/SIGTERM stop the runs gracefully (one signal each, a bounded
grace, a second signal kills), the SLURM job checkpoints and requeues, and bad values are one-line errors.

Most tests run a fake run (a small Python script in place of `python -m wmbench.cli`) so they take
seconds; one parametrised test stops and resumes a real tiny agent."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from wmbench.cli import main
from wmbench.core.records import SCHEMA_VERSION
from wmbench.sweep import worker
from wmbench.sweep.driver import run_sweep
from wmbench.sweep.executors import LocalBackend
from wmbench.sweep.spec import Run

# A stand-in for `wmbench run`: FAKE_MODE says what it does.
#   record     write a valid record into --runs-dir and note it in the receipt, exit 0
#   norecord   exit 0 having written nothing (an agent that says `already finished` with nothing in --runs-dir)
#   graceful   on SIGTERM/SIGINT: append the signal's name to FAKE_DIR/signals, exit 130
#   stubborn   on SIGTERM/SIGINT: append the signal's name, keep running (a long checkpoint)
FAKE = textwrap.dedent(f"""
    import json, os, signal, sys, time
    from pathlib import Path
    mode, out = os.environ["FAKE_MODE"], Path(os.environ["FAKE_DIR"])
    runs_dir = Path(sys.argv[sys.argv.index("--runs-dir") + 1])
    if mode == "record":
        from wmbench.core.records import note_record
        path = runs_dir / f"fake-{{os.getpid()}}.json"
        path.write_text(json.dumps({{"schema_version": {SCHEMA_VERSION!r}, "kind": "fake", "config": {{}},
                                    "environment": {{}}, "metrics": {{}}}}))
        note_record(path)
        sys.exit(0)
    if mode == "norecord":
        sys.exit(0)
    def on_signal(signum, frame):
        with open(out / "signals", "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
        if mode == "graceful":
            sys.exit(130)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    (out / f"pid.{{os.getpid()}}").write_text("")          # ready: the handlers are in place
    while True:
        time.sleep(0.05)
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Runs start the fake instead of wmbench; returns a function that sets its mode."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE)
    monkeypatch.setattr(worker, "command_line", lambda argv: [sys.executable, str(script), *argv])
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return lambda mode: monkeypatch.setenv("FAKE_MODE", mode)


def _sweep(tmp_path, runs, retries=0):
    return run_sweep(runs, LocalBackend(1), tmp_path / "state", tmp_path / "records", retries=retries,
                     progress=False, poll_s=0.05)


RUN = Run("run", (("seed", 0),))


def _spec(tmp_path, command: str, options: dict, grid: dict) -> Path:
    def table(d):
        return "{ " + ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in d.items()) + " }"
    p = tmp_path / "spec.toml"
    p.write_text(f'name = "faults"\n[[runs]]\ncommand = "{command}"\noptions = {table(options)}\n'
                 f"grid = {table(grid)}\n")
    return p


# --------------------------------------------------------------------- done means a record in --runs-dir

def test_exit_0_without_a_record_is_a_failed_run(tmp_path, fake, capsys):
    fake("norecord")
    (tmp_path / "records").mkdir()
    out = _sweep(tmp_path, [RUN], retries=1)
    assert not out.done and [r for r, _ in out.failed] == [RUN]
    assert not (tmp_path / "state" / "done" / f"{RUN.key}.json").exists()
    said = capsys.readouterr().out
    assert said.count("exit 0 but no record reached") == 2, said       # the attempt and its retry


def test_done_marker_lists_the_runs_record(tmp_path, fake):
    fake("record")
    (tmp_path / "records").mkdir()
    assert len(_sweep(tmp_path, [RUN]).done) == 1
    marker = json.loads((tmp_path / "state" / "done" / f"{RUN.key}.json").read_text())
    assert marker["key"] == RUN.key
    assert [Path(p).parent for p in marker["records"]] == [tmp_path / "records"]
    again = _sweep(tmp_path, [RUN])
    assert again.skipped == [RUN] and not again.done


@pytest.mark.parametrize("marker", ["garbage", "[1, 2]", '{"key": "someoneelse"}', "NaN", "deleted record"])
def test_a_bad_or_stale_done_marker_does_not_count(tmp_path, fake, capsys, marker):
    fake("record")
    (tmp_path / "records").mkdir()
    path = tmp_path / "state" / "done" / f"{RUN.key}.json"
    if marker == "deleted record":
        _sweep(tmp_path, [RUN])
        for rec in json.loads(path.read_text())["records"]:
            os.unlink(rec)
    else:
        path.parent.mkdir(parents=True)
        path.write_text(marker)
    capsys.readouterr()
    out = _sweep(tmp_path, [RUN])
    assert not out.skipped and len(out.done) == 1
    assert len(list((tmp_path / "records").glob("*.json"))) == 1
    said = [ln for ln in capsys.readouterr().out.splitlines() if "run again" in ln]
    assert len(said) == 1 and RUN.label in said[0], said


def test_a_run_found_already_done_in_runs_dir_counts_through_its_receipt(tmp_path, capsys):
    """A real `wmbench run` whose done file was lost: re-run, it says `already done` and names its existing
    record in the receipt, so the sweep marks it done again without a second record."""
    options = {"task": "gridworld", "steps": 3, "d-model": 16, "eval-sequences": 2, "len": 52, "backbone": "gru"}
    spec = _spec(tmp_path, "run", options, {"seed": [0]})
    argv = ["sweep", str(spec), "--runs-dir", str(tmp_path / "records"), "--state-dir", str(tmp_path / "state"),
            "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    [marker] = (tmp_path / "state" / "done").glob("*.json")
    first = json.loads(marker.read_text())["records"]
    marker.unlink()
    assert main(argv) == 0
    assert "sweep: 1 run now" in capsys.readouterr().out
    assert json.loads(marker.read_text())["records"] == first
    assert len(list((tmp_path / "records").glob("*.json"))) == 1


# --------------------------------------------------------------------------------- signals

def _start_sweep(tmp_path, argv, env=None) -> subprocess.Popen:
    """The sweep as a command that leads its own process group, as a shell job or a batch script would."""
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=env, start_new_session=True)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


FAKE_SWEEP = textwrap.dedent("""
    # the sweep's CLI with the fake in place of `wmbench run` (and no up-front check of its options)
    import sys
    from wmbench.cli import main
    from wmbench.sweep import cli, worker
    worker.command_line = lambda argv: [sys.executable, sys.argv[1], *argv]
    cli.validate = lambda *a, **k: None
    sys.exit(main(sys.argv[2:]))
""")


def _fake_sweep(tmp_path, mode: str, *extra) -> subprocess.Popen:
    (tmp_path / "fake_run.py").write_text(FAKE)
    (tmp_path / "fake_sweep.py").write_text(FAKE_SWEEP)
    env = dict(os.environ, FAKE_MODE=mode, FAKE_DIR=str(tmp_path))
    return _start_sweep(tmp_path, [str(tmp_path / "fake_sweep.py"), str(tmp_path / "fake_run.py"), "sweep",
                                   "--grid", "seed=0,1,2", "--set", "task=gridworld", "--workers", "2",
                                   "--runs-dir", str(tmp_path / "records"), "--state-dir", str(tmp_path / "state"),
                                   "--no-progress", *extra], env)


@pytest.mark.parametrize("sig, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_sweeps_group_reaches_each_run_once(tmp_path, sig, rc):
    sweep = _fake_sweep(tmp_path, "graceful")
    _wait_for(lambda: len(list(tmp_path.glob("pid.*"))) == 2, 60, "two runs to start")
    os.killpg(sweep.pid, sig)
    out, _ = sweep.communicate(timeout=30)
    assert sweep.returncode == rc, out
    assert (tmp_path / "signals").read_text().split() == ["SIGTERM", "SIGTERM"], out   # one each, forwarded
    last = out.strip().splitlines()[-1]
    assert "0 done" in last and "2 stopped" in last and "1 left" in last, out
    assert not list((tmp_path / "state" / "done").glob("*.json"))


def test_a_second_signal_kills_the_runs_at_once(tmp_path):
    sweep = _fake_sweep(tmp_path, "stubborn", "--grace-s", "300")
    _wait_for(lambda: len(list(tmp_path.glob("pid.*"))) == 2, 60, "two runs to start")
    pids = [int(p.name.split(".")[1]) for p in tmp_path.glob("pid.*")]
    os.killpg(sweep.pid, signal.SIGTERM)
    _wait_for(lambda: (tmp_path / "signals").exists() and len((tmp_path / "signals").read_text().split()) == 2,
              10, "the runs to get the SIGTERM")
    t0 = time.monotonic()
    os.killpg(sweep.pid, signal.SIGTERM)
    out, _ = sweep.communicate(timeout=30)
    assert time.monotonic() - t0 < 10, out                  # not the 300 s grace
    assert sweep.returncode == 143, out
    assert not [p for p in pids if _alive(p)], out
    assert (tmp_path / "signals").read_text().split() == ["SIGTERM", "SIGTERM"], out   # killed, not signalled again


AGENT = {"game": "gridgoal", "preset": "tiny", "steps": 400, "warmup": 20, "eval-every": 0,
         "final-eval-episodes": 1, "checkpoint-every": 100000, "no-estimate": True, "precision": "fp32",
         "env-option": "episode_length=10"}


@pytest.mark.parametrize("sig, rc", [(signal.SIGTERM, 143),
                                     pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])   # ~30 s each
def test_a_stopped_agent_keeps_the_checkpoint_of_the_signal_and_resumes(tmp_path, sig, rc):
    """A sweep's process group gets SIGTERM (pre-emption) or SIGINT (Ctrl-C) while its agent trains: the
    agent saves a checkpoint at the end of its step and the sweep exits 143/130; the same command then
    resumes the agent from that checkpoint and records it once."""
    spec = _spec(tmp_path, "atari", AGENT, {"seed": [0]})
    argv = ["-m", "wmbench.cli", "sweep", str(spec), "--runs-dir", str(tmp_path / "records"),
            "--state-dir", str(tmp_path / "state"), "--threads", "1", "--no-progress"]
    sweep = _start_sweep(tmp_path, argv)
    metrics = lambda: list((tmp_path / "agent").glob("*/metrics.jsonl"))            # noqa: E731
    _wait_for(lambda: metrics() and '"type": "train"' in metrics()[0].read_text(), 240, "the agent to train")
    run_dir = metrics()[0].parent
    os.killpg(sweep.pid, sig)
    out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == rc, out
    assert "1 stopped" in out.strip().splitlines()[-1], out
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().rsplit("_", 1)[1])
    assert 0 < step < 400 and not list((tmp_path / "records").glob("*.json"))

    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    logs = sorted((tmp_path / "state" / "logs").glob("*.log"))
    assert len(logs) == 2 and f"from env step {step}" in logs[1].read_text() and "resuming" in logs[1].read_text()
    assert len(list((tmp_path / "records").glob("*.json"))) == 1


# ------------------------------------------------------------------------------- SLURM requeue

CHILD = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[-1])
    def save(signum, frame):
        time.sleep(0.5)                       # a checkpoint takes a moment
        out.joinpath("saved").write_text(signal.Signals(signum).name)
        sys.exit(130)
    signal.signal(signal.SIGTERM, save)
    out.joinpath("ready").write_text("")
    time.sleep(600)
""")


def test_the_slurm_job_checkpoints_its_run_and_requeues_the_same_call(tmp_path, monkeypatch):
    """submitit calls `checkpoint` on pre-emption or near the time limit: it must SIGTERM the run, wait
    for it to save and exit, and return the same call for submitit to requeue."""
    pytest.importorskip("submitit")
    from submitit.helpers import DelayedSubmission
    (tmp_path / "child.py").write_text(CHILD)
    monkeypatch.setattr(worker, "command_line", lambda argv: [sys.executable, str(tmp_path / "child.py"), *argv])
    job = worker.CheckpointableRun(grace_s=30)
    args = (["run", str(tmp_path)], str(tmp_path / "log"), str(tmp_path), str(tmp_path / "receipt"))
    rc = []
    t = threading.Thread(target=lambda: rc.append(job(*args)))
    t.start()
    _wait_for(lambda: (tmp_path / "ready").exists(), 30, "the run to start")
    again = job.checkpoint(*args)
    assert (tmp_path / "saved").read_text() == "SIGTERM"      # the run saved before checkpoint returned
    t.join(5)
    assert rc == [130]
    assert isinstance(again, DelayedSubmission) and again.args == args and not again.kwargs
    assert isinstance(again.function, worker.CheckpointableRun) and again.function.grace_s == 30
    import pickle
    pickle.dumps(again.function)                              # submitit pickles it for the requeued job


# ------------------------------------------------------------------------------- values

@pytest.mark.parametrize("flag, value, match", [
    ("--workers", "0", "--workers must be >= 1"),
    ("--workers", "-2", "--workers must be >= 1"),
    ("--threads", "0", "--threads must be >= 1"),
    ("--grace-s", "-1", "--grace-s must be >= 0"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, flag, value, match):
    rc = main(["sweep", "--grid", "backbone=gru", "--set", "task=gridworld", flag, value,
               "--state-dir", str(tmp_path / "s"), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and match in err, err


@pytest.mark.parametrize("argv, label, match", [
    (["--grid", "steps=-5", "--set", "task=gridworld"], "run steps=-5 task=gridworld", "steps"),
    (["--grid", "len=53", "--set", "task=gridworld"], "run len=53 task=gridworld", "multiple of"),   # check only
    (["--command", "atari", "--grid", "warmup=200", "--set", "game=gridgoal", "--set", "steps=100"],
     "atari game=gridgoal steps=100 warmup=200", "must be below --steps"),                           # check only
])
def test_each_runs_own_validation_runs_before_the_sweep(tmp_path, capsys, argv, label, match):
    """Not only the parser: what the run itself would refuse fails the sweep before it starts, in one line,
    instead of as N failed and retried runs."""
    rc = main(["sweep", *argv, "--state-dir", str(tmp_path / "s"), "--runs-dir", str(tmp_path / "r"), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: run `{label}`: ") and match in err, err
