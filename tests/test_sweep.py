"""`wmbench sweep`: spec expansion and keys, validation, dry runs, the local executor end to end with
retries and a resume after `kill -9`, submitit's local executor, and Ray in a slow test."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmbench.cli import main
from wmbench.core.records import load_records
from wmbench.sweep.spec import Run, inline_spec, load_spec, packaged_specs, spec_from_dict

TINY = {"task": "gridworld", "steps": 3, "d-model": 16, "eval-sequences": 2, "len": 52}


def _spec_file(tmp_path: Path, grid: dict, options: dict = TINY, name: str = "t") -> Path:
    def val(v):
        return json.dumps(v)          # TOML accepts JSON strings, numbers and arrays
    lines = [f'name = "{name}"', "[[runs]]", 'command = "run"',
             "options = { " + ", ".join(f"{k} = {val(v)}" for k, v in options.items()) + " }",
             "grid = { " + ", ".join(f"{k} = {val(v)}" for k, v in grid.items()) + " }"]
    p = tmp_path / f"{name}.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def _sweep_argv(spec: Path, tmp_path: Path, *extra) -> list[str]:
    return ["sweep", str(spec), "--runs-dir", str(tmp_path / "records"), "--state-dir", str(tmp_path / "state"),
            "--no-progress", *extra]


# ------------------------------------------------------------------------------------------ specs

def test_packaged_sweeps_expand_to_the_papers_grids():
    sizes = {name: len(load_spec(name).expand()) for name in packaged_specs()}
    assert sizes["paper-table1"] == 26 * 5
    assert sizes["paper-dfs-ablation"] == 26 * 5 * 2
    assert sizes["paper-mamba-vs-mamba2"] == 2 * 4 * 5
    assert sizes["paper-gridworld"] == 8 * 2 * 3
    assert sizes["cpu-smoke"] == 2 * 2 * 2 + 2
    assert sizes["cpu-grid-memory"] == 2 * 8 + 3 * 2   # seed 0 everywhere, seeds 1-2 of agent_once
    # the DFS half of the ablation is the same runs as Table 1 (same keys), so they are not run twice
    t1 = {r.key for r in load_spec("paper-table1").expand()}
    abl = load_spec("paper-dfs-ablation").expand()
    assert {r.key for r in abl if r.option("sampler") == "dfs"} == t1


def test_every_packaged_run_parses_with_the_real_cli():
    from wmbench.cli import build_parser
    from wmbench.sweep.cli import validate
    for name in packaged_specs():
        validate(load_spec(name).expand(), build_parser)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["backbone", "len", "seed", "lr", "steps", "variant"]),
                       st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_grid_expands_to_its_product_with_unique_order_free_keys(grid, rnd):
    spec = spec_from_dict({"runs": [{"command": "run", "options": {"task": "gridworld"}, "grid": grid}]}, "x", "t")
    runs = spec.expand()
    n = 1
    for vs in grid.values():
        n *= len(vs)
    assert len(runs) == n and len({r.key for r in runs}) == n
    shuffled = dict(rnd.sample(list(grid.items()), len(grid)))       # the axes in another order
    again = spec_from_dict({"runs": [{"command": "run", "options": {"task": "gridworld"}, "grid": shuffled}]}, "x", "t")
    assert {r.key for r in again.expand()} == {r.key for r in runs}


def test_key_is_stable_and_ignores_option_order_and_the_executor():
    a = Run("run", tuple(sorted({"backbone": "gru", "len": 208, "seed": 0}.items())))
    b = inline_spec("run", ["seed=0", "len=208"], ["backbone=gru"]).expand()[0]
    assert a.key == b.key and len(a.key) == 12
    assert a.argv() == ["run", "--backbone", "gru", "--len", "208", "--seeds", "0"]
    assert Run("atari", (("seed", 3),)).argv() == ["atari", "--seed", "3"]
    assert Run("atari", (("compile", False),)).argv() == ["atari", "--no-compile"]
    from wmbench.sweep.driver import run_argv
    argv = run_argv(a, Path("/r"), Path("/s/x"), threads=2)
    assert argv[-2:] == ["--threads", "2"] and "--runs-dir" in argv   # executor extras, not in the key


def test_yaml_and_toml_specs_give_the_same_runs(tmp_path):
    pytest.importorskip("yaml")
    toml = _spec_file(tmp_path, {"backbone": ["gru", "mamba2"], "seed": [0, 1]})
    (tmp_path / "t.yaml").write_text("name: t\nruns:\n  - command: run\n    options: {task: gridworld, steps: 3, "
                                     "d-model: 16, eval-sequences: 2, len: 52}\n"
                                     "    grid: {backbone: [gru, mamba2], seed: [0, 1]}\n")
    assert [r.key for r in load_spec(str(toml)).expand()] == [r.key for r in load_spec(str(tmp_path / "t.yaml")).expand()]


def test_grid_and_set_extend_a_spec_file(tmp_path, capsys):
    spec = _spec_file(tmp_path, {"backbone": ["gru"]})
    assert main(_sweep_argv(spec, tmp_path, "--dry-run", "--grid", "seed=0,1", "--set", "lr=0.002")) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("wmbench run")]
    assert len(lines) == 2 and all("--lr 0.002" in l for l in lines)
    assert main(_sweep_argv(spec, tmp_path, "--dry-run", "--grid", "backbone=mamba2")) == 2   # the spec has it


@pytest.mark.parametrize("raw, match", [
    ({"runs": []}, "no \\[\\[runs\\]\\] block"),
    ({"runs": [{"command": "bench"}]}, "not sweepable"),
    ({"runs": [{"grid": {"len": []}}]}, "has no values"),
    ({"runs": [{"grid": {"len": [1, 1]}}]}, "repeats a value"),
    ({"runs": [{"options": {"len": 1}, "grid": {"len": [2]}}]}, "both an option and a grid axis"),
    ({"runs": [{"grid": {"runs-dir": ["x"]}}]}, "set by the sweep itself"),
    ({"runs": [{"options": {"Backbone": "gru"}}]}, "not an option name"),
    ({"runs": [{"options": {"x": [1]}}]}, "must be a string, number or boolean"),
    ({"runs": [{}], "exectuor": {}}, "unknown key"),
])
def test_bad_specs_are_refused(raw, match):
    with pytest.raises(ValueError, match=match):
        spec_from_dict(raw, "x", "test")


@pytest.mark.parametrize("argv, match", [
    (["sweep", "no-such-sweep"], "no sweep file 'no-such-sweep'"),
    (["sweep", "--grid", "backbone=gru,lstm"], "unknown backbone 'lstm'"),
    (["sweep", "--grid", "wrong-option=1"], "unrecognized arguments"),
    (["sweep", "--command", "atari", "--grid", "game=Pacman"], "unknown game 'Pacman'"),
    (["sweep"], "give a sweep file"),
])
def test_bad_sweeps_fail_in_one_line_before_running(argv, match, capsys, tmp_path):
    assert main(argv + ["--state-dir", str(tmp_path / "s"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    import re
    assert re.search(match, err), err


def test_missing_extra_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)       # import ray -> ImportError
    monkeypatch.setitem(sys.modules, "submitit", None)
    for ex in ("ray", "slurm"):
        rc = main(["sweep", "--grid", "backbone=gru", "--executor", ex, "--state-dir", str(tmp_path / "s")])
        err = capsys.readouterr().err
        assert rc == 2 and "pip install 'wmbench[sweep]'" in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_the_commands_and_marks_done_runs(tmp_path, capsys):
    spec = _spec_file(tmp_path, {"backbone": ["gru", "mamba2"], "seed": [0, 1]})
    assert main(_sweep_argv(spec, tmp_path, "--dry-run", "--threads", "1")) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("wmbench run")]
    assert len(lines) == 4 and all("--threads 1" in l and "--seeds" in l for l in lines)
    first, second = load_spec(str(spec)).expand()[:2]
    from wmbench.core.records import make_record, write_record
    record = write_record(make_record("gridworld", {}, {}), tmp_path / "records")
    (tmp_path / "state" / "done").mkdir(parents=True)
    (tmp_path / "state" / "done" / f"{first.key}.json").write_text(json.dumps({"key": first.key,
                                                                               "records": [str(record)]}))
    (tmp_path / "state" / "done" / f"{second.key}.json").write_text("{}")    # lists no record: not done
    main(_sweep_argv(spec, tmp_path, "--dry-run"))
    assert sum(l.endswith("# done") for l in capsys.readouterr().out.splitlines()) == 1


def test_dry_run_shows_the_slurm_job_script(tmp_path, capsys):
    pytest.importorskip("submitit")
    spec = _spec_file(tmp_path, {"backbone": ["gru", "mamba2"], "seed": [0, 1, 2]})
    assert main(_sweep_argv(spec, tmp_path, "--dry-run", "--executor", "slurm", "--partition", "gpu",
                            "--gpus", "1", "--time-min", "90", "--mem-gb", "16")) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --array=0-5", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=90", "#SBATCH --mem=16.0GB", "submitit.core._submit"):
        assert line in out, line


# ----------------------------------------------------------------------------- running for real

def _records(tmp_path):
    recs = load_records(tmp_path / "records", kind="gridworld")
    return sorted((r["config"]["backbone"], r["config"]["seed"]) for r in recs)


def test_local_sweep_runs_each_run_once_and_resumes(tmp_path, capsys):
    spec = _spec_file(tmp_path, {"backbone": ["gru", "mamba2"], "seed": [0]})
    assert main(_sweep_argv(spec, tmp_path, "--workers", "2", "--threads", "1")) == 0
    out = capsys.readouterr().out
    assert "sweep: 2 run now, 0 done before, 0 failed" in out
    assert _records(tmp_path) == [("gru", 0), ("mamba2", 0)]
    done = sorted(json.loads(p.read_text())["label"] for p in (tmp_path / "state" / "done").glob("*.json"))
    assert len(done) == 2 and all(d.startswith("run backbone=") for d in done)
    # the same command again: nothing runs, nothing is written
    assert main(_sweep_argv(spec, tmp_path, "--workers", "2")) == 0
    assert "sweep: 0 run now, 2 done before" in capsys.readouterr().out
    assert _records(tmp_path) == [("gru", 0), ("mamba2", 0)]


def test_failed_runs_are_retried_logged_and_fail_the_sweep(tmp_path, capsys):
    # --lr 1e30 passes every check before the run and diverges in it: every attempt of that run exits 1
    spec = _spec_file(tmp_path, {"lr": [0.002, 1e30]}, options=TINY | {"backbone": "gru"})
    assert main(_sweep_argv(spec, tmp_path, "--retries", "1", "--threads", "1")) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and "failed: run backbone=gru" in out and "lr=1e+30" in out
    bad = [r for r in load_spec(str(spec)).expand() if r.option("lr") == 1e30][0]
    logs = sorted((tmp_path / "state" / "logs").glob(f"{bad.key}.*.log"))
    assert len(logs) == 2 and all("training loss became nan" in p.read_text() for p in logs)
    assert _records(tmp_path) == [("gru", 0)]


def test_resume_after_kill_9(tmp_path):
    """Kill -9 the sweep while its runs are alive: the runs die with it (no orphan finishes later), nothing
    is half-written, and re-running the command skips the completed runs and does the rest once."""
    psutil = pytest.importorskip("psutil")
    spec = _spec_file(tmp_path, {"backbone": ["gru", "mamba2"], "seed": [0, 1, 2]})
    argv = [sys.executable, "-m", "wmbench.cli", *_sweep_argv(spec, tmp_path, "--workers", "1", "--threads", "1")]
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    done_dir = tmp_path / "state" / "done"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(done_dir.glob("*.json"))) < 2:
        time.sleep(0.2)
    children = []
    while time.monotonic() < deadline:     # a run under way for a second: well before it can finish
        children = psutil.Process(sweep.pid).children(recursive=True)
        if children and time.time() - min(c.create_time() for c in children) > 1.0:
            break
        time.sleep(0.05)
    assert children, "a run should be alive when the sweep is killed"
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    gone, alive = psutil.wait_procs(children, timeout=3)
    assert not alive, f"runs outlived the sweep: {[p.pid for p in alive]}"
    time.sleep(6)                          # longer than a whole run: an orphan would have written its record
    n_records = len(load_records(tmp_path / "records", kind="gridworld"))
    assert n_records == len(list(done_dir.glob("*.json")))
    finished_before = {p.stem for p in done_dir.glob("*.json")}
    assert 2 <= len(finished_before) < 6
    assert not [p for p in (tmp_path / "records").iterdir() if p.name.startswith(".") or p.suffix != ".json"]
    before = {(r["config"]["backbone"], r["config"]["seed"]) for r in load_records(tmp_path / "records", kind="gridworld")}

    res = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(finished_before)} of 6 runs already done" in res.stdout + res.stderr
    for key in finished_before:     # a completed run was not started again: one log, one attempt
        assert len(list((tmp_path / "state" / "logs").glob(f"{key}.*.log"))) == 1
    recs = load_records(tmp_path / "records", kind="gridworld")
    pairs = [(r["config"]["backbone"], r["config"]["seed"]) for r in recs]
    assert sorted(pairs) == sorted({(b, s) for b in ("gru", "mamba2") for s in (0, 1, 2)}), pairs
    assert before <= set(pairs)


def test_slurm_executor_through_submitit_local(tmp_path, capsys):
    """The SLURM path (submitit AutoExecutor, array submission, polling, results) on submitit's local
    cluster, which runs the same job pickles as SLURM would, without SLURM."""
    pytest.importorskip("submitit")
    spec = _spec_file(tmp_path, {"backbone": ["gru", "mamba2"]})
    assert main(_sweep_argv(spec, tmp_path, "--executor", "slurm", "--cluster", "local", "--threads", "1",
                            "--time-min", "10")) == 0
    assert "sweep: 2 run now" in capsys.readouterr().out
    assert _records(tmp_path) == [("gru", 0), ("mamba2", 0)]
    assert list((tmp_path / "state" / "submitit").glob("*_result.pkl"))     # submitit ran the jobs


@pytest.mark.slow
def test_ray_executor_on_a_local_ray(tmp_path):
    pytest.importorskip("ray")
    spec = _spec_file(tmp_path, {"backbone": ["gru", "mamba2"], "seed": [0, 1]})
    argv = [sys.executable, "-m", "wmbench.cli", *_sweep_argv(spec, tmp_path, "--executor", "ray", "--cpus", "1",
                                                              "--threads", "1")]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "sweep: 4 run now" in res.stdout
    assert _records(tmp_path) == [("gru", 0), ("gru", 1), ("mamba2", 0), ("mamba2", 1)]
