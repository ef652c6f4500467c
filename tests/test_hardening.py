"""What users actually do: bad folders, devices, values and seeds; re-runs; corrupt, duplicate and
foreign-machine records; kill -9 in the middle of a write. Each gets one `error:` line and exit 2 (or
the documented behaviour), never a traceback, and no finished result is lost."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from wmbench.core.records import make_record, write_record

TINY_RUN = ["run", "--len", "52", "--steps", "2", "--d-model", "8", "--layers", "1", "--eval-sequences", "2",
            "--no-progress"]
TINY_ATARI = ["atari", "--game", "gridgoal", "--preset", "tiny", "--steps", "40", "--warmup", "20",
              "--eval-every", "0", "--final-eval-episodes", "1", "--checkpoint-every", "20", "--threads", "1",
              "--no-progress", "--no-estimate", "--env-option", "episode_length=10"]


def cli(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=600)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, *needles):
    """Exit 2, no traceback, and exactly one `error:` line, the last (the atari banner may come first)."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], errors[0]


# ---------------------------------------------------------------- folders, checked before any work

@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("cmd", ["run", "atari", "bench"])
@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_runs_dir_refused_before_any_work(cmd, where, a_file):
    target = {"file": a_file, "under_file": a_file / "runs", "unwritable": "/proc/wmbench-no-such"}[where]
    args = {"run": TINY_RUN, "atari": [*TINY_ATARI, "--run-dir", a_file.parent / "run"],
            "bench": ["bench", "--backbones", "gru", "--len", "8"]}[cmd]
    t0 = time.perf_counter()
    rc, out, err = cli(*args, "--runs-dir", target)
    assert_one_line_error(rc, err, "--runs-dir")
    assert time.perf_counter() - t0 < 60   # refused at start, not after training


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_run_dir_and_report_out_refused(where, a_file, tmp_path):
    target = {"file": a_file, "under_file": a_file / "run", "unwritable": "/proc/wmbench-no-such"}[where]
    rc, _, err = cli(*TINY_ATARI, "--run-dir", target, "--runs-dir", tmp_path / "rec")
    assert_one_line_error(rc, err, "--run-dir")
    write_record(_grid_record(0), tmp_path / "runs", name="r")
    rc, _, err = cli("report", "--runs-dir", tmp_path / "runs", "--out", target)
    assert_one_line_error(rc, err, "--out")


