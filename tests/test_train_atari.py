"""`wmbench atari` training loop: exact resume, refusals, non-finite stop, CLI errors, run record, learning."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from wmbench.agent import checkpoint as ckpt
from wmbench.agent.acting import ActingContext, env_state, evaluate, set_env_state
from wmbench.agent.config import resolve_config
from wmbench.agent.train import NonFiniteLossError, train
from wmbench.core.errors import UserError
from wmbench.core.records import load_records, validate_record

EP_LEN = 10   # short gridgoal episodes, so runs of a few dozen steps finish several


def _cfg(run_dir, runs_dir, **kw):
    """The `tiny` model on gridgoal: 16 random steps, then one update pair per step."""
    base = dict(game="gridgoal", backbone="mamba2", steps=32, warmup_steps=16, run_dir=str(run_dir),
                eval_every=12, eval_episodes=2, final_eval_episodes=3, eval_envs=2, checkpoint_every=0,
                log_every=1, replay_capacity=200, env_options={"episode_length": EP_LEN},
                runs_dir=str(runs_dir), threads=1)
    base.update(kw)
    return resolve_config("tiny", **base)


def _rows(run_dir):
    """metrics.jsonl without the wall-clock fields (they differ between runs)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if not k.endswith("_per_s")})
    return out


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run (shared by the resume and record tests)."""
    d = tmp_path_factory.mktemp("full")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):   # the wall-time estimate times updates on copies: no side effects
        summary = train(_cfg(d / "run", d / "runs"), progress=False, estimate=True)
    out = err.getvalue()
    assert "estimate:" in out and " s per update (" in out and " updates left = about " in out
    return d, summary


def test_kill_and_resume_matches_uninterrupted_run(full_run, tmp_path):
    d, full = full_run
    cfg = _cfg(tmp_path / "run", tmp_path / "runs")
    part = train(cfg, progress=False, stop_at=23)      # mid-episode, after the eval at step 12
    assert part["stopped"] and part["step"] == 23
    assert ckpt.load_checkpoint(tmp_path / "run").step == 23
    resumed = train(cfg, progress=False)
    assert not resumed["stopped"] and resumed["step"] == 32 and resumed["updates"] == full["updates"] == 16
    # every logged loss, episode return and eval score, before and after the cut, identical
    a, b = _rows(d / "run"), _rows(tmp_path / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert a == b
    late = [r for r in b if r["type"] == "train" and r["step"] > 23]
    assert len(late) == 9 and all(np.isfinite(r["loss"]) for r in late)
    # the final weights, optimiser moments and replay counters are bit-identical
    ca, cb = ckpt.load_checkpoint(d / "run"), ckpt.load_checkpoint(tmp_path / "run")
    for part in ("wm", "agent"):
        for k, v in ca.state[part]["model"].items():
            assert torch.equal(v, cb.state[part]["model"][k]), (part, k)
        for i, st in ca.state[part]["optimizer"]["state"].items():
            for k, v in st.items():
                assert (torch.equal(v, cb.state[part]["optimizer"]["state"][i][k]) if torch.is_tensor(v)
                        else v == cb.state[part]["optimizer"]["state"][i][k]), (part, i, k)
    for k in ("replay.wm_count", "replay.img_count", "replay.obs", "replay.rng"):
        assert np.array_equal(ca.arrays[k], cb.arrays[k]), k
    ra = json.loads((d / "run" / "record.json").read_text())
    rb = json.loads((tmp_path / "run" / "record.json").read_text())
    assert ra["final_eval"] == rb["final_eval"]
    assert ra["episodes"] == rb["episodes"]


def test_run_record_is_valid(full_run):
    d, summary = full_run
    recs = load_records(d / "runs", kind="atari")
    assert len(recs) == 1
    rec = recs[0]
    validate_record(rec)
    assert rec == {**json.loads((d / "run" / "record.json").read_text()), "_path": rec["_path"]}
    c = rec["config"]
    assert (c["game"], c["backbone"], c["sampler"], c["size"], c["steps"]) == ("gridgoal", "mamba2", "dfs", "tiny", 32)
    assert c["model"]["preset_class"] == "Tiny"
    # every training episode with the env step it ended at: 32 steps of 10-step episodes
    assert [e["step"] for e in rec["episodes"]] == [10, 20, 30]
    assert all(e["length"] == EP_LEN for e in rec["episodes"])
    assert [e["step"] for e in rec["eval_history"]] == [12, 24]
    m = rec["metrics"]
    # the headline is the paper's score: the mean of the last 5 training episodes
    assert m["score"]["value"] == pytest.approx(np.mean([e["return"] for e in rec["episodes"][-5:]]))
    assert m["score"]["n"] == 3 and "last 5 training episodes" in m["score"]["method"]
    assert m["score_over_random"]["value"] == pytest.approx(m["score"]["value"] / m["random_return"]["value"])
    fe = rec["final_eval"]
    assert m["final_eval_return"]["n"] == len(fe["returns"]) == len(fe["lengths"]) == 3
    assert m["final_eval_return"]["value"] == pytest.approx(np.mean(fe["returns"]))
    # every action of the final evaluation is counted: 3 full 10-step games
    assert sum(fe["action_counts"]) == sum(fe["lengths"]) == 3 * EP_LEN and len(fe["action_counts"]) == 4
    assert m["final_eval_top_action_fraction"]["value"] == pytest.approx(max(fe["action_fractions"]))
    # every paper-vs-code choice is named, with the value this run used
    ch = {c["field"]: c for c in rec["paper_vs_code"]}
    assert rec["faithful"] == "paper" and ch["dfs_mode"]["value"] == "official"
    assert ch["policy_latent"]["value"] == "prior" and ch["headdim"]["value"] == 16   # tiny's head dim
    assert all(set(c) == {"field", "value", "paper", "code", "what"} for c in ch.values())
    from wmbench.tasks.gridgoal import expected_return
    assert m["random_return"]["value"] == pytest.approx(expected_return("random", episode_length=EP_LEN))
    assert m["optimal_return"]["value"] > m["random_return"]["value"]
    for k in ("env_steps_per_s", "updates_per_s", "s_per_update", "wall_time"):
        assert m[k]["value"] > 0 and m[k]["unit"]
    assert rec["protocol"]["episode_length"] == EP_LEN and rec["ale_py_version"]
    from wmbench.report.atari import atari_markdown
    md = atari_markdown([rec])
    assert "## gridgoal" in md and f"| mamba2 | dfs | tiny | paper | 0 | 32 | **{m['score']['value']:.2f}** |" in md
    assert "| **score** | score / random | final eval (N) |" in md


def test_mismatched_config_is_refused_and_nothing_overwritten(tmp_path):
    cfg = _cfg(tmp_path / "run", tmp_path / "runs", steps=20)
    train(cfg, progress=False, stop_at=18)
    before = _snapshot(tmp_path)
    for change, expect in ((dict(seed=1), "seed: 0 -> 1"), (dict(backbone="gru", sampler="uniform"),
                                                             "backbone: 'mamba2' -> 'gru'")):
        with pytest.raises(UserError) as e:
            train(_cfg(tmp_path / "run", tmp_path / "runs", steps=20, **change), progress=False)
        msg = str(e.value)
        assert expect in msg and "different config" in msg and "\n" not in msg
        assert _snapshot(tmp_path) == before
    assert "sampler: 'dfs' -> 'uniform'" in msg
    # fields that do not change what is learned may differ: a longer run resumes
    assert train(_cfg(tmp_path / "run", tmp_path / "runs", steps=22, final_eval_episodes=1),
                 progress=False)["step"] == 22


def test_corrupt_checkpoint_is_refused_and_nothing_overwritten(tmp_path):
    cfg = _cfg(tmp_path / "run", tmp_path / "runs", steps=20)
    train(cfg, progress=False, stop_at=18)
    f = tmp_path / "run" / "checkpoints" / "step_000000018" / "arrays.npz"
    b = bytearray(f.read_bytes())
    b[-100] ^= 0xFF
    f.write_bytes(bytes(b))
    before = _snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError) as e:
        train(cfg, progress=False)
    assert "corrupt" in str(e.value) and "\n" not in str(e.value)
    assert _snapshot(tmp_path) == before


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from wmbench.world_model import WorldModel
    orig, calls = WorldModel.loss, []

    def poisoned(self, *a, **k):   # the 3rd world-model update (env step 19) produces NaN
        calls.append(1)
        total, parts = orig(self, *a, **k)
        if len(calls) == 3:
            parts = {**parts, "recon": parts["recon"] * float("nan")}
        return total, parts
    monkeypatch.setattr(WorldModel, "loss", poisoned)
    cfg = _cfg(tmp_path / "run", tmp_path / "runs", steps=30, checkpoint_every=18)
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, progress=False)
    msg = str(e.value)
    assert "non-finite" in msg and "recon=nan" in msg and "env step 19" in msg and "step 18" in msg
    assert "\n" not in msg
    c = ckpt.load_checkpoint(tmp_path / "run")   # the last good checkpoint, still valid
    assert c.step == 18 and c.meta["n_updates"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_000000018"]
    assert not list((tmp_path / "runs").glob("*.json"))   # no run record for a failed run


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_checkpoints_at_the_step_boundary(tmp_path, monkeypatch, signame):
    """First SIGINT / SIGTERM: the step finishes, a checkpoint is written, train() returns; the handlers are
    restored."""
    import os
    import signal
    from wmbench.world_model import WorldModel
    orig, calls = WorldModel.train_step, []
    sig = getattr(signal, signame)

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 2:                       # during the update of env step 18
            os.kill(os.getpid(), sig)
        return orig(self, batch)
    monkeypatch.setattr(WorldModel, "train_step", interrupted)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    s = train(_cfg(tmp_path / "run", tmp_path / "runs", steps=30), progress=False)
    assert s["stopped"] and s["step"] == 18 and s["updates"] == 2
    assert ckpt.load_checkpoint(tmp_path / "run").step == 18
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_checkpoints_by_wall_time(tmp_path, monkeypatch):
    """With step checkpoints off, a checkpoint still comes every `checkpoint_minutes` of wall time."""
    from wmbench.agent import train as train_atari
    clock = {"t": 1000.0}
    real = train_atari.time.perf_counter

    def fake_clock():   # each call advances 1 s: checkpoint_minutes=0.1 (6 s) -> every few steps
        clock["t"] += 1.0
        return clock["t"]
    monkeypatch.setattr(train_atari.time, "perf_counter", fake_clock)
    saved = []
    orig = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda run_dir, step, *a, **k: saved.append(step) or
                        orig(run_dir, step, *a, **k))
    train(_cfg(tmp_path / "run", tmp_path / "runs", steps=20, checkpoint_every=0, checkpoint_minutes=0.1,
               eval_every=0), progress=False)
    monkeypatch.setattr(train_atari.time, "perf_counter", real)
    assert len(saved) >= 3 and saved[-1] == 20 and saved == sorted(saved)
    assert all(b - a >= 1 for a, b in zip(saved, saved[1:]))
    # off: only the end-of-run checkpoint
    saved.clear()
    train(_cfg(tmp_path / "run2", tmp_path / "runs", steps=20, checkpoint_every=0, checkpoint_minutes=0,
               eval_every=0), progress=False)
    assert saved == [20]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wmbench.cli", "atari", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_unknown_game_gives_one_line_error():
    """The real command line, in a subprocess (the other bad options are checked in-process below)."""
    r = _cli("--game", "Pongg")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown game 'Pongg'")
    assert "Krull" in lines[0] and "gridgoal" in lines[0]      # the message names the valid choices


@pytest.mark.parametrize("args, expect", [
    (["--backbone", "lstm"], "unknown backbone 'lstm'; valid choices: gated_deltanet, gru, mamba, mamba2, mamba3, mlstm, rwkv7, transformer"),
    (["--sampler", "prioritized"], "unknown sampler 'prioritized'; valid choices: uniform, dfs"),
    (["--size", "XXL"], "unknown size 'XXL'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--set", "no_such_field=1"], "unknown config field"),
    (["--env-option", "colour=3"], "unknown env option"),
    (["--warmup", "3"], "warmup_steps must be >="),
])
def test_cli_bad_options_give_one_line_error(args, expect, capsys, tmp_path):
    from wmbench import cli
    from wmbench.agent.cli import add_parser
    if not any("atari" in getattr(f, "__name__", "") or f is add_parser for f in cli.COMMANDS):
        pytest.skip("atari not wired into wmbench.cli yet")
    rc = cli.main(["atari", "--game", "gridgoal", "--run-dir", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0]
    assert not (tmp_path / "r").exists()   # refused before creating anything


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: threads only add contention on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def test_evaluate_runs_exactly_n_full_episodes(one_thread):
    from wmbench.agent import ActorCritic
    from wmbench.world_model.config import get_preset
    from wmbench.tasks.atari import make_env
    from wmbench.world_model import WorldModel
    cfg = get_preset("tiny", backbone="gru")
    wm, ag = WorldModel(cfg, 4), ActorCritic(cfg, 4)
    make = lambda s: make_env("gridgoal", seed=s, episode_length=3)  # noqa: E731
    state = torch.get_rng_state()
    r1 = evaluate(wm, ag, make, n_episodes=3, n_envs=2, mcfg=cfg, greedy=False, seed=1)
    assert torch.equal(torch.get_rng_state(), state)     # evaluation leaves the training RNG alone
    r2 = evaluate(wm, ag, make, n_episodes=3, n_envs=2, mcfg=cfg, greedy=False, seed=1)
    assert len(r1.returns) == 3 and r1 == r2 and all(0 <= r <= 3 for r in r1.returns)
    assert r1.lengths == [3, 3, 3] and sum(r1.action_counts) == 9


def test_acting_context_keeps_the_last_T_frames_and_actions_between_them():
    c = ActingContext(3)
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(5)]
    c.reset(frames[0])
    o, a = c.arrays()
    assert o.shape == (1, 2, 2, 3) and a.shape == (0,)
    for t in range(1, 5):
        c.push(10 + t - 1, frames[t])   # action a_{t-1} taken at frame t-1, then frame t
    o, a = c.arrays()
    assert [int(x[0, 0, 0]) for x in o] == [2, 3, 4] and a.tolist() == [12, 13]


@pytest.mark.parametrize("game, protocol", [("gridgoal", "drama"), ("Krull", "storm")])
def test_environment_state_round_trip(game, protocol):
    """A restored env continues exactly (Krull under sticky actions: the ALE RNG is restored too)."""
    from wmbench.tasks.atari import make_env
    env = make_env(game, protocol, seed=3)
    env.reset(seed=3)
    for t in range(25):
        env.step(t % env.num_actions)
    meta, arrays = env_state(env)
    meta = json.loads(json.dumps(meta))                   # it goes through meta.json
    ref = [env.step((7 * t) % env.num_actions) for t in range(60)]
    other = make_env(game, protocol, seed=99)
    other.reset(seed=99)
    set_env_state(other, meta, arrays)
    got = [other.step((7 * t) % env.num_actions) for t in range(60)]
    for (o1, r1, te1, tr1, i1), (o2, r2, te2, tr2, i2) in zip(ref, got):
        assert np.array_equal(o1, o2) and (r1, te1, tr1) == (r2, te2, tr2)
        assert i1["episode_return"] == i2["episode_return"] and i1["episode_step"] == i2["episode_step"]


@pytest.mark.slow
def test_gridgoal_learns_on_cpu(tmp_path):
    """The `cpu` run preset reaches >= 2x the random policy's return on gridgoal (about 20 min on 2 cores)."""
    cfg = resolve_config("cpu", game="gridgoal", run_dir=str(tmp_path / "run"), runs_dir=str(tmp_path / "runs"),
                         threads=1)
    s = train(cfg, progress=False)
    m = s["metrics"]
    assert m["final_eval_return"]["value"] >= 2 * m["random_return"]["value"], m


