"""Issue 28, the read side of records: files from outside that must not hang, poison or double the report.

A FIFO named like a record, NaN / ±inf metrics, one seed run with other run-time settings (threads, an
automatic precision), a backbone spelled `Mamba2` by an older version, and the temp files of a report
killed mid-write."""
import json
import os
import subprocess
import sys
import threading

import pandas as pd
import pytest

from wmbench.core.measure import metric
from wmbench.core.records import existing_record, load_records, make_record, records_of, write_record
from wmbench.report.atari import atari_markdown
from wmbench.report.tables import build_report, record_key


def _grid_record(seed=0, backbone="gru", threads=1, error=10.0, created_at=None) -> dict:
    cfg = {"backbone": backbone, "task": "gridworld", "seq_len": 52, "seed": seed, "steps": 10,
           "batch_size": 1, "threads": threads, "dtype": "fp32", "device": "cpu", "preset": "cpu"}
    m = {k: metric(v, "x") for k, v in (("train_ms_per_step", 1.0), ("peak_memory", 2**20),
                                        ("error_pct", error), ("oracle_error_pct", 1.0))}
    rec = make_record("gridworld", cfg, m, extra={"status": "ok"})
    rec["environment"]["device_name"] = "Test CPU"
    if created_at:
        rec["created_at"] = created_at
    return rec


def _atari_record(seed: int, score: float) -> dict:
    cfg = {"game": "Krull", "backbone": "mamba2", "sampler": "dfs", "dfs_mode": "official", "size": "cpu",
           "steps": 5000, "seed": seed, "threads": 1, "run_dir": f"/tmp/run{seed}"}
    rec = make_record("atari", cfg, {"score": metric(score, "return"), "final_eval_return": metric(score, "return")})
    rec["episodes"] = [{"step": 1000 * (i + 1), "return": 100.0, "length": 900} for i in range(5)]
    return rec


def _write_raw(path, rec: dict) -> None:
    """As Python's json writes it: NaN and Infinity as the bare words no JSON reader accepts."""
    path.write_text(json.dumps(rec))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- a FIFO named x.json

def test_report_skips_a_fifo_named_like_a_record(tmp_path):
    runs = tmp_path / "runs"
    write_record(_grid_record(), runs, name="good")
    os.mkfifo(runs / "x.json")
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "report", "--runs-dir", str(runs),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    warning = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: skipping")]
    assert len(warning) == 1 and "x.json" in warning[0] and "regular file" in warning[0]
    assert (tmp_path / "out" / "tables" / "gridworld.csv").exists()


def test_records_of_does_not_open_a_fifo(tmp_path):
    """`wmbench run` reads the runs dir through records_of: a FIFO there must not block it."""
    write_record(_grid_record(), tmp_path, name="good")
    fifo = tmp_path / "x.json"
    os.mkfifo(fifo)
    found = []
    reader = threading.Thread(target=lambda: found.append(records_of(tmp_path, "gridworld")), daemon=True)
    reader.start()
    reader.join(timeout=10)
    blocked = reader.is_alive()
    if blocked:      # the old code sits in open(): give it a writer (and EOF) so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)
    assert not blocked, "records_of blocked on a FIFO named x.json"
    assert [r["_path"] for r in found[0]] == [str(tmp_path / "good.json")]


# ---------------------------------------------------------------- NaN and ±inf

