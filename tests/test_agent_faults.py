"""Faults around `wmbench atari`'s run dir (issue 28): kills between the two record writes, a full disk,
two processes on one run dir, hand-edited files. Nothing is lost, nothing is counted twice, and every
failure is one line, never a traceback."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wmbench.agent import checkpoint as ckpt
from wmbench.core import records
from wmbench.core.errors import UserError

TINY = ["atari", "--game", "gridgoal", "--preset", "tiny", "--steps", "40", "--warmup", "20", "--eval-every", "0",
        "--final-eval-episodes", "1", "--checkpoint-every", "20", "--threads", "1", "--no-progress",
        "--no-estimate", "--env-option", "episode_length=10"]


def _args(tmp_path, *extra):
    return [*TINY, "--run-dir", str(tmp_path / "run"), "--runs-dir", str(tmp_path / "rec"), *extra]


def _cfg(tmp_path, **kw):
    from wmbench.agent.config import resolve_config
    base = dict(game="gridgoal", steps=40, warmup_steps=20, eval_every=0, final_eval_episodes=1,
                checkpoint_every=20, threads=1, run_dir=str(tmp_path / "run"), runs_dir=str(tmp_path / "rec"),
                env_options={"episode_length": 10})
    return resolve_config("tiny", **{**base, **kw})


def _main(capsys, *argv):
    """`wmbench ARGV` in this process: (exit status, stdout, stderr)."""
    from wmbench.cli import main
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def _records(tmp_path):
    return sorted((tmp_path / "rec").glob("*.json"))


def _fix_manifest(step_dir: Path) -> None:
    """A careful editor: meta.json changed and its manifest entry updated to match."""
    man = json.loads((step_dir / "manifest.json").read_text())
    data = (step_dir / "meta.json").read_bytes()
    man["meta.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(man))


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# ---------------------------------------------------------------- one record per finished run

def test_record_missing_from_runs_dir_is_written_once_and_receipted(tmp_path, capsys, monkeypatch):
    """Killed after RUN_DIR/record.json but before --runs-dir got its copy: the re-run writes it there once,
    says so and hands the sweep its receipt; a third run writes nothing new (and still receipts it)."""
    rc, out, _ = _main(capsys, *_args(tmp_path))
    assert rc == 0 and len(_records(tmp_path)) == 1
    _records(tmp_path)[0].unlink()                     # as if killed between the two writes
    receipt = tmp_path / "receipt.jsonl"
    monkeypatch.setenv(records.RECEIPT_ENV, str(receipt))
    rc, out, err = _main(capsys, *_args(tmp_path))
    assert rc == 0 and "already finished" in err
    [rec] = _records(tmp_path)
    assert json.loads(rec.read_text()) == json.loads((tmp_path / "run" / "record.json").read_text())
    assert [ln for ln in err.splitlines() if "wrote the missing record" in ln and str(rec) in ln]
    assert f"record: {rec}" in out
    assert [json.loads(ln)["record"] for ln in receipt.read_text().splitlines()] == [str(rec.absolute())]
    rc, out, err = _main(capsys, *_args(tmp_path))
    assert rc == 0 and _records(tmp_path) == [rec] and "wrote the missing record" not in err
    assert len(receipt.read_text().splitlines()) == 2   # found there: receipted again, not written again


def test_pending_fallback_is_completed_once_space_is_back(tmp_path, capsys, monkeypatch):
    """The runs dir was full at the end: the record went to RUN_DIR/records/ (exit 1, naming it). Once there
    is space, the re-run moves it into --runs-dir, once."""
    real = records.write_record
    runs = tmp_path / "rec"

    def full(record, runs_dir="results/runs", name=None, overwrite=False):
        if Path(runs_dir) == runs:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(record, runs_dir, name=name, overwrite=overwrite)

    monkeypatch.setattr(records, "write_record", full)
    rc, _, err = _main(capsys, *_args(tmp_path))
    pending = list((tmp_path / "run" / "records").glob("*.json"))
    assert rc == 1 and len(pending) == 1 and str(pending[0]) in _error_line(err)
    monkeypatch.setattr(records, "write_record", real)          # space freed
    rc, _, err = _main(capsys, *_args(tmp_path))
    assert rc == 0 and [p.name for p in _records(tmp_path)] == [pending[0].name]
    assert not list((tmp_path / "run" / "records").glob("*.json"))   # the pending copy is gone
    rc, _, err = _main(capsys, *_args(tmp_path))
    assert rc == 0 and len(_records(tmp_path)) == 1


def test_lost_run_dir_record_does_not_evaluate_twice(tmp_path, capsys):
    """RUN_DIR/record.json could not be written (its disk full) while --runs-dir took the record: the re-run
    finds that record, restores record.json, and neither evaluates nor records the run again."""
    rc, _, _ = _main(capsys, *_args(tmp_path))
    [rec] = _records(tmp_path)
    (tmp_path / "run" / "record.json").unlink()
    rc, out, err = _main(capsys, *_args(tmp_path))
    assert rc == 0 and "already finished" in err and _records(tmp_path) == [rec]
    assert json.loads((tmp_path / "run" / "record.json").read_text()) == json.loads(rec.read_text())


def test_corrupt_run_dir_record_is_one_line(tmp_path, capsys):
    rc, _, _ = _main(capsys, *_args(tmp_path))
    assert rc == 0
    (tmp_path / "run" / "record.json").write_text("[1, 2]")
    rc, _, err = _main(capsys, *_args(tmp_path))
    assert rc == 2 and str(tmp_path / "run" / "record.json") in _error_line(err)


# ---------------------------------------------------------------- two processes on one run dir

_HOLDER = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); "
           "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); "
           "print('ready', flush=True); sys.stdin.read()")


def test_second_process_on_a_run_dir_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        rc, _, err = _main(capsys, *_args(tmp_path))
        assert rc == 2 and f"pid {holder.pid}" in _error_line(err)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]     # nothing written
        assert not (tmp_path / "rec").exists() or not _records(tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    rc, _, _ = _main(capsys, *_args(tmp_path))                       # released: the run goes ahead
    assert rc == 0 and len(_records(tmp_path)) == 1


def test_the_lock_is_held_from_start_to_record(tmp_path, monkeypatch):
    """A second start (its own open file description) is refused while the first trains and while it
    writes its record."""
    import wmbench.agent.train as train_mod
    cfg = _cfg(tmp_path)
    refusals, inside = [], []

    def second_start():
        if inside:          # the second start itself (were it let through): no third
            return
        inside.append(1)
        try:
            with pytest.raises(UserError) as e:
                train_mod.train(_cfg(tmp_path), progress=False)
            refusals.append(str(e.value))
        finally:
            inside.pop()

    real_collect, real_save = train_mod.collect, records.save_record

    def collect(run, log):
        if run.progress.step == 25:
            second_start()
        real_collect(run, log)

    def save_record(*a, **kw):
        second_start()
        return real_save(*a, **kw)

    monkeypatch.setattr(train_mod, "collect", collect)
    monkeypatch.setattr(records, "save_record", save_record)
    out = train_mod.train(cfg, progress=False)
    assert out["step"] == 40 and len(refusals) == 2
    assert all(f"pid {os.getpid()}" in r and "\n" not in r for r in refusals)


# ---------------------------------------------------------------- a full disk at a checkpoint

def _full_at(monkeypatch, step):
    real = ckpt.save_checkpoint

    def save(run_dir, s, *a, **kw):
        if s == step:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(run_dir, s, *a, **kw)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)


def test_disk_full_at_the_final_checkpoint_still_records(tmp_path, capsys, monkeypatch):
    """The final checkpoint fails: a warning naming it and the one kept; the record is still written, and a
    re-run counts the finished run once (no retraining, no second record, metrics.jsonl untouched)."""
    _full_at(monkeypatch, 40)
    rc, out, err = _main(capsys, *_args(tmp_path))
    warn = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert rc == 0 and len(warn) == 1, err
    assert str(tmp_path / "run" / "checkpoints" / "step_000000040") in warn[0] and "env step 20" in warn[0]
    assert "No space left" in warn[0]
    assert len(_records(tmp_path)) == 1 and (tmp_path / "run" / "record.json").exists()
    assert ckpt.load_checkpoint(tmp_path / "run").step == 20
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    monkeypatch.undo()
    rc, out, err = _main(capsys, *_args(tmp_path))
    assert rc == 0 and "already finished" in err and len(_records(tmp_path)) == 1
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_disk_full_at_a_requested_stop_is_one_line(tmp_path, monkeypatch):
    """The checkpoint a stop asked for fails: the run stops with one line naming the path and the
    checkpoint that is kept."""
    from wmbench.agent.train import train
    _full_at(monkeypatch, 30)
    with pytest.raises(OSError) as e:
        train(_cfg(tmp_path), progress=False, stop_at=30)
    msg = str(e.value)
    assert str(tmp_path / "run" / "checkpoints" / "step_000000030") in msg and "env step 20" in msg
    assert "\n" not in msg and "No space left" in msg
    assert ckpt.load_checkpoint(tmp_path / "run").step == 20


@pytest.mark.parametrize("where", ["state.pt", "latest"])
def test_failed_checkpoint_write_leaves_only_the_previous_one(where, tmp_path, monkeypatch):
    """A full disk while writing a checkpoint's files or while moving `latest` on: the previous checkpoint
    stays the newest, and neither a temp folder nor an unreferenced step folder is left taking space."""
    import numpy as np
    ckpt.save_checkpoint(tmp_path, 1, {}, {"a": np.zeros(3)}, {})
    real_fsync, real_text = ckpt._fsync_write, ckpt.atomic_write_text

    def fsync_write(path, write):
        if path.name == where:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(path, write)

    def write_text(path, text):
        if Path(path).name == where:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_text(path, text)

    monkeypatch.setattr(ckpt, "_fsync_write", fsync_write)
    monkeypatch.setattr(ckpt, "atomic_write_text", write_text)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {}, {"a": np.zeros(3)}, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000000001"]
    assert ckpt.load_checkpoint(tmp_path).step == 1


# ---------------------------------------------------------------- files from outside are data

def test_bad_metrics_lines_are_skipped_on_resume(tmp_path, capsys):
    from wmbench.agent.train import train
    train(_cfg(tmp_path), progress=False, stop_at=20)
    log = tmp_path / "run" / "metrics.jsonl"
    good = log.read_text().splitlines()
    with open(log, "a") as f:
        f.write('[1,2]\n{"step": null}\n{"type": "train"}\nnot json\n')
    capsys.readouterr()
    out = train(_cfg(tmp_path), progress=False)
    err = capsys.readouterr().err
    assert out["step"] == 40 and "Traceback" not in err
    skipped = [ln for ln in err.splitlines() if ln.startswith("warning: skipping line")]
    assert [ln.split()[3] for ln in skipped] == [str(len(good) + i) for i in (1, 2, 3, 4)]
    assert all(str(log) in ln for ln in skipped)
    rows = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in rows)


@pytest.mark.parametrize("text", ['{"train": 5}', "[1]", '{"model": {}}', '{"train": {"seed": NaN}}'])
def test_bad_config_json_is_one_line(text, tmp_path, capsys):
    from wmbench.agent.train import train
    train(_cfg(tmp_path), progress=False, stop_at=20)
    path = tmp_path / "run" / "config.json"
    path.write_text(text)
    for extra in ([], ["--check"]):
        rc, _, err = _main(capsys, *_args(tmp_path, *extra))
        assert rc == 2 and str(path) in _error_line(err)


def test_nan_in_checkpoint_meta_is_refused(tmp_path, capsys):
    """Python's json reads NaN; a checkpoint's meta.json holding one (and a manifest to match) is corrupt."""
    from wmbench.agent.train import train
    train(_cfg(tmp_path), progress=False, stop_at=20)
    step = tmp_path / "run" / "checkpoints" / "step_000000020"
    meta = json.loads((step / "meta.json").read_text())
    meta["credit"] = float("nan")
    (step / "meta.json").write_text(json.dumps(meta))
    _fix_manifest(step)
    for extra in ([], ["--check"]):
        rc, _, err = _main(capsys, *_args(tmp_path, *extra))
        assert rc == 2 and str(step) in _error_line(err) and "NaN" in _error_line(err)


# ---------------------------------------------------------------- the choices of each start

def test_each_start_is_recorded(tmp_path):
    from wmbench.agent.train import train
    train(_cfg(tmp_path), progress=False, stop_at=20)
    out = train(_cfg(tmp_path), progress=False)
    rec = json.loads(Path(out["record"]).read_text())
    starts = rec["starts"]
    assert [s["step"] for s in starts] == [0, 20]
    for s in starts:
        assert set(s) == {"step", "auto_choices", "precision", "threads", "compile"}
        assert s["threads"] == 1 and s["precision"] in ("fp32", "bf16") and isinstance(s["auto_choices"], dict)
    assert ckpt.load_checkpoint(tmp_path / "run").meta["starts"] == starts


def test_checkpoint_without_starts_restores_as_empty(tmp_path):
    """A checkpoint written before `starts` existed resumes; the list begins with this start."""
    from wmbench.agent.train import train
    train(_cfg(tmp_path), progress=False, stop_at=20)
    step = tmp_path / "run" / "checkpoints" / "step_000000020"
    meta = json.loads((step / "meta.json").read_text())
    meta.pop("starts", None)
    (step / "meta.json").write_text(json.dumps(meta))
    _fix_manifest(step)
    out = train(_cfg(tmp_path), progress=False)
    assert [s["step"] for s in json.loads(Path(out["record"]).read_text())["starts"]] == [20]


def test_automatic_threads_are_measured_once(tmp_path, capsys):
    """--threads unset: the first start measures the count; its resume keeps it, and another run of the
    same model on this machine takes it from the choice cache, neither measuring again."""
    from wmbench.agent.train import train
    train(_cfg(tmp_path, threads=0), progress=False, stop_at=20, estimate=True)
    assert "threads -> " in capsys.readouterr().err                      # measured
    out = train(_cfg(tmp_path, threads=0), progress=False, estimate=True)
    err = capsys.readouterr().err
    assert "threads auto -> " in err and "first start" in err and "threads -> " not in err
    first, second = json.loads(Path(out["record"]).read_text())["starts"]
    assert second["threads"] == first["threads"] and "first start" in second["auto_choices"]["threads"]
    other = tmp_path / "other"
    train(_cfg(other, threads=0, seed=1), progress=False, stop_at=20, estimate=True)
    err = capsys.readouterr().err
    assert "threads auto -> " in err and "cached" in err and "threads -> " not in err