def test_evaluation_plays_full_games_through_lost_lives(one_thread):
    """Breakout (5 lives): one evaluation episode runs until game over, past every lost life, and a lost
    life does not cut the action repeat short (the official eval env); training keeps the protocol's break."""
    from wmbench.agent import ActorCritic
    from wmbench.world_model.config import get_preset
    from wmbench.agent.acting import env_makers
    from wmbench.agent.config import check_config
    from wmbench.world_model import WorldModel
    cfg = check_config(resolve_config("tiny", game="Breakout"))
    make, make_eval = env_makers(cfg)
    assert make(0).protocol.break_on_life_loss is True and make_eval(0).protocol.break_on_life_loss is False
    infos = []

    def recording(seed):
        env = make_eval(seed)
        step = env.step
        env.step = lambda a: (lambda out: infos.append(out) or out)(step(a))
        return env
    m = get_preset("tiny")
    res = evaluate(WorldModel(m, 4), ActorCritic(m, 4), recording, n_episodes=1, n_envs=1, mcfg=m,
                   greedy=True, seed=0)
    lost = [i for i, (_, _, _, _, info) in enumerate(infos) if info["life_lost"]]
    assert len(res.returns) == 1 and res.lengths == [len(infos)]
    assert len(lost) == 5 and lost[-1] == len(infos) - 1          # lives 1-4 lost mid-game, the 5th ends it
    assert all(not (te or tr) for _, _, te, tr, _ in infos[:-1])
    assert all(info["episode_frame"] == 4 * (i + 1) for i, (*_, info) in enumerate(infos[:-1]))  # full repeats