@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_metric_skips_the_record_and_strict_fails(tmp_path, capsys, bad):
    from wmbench.cli import main
    runs = tmp_path / "runs"
    write_record(_grid_record(seed=0), runs, name="good")
    text = json.dumps(_grid_record(seed=1, error=123.0)).replace("123.0", bad)
    (runs / "bad.json").write_text(text)
    assert main(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if ln.startswith("warning: skipping")]
    assert len(warning) == 1 and "bad.json" in warning[0], err
    table = pd.read_csv(tmp_path / "out" / "tables" / "gridworld.csv")
    assert list(table.seeds) == [1] and list(table.error_mean) == [10.0]
    md = (tmp_path / "out" / "tables" / "gridworld.md").read_text().lower()
    assert "nan" not in md and "inf" not in md
    assert main(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.json" in err and "--strict" in err


def test_null_metric_value_stays_allowed(tmp_path):
    rec = _grid_record()
    rec["metrics"]["tokens_per_s"] = metric(None, "tokens/s")   # not measured
    write_record(rec, tmp_path, name="null")
    skipped = []
    assert len(load_records(tmp_path, skipped=skipped)) == 1 and skipped == []


def test_nan_agent_score_does_not_blank_its_configurations_mean(tmp_path):
    runs = tmp_path / "runs"
    for seed, score in ((0, 100.0), (1, 200.0)):
        write_record(_atari_record(seed, score), runs, name=f"krull-{seed}")
    _write_raw(runs / "krull-nan.json", _atari_record(2, float("nan")))
    skipped = []
    md = atari_markdown(load_records(runs, skipped=skipped))     # what build_report does (its bootstrap is slow)
    mean_row = [ln for ln in md.splitlines() if "mean of" in ln]
    assert len(mean_row) == 1 and "mean of 2" in mean_row[0] and "**150.00**" in mean_row[0], md
    assert [p for p, _ in skipped] == [str(runs / "krull-nan.json")]


def test_an_unmeasured_final_evaluation_does_not_count_as_zero():
    recs = [_atari_record(0, 100.0), _atari_record(1, 200.0)]
    recs[1]["metrics"]["final_eval_return"] = metric(None, "return")     # e.g. --final-eval-episodes 0
    mean_row = [ln for ln in atari_markdown(recs).splitlines() if "mean of 2" in ln]
    assert len(mean_row) == 1 and "| 100.00 |" in mean_row[0], mean_row


# ---------------------------------------------------------------- the seed key: run-time settings out

def test_a_seed_run_with_other_threads_counts_once(tmp_path):
    runs = tmp_path / "runs"
    write_record(_grid_record(threads=1, error=10.0, created_at="2026-01-01T00:00:00+00:00"), runs, name="t1")
    write_record(_grid_record(threads=2, error=20.0, created_at="2026-01-02T00:00:00+00:00"), runs, name="t2")
    _, messages = build_report(runs, tmp_path / "out")
    assert any("t1.json" in m and "kept the newer" in m for m in messages)
    table = pd.read_csv(tmp_path / "out" / "tables" / "gridworld.csv")
    assert list(zip(table.seeds, table.error_mean)) == [(1, 20.0)]


def test_existing_record_finds_a_seed_made_with_other_threads(tmp_path):
    write_record(_grid_record(threads=1), tmp_path, name="t1")
    records = records_of(tmp_path, "gridworld")
    again = {**_grid_record(threads=2)["config"], "preset": ""}
    assert existing_record(records, again) == str(tmp_path / "t1.json")
    assert existing_record(records, {**again, "seed": 1}) is None     # another seed is still to run
    machine = records[0]["environment"]["device_name"]
    assert existing_record(records, again, machine) == str(tmp_path / "t1.json")
    assert existing_record(records, again, "another CPU") is None      # a seed counts once per machine


def _agent_config(precision: str, auto: bool) -> dict:
    cfg = {"game": "Pong", "backbone": "mamba2", "seed": 0, "steps": 100, "threads": 2, "compile": auto,
           "precision": precision, "model": {"d_model": 128, "amp": precision == "bf16"},
           "run_dir": "/tmp/a", "runs_dir": "/tmp/r", "auto_choices": {}}
    if auto:
        cfg["auto_choices"] = {"precision": "measured", "compile": "measured", "threads": "measured"}
    return cfg


def test_an_automatic_precision_is_not_part_of_the_key_a_forced_one_is(tmp_path):
    def rec(precision, auto):
        r = make_record("atari", _agent_config(precision, auto), {})
        r["environment"]["device_name"] = "Test CPU"
        return r
    assert record_key(rec("bf16", auto=True)) == record_key(rec("fp32", auto=True))
    assert record_key(rec("bf16", auto=False)) != record_key(rec("fp32", auto=False))
    write_record(rec("bf16", auto=True), tmp_path, name="auto")
    assert existing_record(records_of(tmp_path, "atari"), _agent_config("fp32", auto=True)) is not None
    assert existing_record(records_of(tmp_path, "atari"), _agent_config("fp32", auto=False)) is None


def test_a_mamba2_record_keys_as_mamba2(tmp_path):
    runs = tmp_path / "runs"
    old = _grid_record(backbone="Mamba2", seed=0, error=10.0)
    assert record_key(old) == record_key(_grid_record(backbone="mamba2", seed=0, error=10.0))
    write_record(old, runs, name="old-spelling")
    write_record(_grid_record(backbone="mamba2", seed=1, error=20.0), runs, name="new-spelling")
    build_report(runs, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "tables" / "gridworld.csv")
    assert list(zip(table.backbone, table.seeds, table.error_mean)) == [("mamba2", 2, 15.0)]


# ---------------------------------------------------------------- temp files of a killed report

def test_orphaned_report_temp_files_are_removed_by_the_next_report(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_record(_grid_record(), runs, name="good")
    dead = _dead_pid()
    orphans = [out / "plots" / f".x.png.{dead}.abc.tmp", out / "tables" / f".gridworld.md.{dead}.abc.tmp"]
    live = out / "plots" / f".y.png.{os.getpid()}.abc.tmp"      # a report still writing: left alone
    for p in (*orphans, live):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a png")
    build_report(runs, out)
    assert not any(p.exists() for p in orphans) and live.exists()
