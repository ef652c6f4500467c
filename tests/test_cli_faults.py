"""Issue 28, the command line: `--check` refuses exactly what the real run refuses; empty and absurd values
are refused with the accepted range; no prefix matching; canonical names; a diverging seed is one error
line and the other seeds still run; an automatic precision is measured once per machine and kept by a
resumed run. Each case failed on the main of 2026-12-05 (c7cd6f5)."""
import json

import pytest

from wmbench.agent import config as agent_config
from wmbench.cli import main

TINY_RUN = ["run", "--len", "52", "--steps", "2", "--d-model", "8", "--layers", "1", "--eval-sequences", "2",
            "--no-progress"]
TINY_ATARI = ["atari", "--game", "gridgoal", "--preset", "tiny", "--steps", "40", "--warmup", "20",
              "--eval-every", "0", "--final-eval-episodes", "1", "--threads", "1", "--no-progress",
              "--no-estimate", "--no-compile", "--precision", "fp32"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:          # argparse's errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc, err, needle):
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], err


# what --check passed and the real run then rejected (or took silently), refused the same way by both
BAD = [
    (TINY_RUN + ["--seeds", "99999999999999999999"], "argument --seeds: expected an integer in [0, 2,147,483,647]"),
    (TINY_ATARI + ["--seed", "-1"], "argument --seed: expected an integer in [0, 2,147,483,647]"),
    (TINY_ATARI + ["--set", 'backbone_options={"foo": 1}'], "unknown mamba2 option(s) ['foo']"),
    (TINY_ATARI + ["--env-option", "episode_length=-5"], "--env-option: episode_length must be >= 1, got -5"),
    (TINY_RUN + ["--threads", "100000"], "argument --threads: expected an integer in [0, "),
    (TINY_ATARI + ["--threads", "100000"], "argument --threads: expected an integer in [0, "),
    (["bench", "--threads", "100000"], "argument --threads: expected an integer in [0, "),
    (TINY_RUN + ["--runs-dir", ""], "argument --runs-dir: expected a path, got an empty string"),
    (TINY_ATARI + ["--run-dir", ""], "argument --run-dir: expected a path, got an empty string"),
    (TINY_ATARI + ["--runs-dir", ""], "argument --runs-dir: expected a path, got an empty string"),
    (["report", "--runs-dir", ""], "argument --runs-dir: expected a path"),
    (["report", "--out", ""], "argument --out: expected a path"),
    (TINY_RUN + ["--batch", "0"], "argument --batch: expected an integer in [1, 1,000,000,000], got 0"),
    (TINY_RUN + ["--steps", "1000000000000"], "argument --steps: expected an integer in [1, 1,000,000,000]"),
    (TINY_ATARI + ["--steps", "1000000000000"], "argument --steps: expected an integer in [1, 1,000,000,000]"),
    (TINY_ATARI + ["--steps", "100", "--warmup", "5000"], "--warmup 5000 must be below --steps 100"),
    (TINY_RUN + ["--backbon", "gru"], "unrecognized arguments: --backbon"),     # no prefix matching
    (TINY_ATARI + ["--gam", "Krull"], "unrecognized arguments: --gam"),
]


@pytest.mark.parametrize("check", [True, False], ids=["check", "real"])
@pytest.mark.parametrize("args,needle", BAD, ids=[f"{a[0]}:{n[:30]}" for a, n in BAD])
def test_check_and_the_real_run_refuse_the_same(capsys, tmp_path, monkeypatch, args, needle, check):
    monkeypatch.chdir(tmp_path)
    argv = args + (["--check"] if check and args[0] != "report" else [])
    if args[0] in ("run", "atari") and "--runs-dir" not in args:
        argv += ["--runs-dir", tmp_path / "runs"]
    rc, out, err = run_cli(capsys, *argv)
    assert_refused(rc, err, needle)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())   # nothing written


