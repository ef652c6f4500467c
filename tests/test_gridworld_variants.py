"""Grid-world memory variants (full, goal_once, agent_once): what each frame shows, what is scored, the
oracle floor, the memoryless reference, and `wmbench run --variant / --grid` end to end."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from wmbench.core.measure import metric
from wmbench.core.records import make_record, write_record
from wmbench.harness import gridworld as harness
from wmbench.harness import gridworld_eval as gw_eval
from wmbench.tasks import gridworld as gw

W, F_, A, G = gw.WALL, gw.FLOOR, gw.AGENT, gw.GOAL
N, E, S, Wst = gw.NORTH, gw.EAST, gw.SOUTH, gw.WEST
VARIANTS = list(gw.VARIANTS)


def frame(agent, goal, n=5, show=(A, G)):
    """Cells of one frame, (n*n,), drawing only the kinds in `show`."""
    g = np.full((n, n), W, dtype=np.int64)
    g[1:-1, 1:-1] = F_
    if A in show:
        g[agent] = A
    if G in show:
        g[goal] = G
    return g.reshape(-1)


def sequence(frames, actions):
    """Tokens (1, n*l_f) from a list of cell arrays and one action per frame."""
    return np.concatenate([np.r_[f, a] for f, a in zip(frames, actions)])[None]


# ---- what each variant draws -------------------------------------------------------------------------

# frame 0 (start), 1 (a step east), 2 (a re-spawn), 3 (a step south): frames 0 and 2 show everything
POSITIONS = [((1, 1), (3, 3)), ((1, 2), (3, 3)), ((2, 1), (1, 3)), ((3, 1), (1, 3))]
ACTIONS = [E, S, S, N]
SHOWN = np.array([[True, False, True, False]])


@pytest.mark.parametrize("variant, hidden", [("goal_once", G), ("agent_once", A)])
def test_hand_made_sequence_hides_the_object_between_its_appearances(variant, hidden):
    state = sequence([frame(a, g) for a, g in POSITIONS], ACTIONS)
    seen = gw.observe(state, SHOWN, variant)
    visible = (A, G) if hidden is None else tuple(k for k in (A, G) if k != hidden)
    want = [frame(a, g, show=(A, G) if SHOWN[0, t] else visible) for t, (a, g) in enumerate(POSITIONS)]
    assert np.array_equal(seen, sequence(want, ACTIONS))
    # the hidden cell shows floor, the object is back on the re-spawn frame, actions are untouched
    cells, actions = gw.split_frames(seen)
    assert (cells[0, [1, 3]] == hidden).sum() == 0 and (cells[0, [0, 2]] == hidden).sum(axis=-1).tolist() == [1, 1]
    assert actions.tolist() == [ACTIONS]


def test_full_draws_everything_and_returns_the_same_array():
    state = sequence([frame(a, g) for a, g in POSITIONS], ACTIONS)
    assert gw.observe(state, SHOWN, "full") is state


def test_observe_checks_one_flag_per_frame():
    state = sequence([frame(a, g) for a, g in POSITIONS], ACTIONS)
    with pytest.raises(ValueError, match="one flag per frame"):
        gw.observe(state, SHOWN[:, :3], "agent_once")


# sha256 prefixes of sample_sequences(16, 40, grid_size, seed) computed before the variants existed
TODAY = {(5, 3): "6b421fc668a4e2bb", (9, (7, 1)): "0e05f26e1d01ac9d", (4, 0): "0a1ce463cc5efdbb"}


@pytest.mark.parametrize("grid_size, seed", list(TODAY))
def test_full_is_bit_identical_to_the_task_before_variants(grid_size, seed):
    for tokens in (gw.sample_sequences(16, 40, grid_size=grid_size, seed=list(np.atleast_1d(seed))),
                   gw.sample_sequences(16, 40, grid_size=grid_size, seed=list(np.atleast_1d(seed)), variant="full")):
        assert hashlib.sha256(tokens.tobytes()).hexdigest()[:16] == TODAY[(grid_size, seed)]


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(VARIANTS), st.integers(4, 9), st.integers(0, 2**31), st.integers(2, 40))
def test_sampled_variants_follow_their_rule(variant, grid_size, seed, n):
    seen, info = gw.sample_sequences(6, n, grid_size=grid_size, seed=seed, return_info=True, variant=variant)
    full = gw.sample_sequences(6, n, grid_size=grid_size, seed=seed)
    assert np.array_equal(info["state"], full)                      # the same world, drawn differently
    shown = info["shown"]
    assert shown[:, 0].all() and np.array_equal(shown[:, 1:], info["respawn"][:, 1:])
    cells, actions = gw.split_frames(seen, grid_size)
    state_cells, state_actions = gw.split_frames(full, grid_size)
    assert np.array_equal(actions, state_actions)
    hidden = gw.VARIANTS[variant]
    if hidden is None:
        assert seen is info["state"]
        return
    other = A if hidden == G else G
    count = (cells == hidden).sum(axis=-1)
    assert (count[shown] == 1).all() and (count[~shown] == 0).all()  # drawn exactly where it (re)appears
    assert ((cells == other).sum(axis=-1) == 1).all()                # the other object always drawn
    # the only change: the hidden cell turns to floor, on the frames that do not show it
    diff = cells != state_cells
    assert (state_cells[diff] == hidden).all() and (cells[diff] == F_).all()
    assert not diff[shown].any()


def test_hidden_agent_reappears_where_it_respawned_then_hides_again():
    seen, info = gw.sample_sequences(64, 60, seed=9, return_info=True, variant="agent_once")
    cells, _ = gw.split_frames(seen)
    spawns = [(b, t) for b, t in np.argwhere(info["respawn"]) if t + 1 < 60 and not info["respawn"][b, t + 1]]
    assert len(spawns) > 20
    for b, t in spawns:
        r, c = info["agent"][b, t]
        assert cells[b, t, r * 5 + c] == A and (cells[b, t] == A).sum() == 1
        assert not (cells[b, t + 1] == A).any()


# ---- the metric on state frames --------------------------------------------------------------------

def test_goal_once_also_scores_the_goal_cell():
    target = frame((2, 2), (1, 3))
    goal_elsewhere = frame((2, 2), (3, 1))                          # agent right, goal wrong
    agent_elsewhere = frame((2, 1), (1, 3))
    pred = np.stack([target, goal_elsewhere, agent_elsewhere])
    tgt = np.stack([target] * 3)
    assert gw.frame_errors(pred, tgt, variant="full")["logic"].tolist() == [False, False, True]
    assert gw.frame_errors(pred, tgt, variant="agent_once")["logic"].tolist() == [False, False, True]
    assert gw.frame_errors(pred, tgt, variant="goal_once")["logic"].tolist() == [False, True, True]
    assert gw.tracked_kinds("goal_once") == (A, G) and gw.tracked_kinds("agent_once") == (A,)


def test_oracle_floor_hand_computed_on_grid_4():
    """Four scored frames on the 2x2 interior: two moves, two re-spawns the oracle guesses differently."""
    n = 4
    prev = np.stack([frame((1, 1), (2, 2), n), frame((1, 2), (2, 2), n),    # E, S: ordinary moves
                     frame((1, 1), (1, 2), n), frame((1, 1), (1, 2), n)])   # E onto the goal: re-spawns
    act = np.array([E, Wst, E, E])
    target = np.stack([frame((1, 2), (2, 2), n), frame((1, 1), (2, 2), n),
                       frame((1, 2), (2, 1), n),                              # oracle's agent cell, another goal
                       frame((2, 2), (1, 1), n)])                             # oracle's goal cell, another agent
    orc = gw.oracle_predict(prev, act)
    assert np.array_equal(orc[:2], target[:2])
    assert np.array_equal(orc[2], frame((1, 2), (1, 1), n)) and np.array_equal(orc[3], orc[2])
    got = {v: gw.error_percent(**{k: x for k, x in gw.frame_errors(orc, target, prev, act, variant=v).items()
                                  if k != "predictable"})["error"] for v in VARIANTS}
    # E_g = 0; E_l = 1/4 (frame 3: wrong agent) or, in goal_once, 2/4 (frame 2: wrong goal too)
    assert got == {"full": 12.5, "agent_once": 12.5, "goal_once": 25.0}
    assert gw.frame_errors(orc, target, prev, act)["predictable"].tolist() == [True, True, False, False]


def test_floor_formula_hand_computed():
    # grid 4: from an adjacent cell the walk needs h = 6 steps on average, from the diagonal one 8
    # (h_adj = 1 + h_diag/4 + h_adj/2, h_diag = 1 + h_adj/2 + h_diag/2), so E[h] = 20/3, rate 3/20
    assert gw.respawn_rate(4) == pytest.approx(0.15)
    assert gw.oracle_hit_probability(4, "full") == 0.25 and gw.oracle_hit_probability(4, "goal_once") == 1 / 12
    assert gw.floor_pct(0.15, 4, "full") == pytest.approx(5.625)          # 100 * 3/4 * 0.15 / 2
    assert gw.floor_pct(0.15, 4, "agent_once") == pytest.approx(5.625)
    assert gw.floor_pct(0.15, 4, "goal_once") == pytest.approx(6.875)     # 100 * 11/12 * 0.15 / 2
    assert gw.GridWorldTask(9, "goal_once").floor_pct(0.01) == pytest.approx(100 * (1 - 1 / (49 * 48)) * 0.005)
    # the finite-length share starts at the first-step hit chance and tends to the long-run rate
    assert gw.respawn_share(4, 2) == pytest.approx(2 / 3 * 1 / 4)          # adjacent w.p. 2/3, then 1 move in 4
    assert gw.respawn_share(5, 4000) == pytest.approx(gw.respawn_rate(5), rel=2e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("grid_size, n", [(5, 64), (7, 40)])
def test_oracle_floor_matches_the_formula_on_sampled_data(variant, grid_size, n):
    task = gw.GridWorldTask(grid_size, variant)
    seen, state, _ = task.sample_views(512, n, seed=[grid_size, 5])
    prev, act, nxt = gw._transitions(state, state, grid_size)
    fe = task.frame_errors(task.oracle_predict(prev, act), nxt, prev, act)
    respawn = ~fe["predictable"]
    assert not fe["geometric"].any() and not fe["logic"][~respawn].any()   # exact where the past decides
    got = task.error_percent(fe["geometric"], fe["logic"])["error"]
    q, k = gw.oracle_hit_probability(grid_size, variant), respawn.sum()
    sd = 100 * np.sqrt(k * q * (1 - q)) / len(respawn) / 2                 # binomial noise of the hits
    assert abs(got - task.floor_pct(respawn.mean())) < 4 * sd + 1e-9
    assert respawn.mean() == pytest.approx(gw.respawn_share(grid_size, n), rel=0.12)


# ---- the memoryless reference -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_memoryless_reference_separates_the_variants(variant):
    task = gw.GridWorldTask(5, variant)
    table = task.fit_memoryless(*task.sample_views(400, 64, seed=[0, 2])[:2])
    seen, state, _ = task.sample_views(128, 64, seed=[0, 1])
    prev_seen, act, nxt = gw._transitions(seen, state, 5)
    prev, _, _ = gw._transitions(state, state, 5)
    fe = task.frame_errors(task.memoryless_predict(table, prev_seen, act), nxt, prev, act)
    ok = fe["predictable"]
    err = task.error_percent(fe["geometric"][ok], fe["logic"][ok])["error"]
    if variant == "full":      # every frame shows everything: without memory is the oracle, exact here
        assert table == {} and err == 0.0
    else:                      # 36 (visible cell, action) keys; the hidden object is a guess
        assert len(table) == 36 and not fe["geometric"].any() and err > 20.0


def test_memoryless_table_takes_the_most_frequent_next_state():
    """goal_once on grid 4: east then west, the goal drawn only on frame 0; three times at (2,2), once at (2,1)."""
    n = 4
    state = np.concatenate([sequence([frame(a, goal, n) for a in ((1, 1), (1, 2), (1, 1))], [E, Wst, N])
                            for goal in ((2, 2), (2, 2), (2, 2), (2, 1))])
    seen = gw.observe(state, np.array([[True, False, False]] * 4), "goal_once", n)
    table = gw.fit_memoryless(seen, state, n)
    hidden_prev = frame((1, 2), None, n, show=(A,))                        # frame 1 as drawn: the agent alone
    assert len(table) == 1
    pred = gw.memoryless_predict(table, hidden_prev[None], np.array([Wst]))
    assert np.array_equal(pred[0], frame((1, 1), (2, 2), n))              # 3 of 4 times the goal was at (2,2)
    unseen = gw.memoryless_predict(table, hidden_prev[None], np.array([S]))
    assert not gw.invalid_frames(unseen).any()                              # an unseen pair still gets a valid guess


# ---- the harness: inputs drawn, targets full, feed-back as drawn ------------------------------------------

def test_training_batch_reads_the_drawn_frames_and_predicts_the_state():
    cfg = harness.make_config(seq_len=34 * 6, grid_size=4, variant="agent_once", batch_size=8)
    task, n = harness.check_config(cfg)
    x, y = harness._training_batch(task, cfg, n, 0, torch.device("cpu"))
    assert x.shape == y.shape == (8, 34 * 6) and (y == A).sum() == 8 * n and (x != y).any()
    assert (x == A).sum() < (y == A).sum()
    full_cfg = harness.make_config(seq_len=34 * 6, grid_size=4, batch_size=8)
    ftask, _ = harness.check_config(full_cfg)
    x_full, y_full = harness._training_batch(ftask, full_cfg, n, 0, torch.device("cpu"))
    assert y_full is None and torch.equal(x_full, y)                        # the same world, seed for seed


def test_loss_targets_default_to_the_inputs():
    torch.manual_seed(0)
    model = harness.GridWorldLM("gru", gw.VOCAB_SIZE, 8, 1)
    is_target = torch.zeros(gw.VOCAB_SIZE, dtype=torch.bool)
    is_target[list(gw.CELL_TOKENS)] = True
    seen, info = gw.sample_sequences(2, 3, seed=0, return_info=True, variant="goal_once")
    x, y = torch.from_numpy(seen), torch.from_numpy(info["state"])
    assert torch.equal(model.loss(x, is_target), model.loss(x, is_target, x))
    logits = model(x)[:, :-1]
    keep = y[:, 1:] < gw.N_CELL_KINDS
    want = F.cross_entropy(logits[keep], y[:, 1:][keep])
    assert torch.allclose(model.loss(x, is_target, y), want, atol=1e-6)


class Recorder:
    """A prefill/step 'model' that always writes AGENT and records what it is fed back."""

    def __init__(self):
        self.fed = []

    def init_state(self, b, max_len=None):
        return {}

    def prefill(self, tokens, state):
        return F.one_hot(torch.full((tokens.shape[0],), A), gw.VOCAB_SIZE).float(), state

    def step(self, tok, state):
        self.fed.append(tok.clone())
        return F.one_hot(torch.full_like(tok, A), gw.VOCAB_SIZE).float(), state


@pytest.mark.parametrize("variant, fed_hidden", [("full", A), ("agent_once", F_), ("goal_once", A)])
def test_imagination_feeds_back_what_the_variant_would_draw(variant, fed_hidden):
    task = gw.GridWorldTask(5, variant)
    ctx = torch.from_numpy(gw.sample_sequences(2, 2, seed=0, variant=variant))[:, :26]
    model = Recorder()
    cells, _, _ = gw_eval.imagine_frame(model, ctx, task, max_len=52, shown=np.array([False, True]))
    assert (cells == A).all()                                              # what it writes is scored as written
    fed = torch.stack(model.fed)                                           # (25, 2)
    assert (fed[:, 0] == fed_hidden).all() and (fed[:, 1] == A).all()     # row 1's frame shows the agent


# ---- the command line and the report ---------------------------------------------------------------------

def run_cli(*args):
    from wmbench.cli import main
    try:
        return main([str(a) for a in args])
    except SystemExit as e:      # argparse's own mistakes
        return e.code


@pytest.mark.parametrize("args, needle", [
    (["--grid", "20"], "from 4 (a 2x2 interior) to 16, got 20"),
    (["--grid", "3"], "to 16, got 3"),
    (["--variant", "goal_twice"], "unknown variant 'goal_twice'; valid choices: full, goal_once, agent_once"),
    (["--grid", "9"], "--len 1664 is not a multiple of the frame length 82; nearest valid lengths: 1640, 1722"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    assert run_cli("run", "--backbone", "gru", *args, "--runs-dir", tmp_path, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not list(tmp_path.glob("*.json"))


def test_cli_grid_error_from_the_command(tmp_path):
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "run", "--grid", "17", "--variant", "agent_once",
                        "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "--grid" in p.stderr


TINY = ["--backbone", "gru", "--steps", "2", "--d-model", "8", "--layers", "1", "--eval-sequences", "2",
        "--no-progress"]


def test_run_variant_end_to_end_writes_variant_and_grid(tmp_path, capsys):
    assert run_cli("run", "--task", "gridworld", "--variant", "agent_once", "--grid", "4", "--len", 34 * 3,
                   "--runs-dir", tmp_path, *TINY) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    assert path.name.startswith("gridworld-agent_once-g4-gru-L102-seed0-")
    assert rec["config"]["variant"] == "agent_once" and rec["config"]["grid_size"] == 4
    for name in ("error_pct", "error_pct_predictable", "oracle_error_pct", "memoryless_error_pct"):
        assert rec["metrics"][name]["unit"] == "%", name
    assert "(agent_once, grid 4)" in out and "without memory" in out
    # the same cell again is already done
    assert run_cli("run", "--variant", "agent_once", "--grid", "4", "--len", 102, "--runs-dir", tmp_path, *TINY) == 0
    assert "already done" in capsys.readouterr().out


def test_records_from_before_variants_count_as_full_grid_5(tmp_path, capsys):
    assert run_cli("run", "--len", 52, "--runs-dir", tmp_path, *TINY) == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name.startswith("gridworld-gru-L52-seed0-")                # the paper's task keeps its names
    rec = json.loads(path.read_text())
    assert (rec["config"]["grid_size"], rec["config"]["variant"]) == (5, "full")
    for k in ("grid_size", "variant"):                                     # as an older wmbench wrote it
        del rec["config"][k]
    path.write_text(json.dumps(rec))
    capsys.readouterr()
    assert run_cli("run", "--len", 52, "--variant", "full", "--grid", 5, "--runs-dir", tmp_path, *TINY) == 0
    assert "already done" in capsys.readouterr().out


def _grid_record(backbone, seed, err, **cfg):
    metrics = {"train_ms_per_step": metric(10.0, "ms"), "peak_memory": metric(2**20, "bytes", "rss_sampler"),
               "error_pct": metric(err, "%"), "error_pct_predictable": metric(err / 2, "%"),
               "oracle_error_pct": metric(1.0, "%"), "tokens_per_s": metric(1e4, "tokens/s"),
               "imagine_ms_per_token": metric(0.5, "ms"), "memoryless_error_pct_predictable": metric(45.0, "%")}
    return make_record("gridworld", {"backbone": backbone, "seq_len": 1640, "seed": seed, "batch_size": 4, **cfg},
                       metrics, extra={"status": "ok"})


def test_report_has_grid_and_variant_columns(tmp_path):
    import pandas as pd

    from wmbench.report.tables import build_report
    runs = tmp_path / "runs"
    write_record(_grid_record("gru", 0, 10.0), runs, name="old")                   # before --grid / --variant
    newer = _grid_record("gru", 0, 20.0, grid_size=5, variant="full")              # the same run, spelled out
    newer["created_at"] = "2999-01-01T00:00:00+00:00"
    write_record(newer, runs, name="new")
    for seed, err in enumerate([30.0, 34.0]):
        write_record(_grid_record("gru", seed, err, grid_size=9, variant="agent_once"), runs, name=f"a{seed}")
    build_report(runs, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "tables" / "gridworld.csv")
    rows = {(r.variant, r.grid_size): r for r in table.itertuples()}
    assert set(rows) == {("full", 5), ("agent_once", 9)}
    assert rows["full", 5].seeds == 1 and rows["full", 5].error_mean == 20.0       # counted once, the newer
    assert rows["agent_once", 9].seeds == 2 and rows["agent_once", 9].error_pred_mean == pytest.approx(16.0)
    assert rows["agent_once", 9].memoryless_pred_mean == 45.0
    md = (tmp_path / "out" / "tables" / "gridworld.md").read_text()
    assert "| grid | variant |" in md and "no memory % pred." in md
    assert "| gru | 9 | agent_once | 1640 | ? | 2 |" in md and "| gru | 5 | full | 1640 | ? | 1 |" in md   # steps unsaid