def test_record_write_failure_keeps_the_result(tmp_path, monkeypatch, capsys):
    """The record cannot be written at the end (disk full): it goes to a fallback, named, exit 1."""
    import wmbench.core.records as records
    from wmbench.cli import main
    real = records.write_record
    runs = tmp_path / "runs"

    def failing(rec, folder, *a, **kw):
        if os.path.abspath(folder) == os.path.abspath(runs):
            raise OSError(28, "No space left on device")
        return real(rec, folder, *a, **kw)

    monkeypatch.setattr(records, "write_record", failing)
    monkeypatch.chdir(tmp_path)
    rc = main(TINY_RUN + ["--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert rc == 1 and "No space left on device" in err and "saved it to" in err
    saved = err.split("saved it to ")[1].split(" instead")[0]
    assert json.loads(open(saved).read())["metrics"]["error_pct"]["value"] >= 0


# ---------------------------------------------------------------- devices, values, seeds

@pytest.mark.parametrize("args,needle", [
    (TINY_RUN + ["--device", "foo"], "unknown device 'foo'"),
    (TINY_ATARI + ["--device", "foo"], "unknown device 'foo'"),
    (["bench", "--device", "foo"], "unknown device 'foo'"),
    (["bench", "--device", "cuda"], "CUDA is not available"),
    (TINY_ATARI + ["--set", "backbone=foo"], "use --backbone"),
    (TINY_ATARI + ["--set", "name=XS"], "use --size"),
    (TINY_ATARI + ["--set", "wm_lr=NaN"], "wm_lr must be a number in (0, inf)"),
    (TINY_ATARI + ["--set", "wm_lr=-1"], "wm_lr must be a number"),
    (TINY_ATARI + ["--set", "gamma=2"], "gamma must be a number in (0, 1]"),
    (TINY_RUN + ["--seeds", ""], "--seeds is empty"),
    (TINY_RUN + ["--seeds", "0,0"], "--seeds repeats 0"),
    (["bench", "--backbones", ""], "--backbones is empty"),
    (["bench", "--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["run", "--len", "9999990"], "GiB of activations"),
    (TINY_ATARI + ["--replay-capacity", "10000000000"], "GiB of frames"),
    (["run", "--len", "0"], "the shortest valid length is 52"),
    (["run", "--len", "26"], "the shortest valid length is 52"),
    (["run", "--len", "-26"], "the shortest valid length is 52"),
])
def test_bad_values_are_one_line_errors(args, needle):
    rc, _, err = cli(*args, "--check")
    assert_one_line_error(rc, err, needle)


def test_create_backbone_sizes_and_empty_sequences():
    import torch

    import wmbench
    for bad in (3.5, "64", True, 0, -1):
        with pytest.raises(ValueError, match="d_model must be a positive integer"):
            wmbench.create_backbone("gru", d_model=bad)
    for name in wmbench.list_backbones():
        bb = wmbench.create_backbone(name, 64, 1)
        assert bb(torch.zeros(2, 0, 64)).shape == (2, 0, 64)
        with pytest.raises(ValueError, match="expected input"):
            bb(torch.zeros(2, 3, 65))


def test_warmup_longer_than_the_run_is_refused(tmp_path):
    # the command refuses a scored run that ends inside its warm-up (issue 28); a library caller is warned
    rc, out, err = cli("atari", "--game", "gridgoal", "--preset", "cpu", "--steps", "300", "--check",
                       "--run-dir", tmp_path / "r", "--runs-dir", tmp_path / "rec")
    assert_one_line_error(rc, err, "--warmup 500 must be below --steps 300")
    from wmbench.agent.config import resolve_config
    from wmbench.agent.train import banner
    cfg = resolve_config("cpu", game="gridgoal", steps=300)
    assert "ends inside the warm-up (500 random-action steps)" in banner(cfg)


def test_version_and_every_option_documented():
    rc, out, _ = cli("--version")
    assert rc == 0 and out.startswith("wmbench ")
    from wmbench.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {a.option_strings[0]}" for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and a.option_strings[0] != "-h" and not a.help]
    assert not missing
    assert "--threads" in sub.choices["bench"].format_help()


# ---------------------------------------------------------------- idempotent runs

def test_run_twice_does_not_redo_a_seed(tmp_path):
    runs = tmp_path / "runs"
    rc, out, _ = cli(*TINY_RUN, "--runs-dir", runs)
    assert rc == 0 and len(list(runs.glob("*.json"))) == 1
    rc, out, _ = cli(*TINY_RUN, "--runs-dir", runs)
    assert rc == 0 and "already done" in out and len(list(runs.glob("*.json"))) == 1
    rc, out, _ = cli(*TINY_RUN, "--runs-dir", runs, "--force")
    assert rc == 0 and len(list(runs.glob("*.json"))) == 2


def test_atari_finished_run_is_not_redone_and_smaller_steps_refused(tmp_path):
    args = [*TINY_ATARI, "--run-dir", tmp_path / "run", "--runs-dir", tmp_path / "rec"]
    rc, out, err = cli(*args)
    assert rc == 0 and len(list((tmp_path / "rec").glob("*.json"))) == 1
    rc, out, err = cli(*args)
    assert rc == 0 and "already finished" in err and len(list((tmp_path / "rec").glob("*.json"))) == 1
    rc, _, err = cli(*[a if a != "40" else "30" for a in args])
    assert_one_line_error(rc, err, "already at env step 40, beyond --steps 30")
    rc, out, err = cli(*args, "--force")
    assert rc == 0 and len(list((tmp_path / "rec").glob("*.json"))) == 2


# ---------------------------------------------------------------- checkpoints

def _checkpointed_run(tmp_path):
    from wmbench.agent.config import resolve_config
    from wmbench.agent.train import train
    cfg = resolve_config("tiny", game="gridgoal", steps=40, warmup_steps=20, eval_every=0, final_eval_episodes=1,
                         checkpoint_every=20, threads=1, run_dir=str(tmp_path / "run"),
                         runs_dir=str(tmp_path / "rec"), env_options={"episode_length": 10})
    train(cfg, progress=False, stop_at=20)
    return tmp_path / "run", [*TINY_ATARI, "--run-dir", tmp_path / "run", "--runs-dir", tmp_path / "rec"]


def test_latest_outside_the_run_dir_is_refused(tmp_path):
    run, args = _checkpointed_run(tmp_path)
    (run / "checkpoints" / "latest").write_text("../../other-run/checkpoints/step_000000020\n")
    rc, _, err = cli(*args)
    assert_one_line_error(rc, err, "not a step folder of this run dir")


@pytest.mark.parametrize("field,value,manifest_too", [
    ("step", 5, False),                 # caught by the manifest's sha256
    ("python_rng", [1], True),          # an editor who also fixed the manifest: caught by the meta check
    ("step", "abc", True),
    ("episodes", 5, True),
    ("credit", "x", True),
    ("config", 5, True),
])
def test_hand_edited_meta_json_is_refused(field, value, manifest_too, tmp_path):
    import hashlib
    run, args = _checkpointed_run(tmp_path)
    step = next((run / "checkpoints").glob("step_*"))
    meta = json.loads((step / "meta.json").read_text())
    meta[field] = value
    (step / "meta.json").write_text(json.dumps(meta))
    if manifest_too:
        man = json.loads((step / "manifest.json").read_text())
        data = (step / "meta.json").read_bytes()
        man["meta.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (step / "manifest.json").write_text(json.dumps(man))
    for extra in ([], ["--check"]):
        rc, _, err = cli(*args, *extra)
        assert_one_line_error(rc, err, "corrupt" if not manifest_too else f"invalid meta.json ({field})")


def test_checkpoint_folders_share_their_files_mode(tmp_path):
    run, _ = _checkpointed_run(tmp_path)
    step = next((run / "checkpoints").glob("step_*"))
    assert step.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in step.iterdir()} == {0o644}


def test_disk_full_during_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    """Every checkpoint write fails: one warning line each, naming it; the run still ends with its record."""
    import wmbench.agent.checkpoint as ckpt
    from wmbench.cli import main

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_fsync_write", full)
    rc = main([*TINY_ATARI, "--run-dir", str(tmp_path / "run"), "--runs-dir", str(tmp_path / "rec")])
    err = capsys.readouterr().err
    warns = [ln for ln in err.splitlines() if ln.startswith("warning: could not write checkpoint")]
    assert rc == 0 and len(warns) == 2 and all("No space left" in w for w in warns), err
    assert "step_000000020" in warns[0] and "step_000000040" in warns[1]
    assert len(list((tmp_path / "rec").glob("*.json"))) == 1
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


_KILL_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pathlib import Path
    folder, what = Path(sys.argv[1]), sys.argv[2]
    print("ready", flush=True)
    if what == "record":
        from wmbench.core.records import atomic_write_bytes
        while True:
            atomic_write_bytes(folder / "big.json", b"x" * 300_000_000)
    else:
        from wmbench.agent.checkpoint import save_checkpoint
        step = 0
        while True:
            step += 1
            save_checkpoint(folder, step, {}, {"a": np.zeros(60_000_000, np.uint8)}, {})
""")


@pytest.mark.parametrize("what", ["record", "checkpoint"])
def test_kill_9_mid_write_leaves_no_partial_file_and_no_orphan(what, tmp_path):
    from wmbench.agent.checkpoint import load_checkpoint
    from wmbench.core.paths import remove_orphans
    p = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(tmp_path), what], stdout=subprocess.PIPE)
    p.stdout.readline()
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if what == "record":
        finals = list(tmp_path.glob("*.json"))
        assert all(f.stat().st_size == 300_000_000 for f in finals)   # complete or absent
        remove_orphans(tmp_path)
        assert not list(tmp_path.glob(".*.tmp"))
    else:
        load_checkpoint(tmp_path)   # the next start: verifies `latest` (if any) and clears the orphans
        assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


# ---------------------------------------------------------------- report: corrupt, duplicate, machines

def _grid_record(seed, error=10.0, cpu="Test CPU A"):
    cfg = {"backbone": "gru", "seq_len": 52, "seed": seed, "batch_size": 1}
    m = {k: {"value": v, "unit": "x"} for k, v in (("train_ms_per_step", 1.0), ("peak_memory", 2**20),
                                                  ("error_pct", error), ("oracle_error_pct", 1.0))}
    rec = make_record("gridworld", cfg, m, extra={"status": "ok"})
    rec["environment"]["device_name"] = cpu
    return rec


def test_report_skips_bad_records_in_one_line_each_and_strict_fails(tmp_path):
    runs = tmp_path / "runs"
    write_record(_grid_record(0), runs, name="good")
    (runs / "corrupt.json").write_text("{not json")
    bad = _grid_record(1)
    bad["config"]["seq_len"] = "not a length"          # schema-valid, unusable value
    write_record(bad, runs, name="bad-value")
    rc, out, err = cli("report", "--runs-dir", runs, "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert rc == 0 and "Traceback" not in err and len(lines) == 2
    assert any("corrupt.json" in ln for ln in lines) and any("bad-value.json" in ln for ln in lines)
    assert all(ln.startswith("warning: skipping ") for ln in lines)
    rc, _, err = cli("report", "--runs-dir", runs, "--out", tmp_path / "out", "--strict")
    assert_one_line_error(rc, err, "--strict")


def test_report_counts_a_config_and_seed_once_and_never_mixes_machines(tmp_path):
    import pandas as pd

    from wmbench.report.tables import build_report
    runs = tmp_path / "runs"
    write_record(_grid_record(0, error=10.0), runs, name="a-old")
    later = _grid_record(0, error=20.0)
    later["created_at"] = "2999-01-01T00:00:00+00:00"
    write_record(later, runs, name="a-new")
    write_record(_grid_record(0, error=50.0, cpu="Test CPU B"), runs, name="b")
    paths, messages = build_report(runs, tmp_path / "out")
    assert any("a-old.json" in m and "kept the newer" in m for m in messages)
    table = pd.read_csv(tmp_path / "out" / "tables" / "gridworld.csv")
    assert sorted(zip(table.hardware, table.seeds, table.error_mean)) == [("Test CPU A", 1, 20.0),
                                                                           ("Test CPU B", 1, 50.0)]
    build_report(runs, tmp_path / "out2", machine="cpu b")
    table = pd.read_csv(tmp_path / "out2" / "tables" / "gridworld.csv")
    assert list(table.hardware) == ["Test CPU B"]


def test_record_saved_nowhere_is_printed(tmp_path, monkeypatch, capsys):
    """Every folder refuses the record: the error line goes to stderr and the record itself to stdout."""
    import wmbench.core.records as records
    from wmbench.cli import main

    def failing(*a, **kw):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(records, "write_record", failing)
    monkeypatch.chdir(tmp_path)
    rc = main(TINY_RUN + ["--runs-dir", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert rc == 1 and err.strip().splitlines()[-1].startswith("error: ") and "nor to any fallback" in err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["kind"] == "gridworld" and rec["metrics"]["error_pct"]["value"] >= 0


def test_wall_time_includes_the_final_evaluation(tmp_path, monkeypatch):
    """The record's wall_time says 'the final evaluation included': a 3 s final evaluation shows in it."""
    import wmbench.agent.train as train_mod
    from wmbench.agent.config import resolve_config
    real, started = train_mod.evaluate, []

    def slow_evaluate(*a, **kw):
        started.append(time.perf_counter())
        time.sleep(3.0)
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "evaluate", slow_evaluate)
    cfg = resolve_config("tiny", game="gridgoal", steps=24, warmup_steps=20, eval_every=0, final_eval_episodes=1,
                         checkpoint_every=0, threads=1, run_dir=str(tmp_path / "run"),
                         runs_dir=str(tmp_path / "rec"), env_options={"episode_length": 10})
    t0 = time.perf_counter()
    out = train_mod.train(cfg, progress=False)
    assert len(started) == 1
    assert out["metrics"]["wall_time"]["value"] >= (started[0] - t0) + 3.0