def test_names_are_canonical(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, *TINY_RUN, "--backbone", "Mamba2", "--check", "--runs-dir", tmp_path)
    assert rc == 0 and json.loads(out)[0]["backbone"] == "mamba2"
    rc, out, _ = run_cli(capsys, *TINY_ATARI, "--backbone", "GRU", "--check", "--run-dir", tmp_path / "r",
                         "--runs-dir", tmp_path)
    assert rc == 0 and json.loads(out)["backbone"] == "gru"
    rc, out, _ = run_cli(capsys, "run", "--task", "atari", "--game", "krull", "--backbone", "Mamba2", "--check",
                         "--runs-dir", tmp_path)
    assert rc == 0 and json.loads(out)["cells"][0]["backbone"] == "mamba2"


def test_a_diverging_seed_is_one_error_and_the_other_seeds_run(capsys, tmp_path, monkeypatch):
    from wmbench.harness import gridworld
    real = gridworld.train_and_evaluate

    def diverge_on_seed_0(cfg, **kw):
        if cfg.seed == 0:
            raise FloatingPointError("training loss became nan at step 1; try a lower --lr")
        return real(cfg, **kw)
    monkeypatch.setattr(gridworld, "train_and_evaluate", diverge_on_seed_0)
    rc, out, err = run_cli(capsys, *TINY_RUN, "--seeds", "0,1", "--runs-dir", tmp_path)
    assert rc == 1 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: mamba2 L=52 seed 0: training loss became nan at step 1; try a lower --lr; no record written"]
    records = list(tmp_path.glob("gridworld-*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["config"]["seed"] == 1


@pytest.mark.slow
def test_a_real_divergence_at_lr_1e30(capsys, tmp_path):
    rc, out, err = run_cli(capsys, *TINY_RUN, "--seeds", "0,1", "--lr", "1e30", "--runs-dir", tmp_path)
    assert rc == 1 and "Traceback" not in err and err.count("error: ") == 2


# ---------------------------------------------------------------- automatic precision, once per machine

def _cfg(**kw):
    return agent_config.check_config(agent_config.resolve_config(None, game="gridgoal", device="cpu",
                                                                 compile=False, **kw))


def test_auto_precision_is_measured_once_per_machine(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(agent_config, "bf16_native", lambda d: True)
    monkeypatch.setattr(agent_config, "bf16_speedup", lambda d: calls.append(1) or [2.0, 0.5][len(calls) - 1])
    first = _cfg(run_dir=str(tmp_path / "a"))
    second = _cfg(run_dir=str(tmp_path / "b"), seed=1)   # another seed, a host that now measures 0.5x
    assert len(calls) == 1 and first.precision == second.precision == "bf16"
    assert "cached" in second.auto_choices["precision"]


def test_a_resumed_run_keeps_its_first_precision(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = {"precision": "bf16", "auto_choices": {"precision": "measured 2.00x fp32's speed here"}}
    (run_dir / "config.json").write_text(json.dumps({"train": saved}))
    monkeypatch.setattr(agent_config, "bf16_native", lambda d: True)
    monkeypatch.setattr(agent_config, "bf16_speedup", lambda d: 0.5)     # the host measures otherwise now
    cfg = _cfg(run_dir=str(run_dir))
    assert cfg.precision == "bf16" and "first start" in cfg.auto_choices["precision"]


def test_a_resumed_run_refuses_another_precision(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, out, _ = run_cli(capsys, *TINY_ATARI, "--check", "--run-dir", run_dir, "--runs-dir", tmp_path / "runs")
    assert rc == 0
    run_dir.mkdir()
    cfg = json.loads(out)
    (run_dir / "config.json").write_text(json.dumps({"train": cfg}))
    args = [a if a != "fp32" else "bf16" for a in TINY_ATARI]
    rc, _, err = run_cli(capsys, *args, "--check", "--run-dir", run_dir, "--runs-dir", tmp_path / "runs")
    assert_refused(rc, err, "precision: 'fp32' -> 'bf16'")