def test_stale_reset_frame_reproduces_the_official_code(tmp_path):
    """With stale_reset_frame the first stored frame of an episode is the previous episode's last frame."""
    from wmbench.tasks.atari import make_env
    stored = {}
    for stale in (False, True):
        d = tmp_path / str(stale)
        train(_cfg(d / "run", d / "runs", steps=24, warmup_steps=24, stale_reset_frame=stale, eval_every=0,
                   final_eval_episodes=0), progress=False)
        stored[stale] = ckpt.load_checkpoint(d / "run").arrays
    a = stored[True]
    assert np.array_equal(a["replay.action"], stored[False]["replay.action"])    # same actions
    env = make_env("gridgoal", seed=0, episode_length=EP_LEN)                     # replay them
    obs, _ = env.reset(seed=0)
    frames = [obs]
    for t, act in enumerate(a["replay.action"][:2 * EP_LEN]):
        obs, *_, = env.step(int(act))
        if (t + 1) % EP_LEN == 0:
            terminal = obs
            obs, _ = env.reset()
            frames.append(terminal)
        frames.append(obs)
    normal, stale = stored[False]["replay.obs"], a["replay.obs"]
    assert np.array_equal(normal[:EP_LEN], stale[:EP_LEN])                       # first episode: identical
    assert np.array_equal(stale[EP_LEN], frames[EP_LEN])                         # the terminal frame ...
    assert np.array_equal(normal[EP_LEN], frames[EP_LEN + 1])                    # ... instead of the reset one
    assert np.array_equal(normal[EP_LEN + 1:2 * EP_LEN], stale[EP_LEN + 1:2 * EP_LEN])


def test_kill_9_after_a_checkpoint_then_the_same_command_resumes_and_says_so(tmp_path):
    """The real command line: SIGKILL (nothing can be saved) after the first checkpoint; the same command
    continues from it, says so, and finishes."""
    import os
    import signal
    import time
    args = ["--game", "gridgoal", "--preset", "tiny", "--steps", "400", "--warmup", "16", "--checkpoint-every",
            "40", "--eval-every", "0", "--final-eval-episodes", "1", "--threads", "1", "--no-progress",
            "--run-dir", str(tmp_path / "run"), "--runs-dir", str(tmp_path / "runs"),
            "--env-option", "episode_length=20"]
    p = subprocess.Popen([sys.executable, "-m", "wmbench.cli", "atari", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    t0 = time.time()
    while not latest.exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    at = ckpt.load_checkpoint(tmp_path / "run").step
    assert 40 <= at < 400
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"resuming {tmp_path / 'run'} from env step {at}" in r.stderr
    assert "score" in r.stdout and ckpt.load_checkpoint(tmp_path / "run").step == 400
