"""The main command's automatic choices: --size auto and --device auto, the thread count chosen by
measurement, the cheap update estimate, and the banner that says what was chosen and why."""
import random

import numpy as np
import pytest
import torch

from wmbench.agent.config import check_config, resolve_config
from wmbench.agent.estimate import FRACTIONS, estimate_update, extrapolate, fmt_duration, updates_left
from wmbench.world_model import get_preset


def test_size_and_device_auto_on_a_cpu_host():
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: auto picks XS")
    cfg = check_config(resolve_config(None, game="Krull"))
    assert (cfg.size, cfg.device) == ("cpu", "cpu")
    assert "no CUDA device" in cfg.auto_choices["size"] and "--size XS" in cfg.auto_choices["size"]
    assert cfg.run_dir.endswith("Krull-mamba2-dfs-cpu-seed0")
    assert check_config(cfg) == cfg          # resolving twice changes nothing


def test_explicit_size_and_device_are_kept():
    cfg = check_config(resolve_config(None, game="Krull", size="xs", device="cpu", compile=False, precision="fp32"))
    assert (cfg.size, cfg.device, cfg.auto_choices) == ("XS", "cpu", {})


def test_bad_size_names_auto_among_the_choices():
    with pytest.raises(ValueError, match="valid choices: auto, XS, S, tiny, cpu"):
        check_config(resolve_config(None, game="Krull", size="XXL"))


def test_extrapolation_hand_cases():
    f1, f2 = FRACTIONS[:2]
    # t = 0.1 + 2.0 f: exact at f = 1
    assert extrapolate(0.1 + 2.0 * f1, 0.1 + 2.0 * f2) == pytest.approx(2.1)
    # a smaller second time (noise) is read as a flat line, never as a negative slope
    assert extrapolate(0.5, 0.4) == pytest.approx(0.5)


def test_prediction_from_the_fractions_timed():
    from wmbench.agent.estimate import _predict
    assert _predict({0.25: 0.3, 1.0: 0.9}, 1.0) == 0.9                       # measured: taken as is
    assert _predict({0.0625: 0.1, 0.125: 0.2, 0.25: 0.35}, 1.0) == pytest.approx(0.35 + 1.2 * 0.75)  # last two
    assert _predict({0.0625: 0.1}, 0.125) == pytest.approx(0.2)              # one point: proportional


def test_a_cheap_update_is_timed_at_the_full_batch():
    """At the tiny size the whole ladder fits the budget: the estimate is the full batch's measured time,
    not an extrapolation of two small fractions' noise."""
    est = estimate_update(get_preset("tiny"), (64, 64, 3), 6, torch.device("cpu"), threads=1)
    assert list(est.by_fraction) == list(FRACTIONS)
    assert est.s_per_update == est.by_fraction[1.0]


def test_updates_left_counts_the_warmup_and_train_ratio():
    cfg = resolve_config(None, game="Krull", steps=100_000, warmup_steps=1032, train_ratio=1.0)
    assert updates_left(cfg, 0) == 100_000 - 1032
    assert updates_left(cfg, 50_000) == 50_000
    assert updates_left(cfg, 100_000) == 0
    assert fmt_duration(3 * 86400 + 5 * 3600) == "3d05h" and fmt_duration(3725) == "1h02m" and fmt_duration(65) == "1m05s"


def test_estimate_chooses_threads_and_leaves_no_trace():
    """The measurement runs on throw-away models: the global RNGs and the thread setting are as before."""
    mcfg = get_preset("tiny")
    threads = torch.get_num_threads()
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    est = estimate_update(mcfg, (64, 64, 3), 6, torch.device("cpu"), threads=None)
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    assert before == after
    assert torch.get_num_threads() == threads
    assert est.threads in est.by_threads and 1 in est.by_threads
    assert est.by_threads[est.threads] == min(est.by_threads.values())
    assert 0 < est.by_threads[est.threads] <= est.s_per_update < float("inf")


def test_main_command_banner_and_thread_choice_reach_the_record(tmp_path, capsys):
    """The banner comes first; without --threads the measured count runs and the record says so."""
    from wmbench.cli import main
    rc = main(["atari", "--game", "gridgoal", "--preset", "tiny", "--steps", "110", "--warmup", "100",
               "--eval-every", "0", "--final-eval-episodes", "1", "--no-progress",
               "--run-dir", str(tmp_path / "run"), "--runs-dir", str(tmp_path / "rec")])
    assert rc == 0
    err = capsys.readouterr().err
    assert err.startswith("wmbench atari: gridgoal, mamba2, dfs (official), size tiny")
    assert "threads -> " in err and "estimate: " in err
    assert "precision auto -> " in err and "compile auto -> off: imagination batch" in err   # tiny: not measured
    import json
    rec = json.loads(next((tmp_path / "rec").glob("*.json")).read_text())
    chosen = int(rec["config"]["auto_choices"]["threads"].split(",")[0])
    assert rec["environment"]["torch_threads"] == chosen
