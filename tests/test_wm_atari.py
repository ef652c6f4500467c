"""The world-model benchmark on Atari frames (`wmbench run --task atari`): the dataset cache (partial,
corrupt and concurrent writes), the train/validation split, the same batches for every backbone, the
horizon metric on a hand-made case, one tiny cell end to end, and bad input."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import numpy as np
import pytest
import torch

from wmbench.harness import atari_dataset as D
from wmbench.harness.wm_atari import (AtariWMConfig, horizon_squared_errors, make_config, training_starts,
                                      validation_starts)

KEY = D.DatasetKey("Krull", n_steps=1200, seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    D.get_dataset(KEY, cache=d, progress=False)
    return d


def _fresh_copy(cache, tmp_path):
    import shutil
    dst = tmp_path / "c"
    shutil.copytree(cache, dst)
    return dst, dst / KEY.folder_name()


def test_generated_dataset_is_the_replay_layout(cache):
    ds = D.get_dataset(KEY, cache=cache, progress=False)
    assert ds.obs.shape == (1200, 64, 64, 3) and ds.obs.dtype == np.uint8
    assert ds.action.shape == ds.reward.shape == ds.termination.shape == ds.is_last.shape == (1200,)
    # episodes are numbered in order and each ends on an is_last transition (the last may be cut off)
    for s, e in ds.episodes()[:-1]:
        assert ds.is_last[e - 1] and not ds.is_last[s:e - 1].any()
    assert ds.manifest["key"] == KEY.as_dict()


def test_same_key_same_bytes(cache, tmp_path):
    """Generation is deterministic: the cache key names the content."""
    other = D.get_dataset(KEY, cache=tmp_path, progress=False)
    ref = json.loads((cache / KEY.folder_name() / "manifest.json").read_text())
    assert other.manifest["files"] == ref["files"]


def test_corrupt_file_is_refused_and_regenerated(cache, tmp_path, capsys):
    c, folder = _fresh_copy(cache, tmp_path)
    good = json.loads((folder / "manifest.json").read_text())["files"]["obs.npy"]["sha256"]
    with open(folder / "obs.npy", "r+b") as f:
        f.seek(5000)
        f.write(b"\xff\x00\xff")
    with pytest.raises(D.DatasetError, match="corrupt: obs.npy"):
        D.load_verified(folder, KEY)
    ds = D.get_dataset(KEY, cache=c, progress=False)
    err = capsys.readouterr().err
    assert "is corrupt" in err and "generating it again" in err and len(err.strip().splitlines()) == 1
    assert ds.manifest["files"]["obs.npy"]["sha256"] == good
    assert not [p for p in c.iterdir() if p.name.startswith(".")]   # nothing left aside


@pytest.mark.parametrize("damage", ["no_manifest", "missing_file", "truncated", "bad_json", "other_key"])
def test_partial_or_mismatched_folder_is_never_used(cache, tmp_path, capsys, damage):
    c, folder = _fresh_copy(cache, tmp_path)
    if damage == "no_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "missing_file":
        (folder / "reward.npy").unlink()
    elif damage == "truncated":
        data = (folder / "action.npy").read_bytes()
        (folder / "action.npy").write_bytes(data[:len(data) // 2])
    elif damage == "bad_json":
        (folder / "manifest.json").write_text("{not json")
    else:
        m = json.loads((folder / "manifest.json").read_text())
        m["key"]["seed"] = 99
        (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(D.DatasetError):
        D.load_verified(folder, KEY)
    ds = D.get_dataset(KEY, cache=c, progress=False)
    assert len(ds) == 1200 and "generating it again" in capsys.readouterr().err
    D.load_verified(folder, KEY)            # what is there now verifies


def _make(args):
    cache, seed = args
    ds = D.get_dataset(D.DatasetKey("Boxing", n_steps=600, seed=seed), cache=cache, progress=False)
    return ds.manifest["files"]["obs.npy"]["sha256"]


def test_two_processes_generating_at_once_leave_one_whole_dataset(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        shas = pool.map(_make, [(tmp_path, 1), (tmp_path, 1)])
    assert shas[0] == shas[1]
    folders = [p for p in tmp_path.iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")      # no temp folders left
    D.load_verified(folders[0], D.DatasetKey("Boxing", n_steps=600, seed=1))


def test_split_holds_out_whole_episodes(cache):
    ds = D.get_dataset(KEY, cache=cache, progress=False)
    fake = D.AtariDataset(KEY, ds.path, ds.obs, ds.action, ds.reward, ds.termination, ds.is_last,
                          np.repeat(np.arange(12), 100).astype(np.int32), ds.manifest)
    train, val = fake.split()
    assert [e for e in val] == [(400, 500), (900, 1000)]                   # the 5th and 10th episodes
    assert not set(train) & set(val) and len(train) + len(val) == 12
    starts = D.window_starts(val, 64)
    assert all(any(s <= x and x + 64 <= e for s, e in val) for x in starts)
    single = D.AtariDataset(KEY, ds.path, ds.obs, ds.action, ds.reward, ds.termination, ds.is_last,
                            np.zeros(1200, np.int32), ds.manifest)
    with pytest.raises(D.DatasetError, match="at least 2"):
        single.split()


def test_every_backbone_gets_the_same_batches():
    eps = [(0, 300), (300, 700), (700, 1000)]
    plans = [training_starts(make_config("cpu", backbone=b, seed=4, steps=5), eps)
             for b in ("mamba2", "mamba", "gru", "transformer")]
    assert all(np.array_equal(plans[0], p) for p in plans[1:])
    other = training_starts(make_config("cpu", seed=5, steps=5), eps)
    assert not np.array_equal(plans[0], other)
    assert plans[0].shape == (5, 16)
    v = validation_starts(AtariWMConfig(val_windows=4), [(0, 100), (200, 300)])
    assert list(v) == [0, 24, 212, 236]        # indices 0, 24, 49, 73 of the 2 x 37 windows


def test_horizon_error_hand_made():
    """Two windows, horizon 3, 1-pixel frames: errors 0.1, 0.2, 0.3 in window 0 and 0, 0, 0.5 in window 1."""
    true = torch.zeros(2, 3, 1, 1, 1)
    pred = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 0.5]]).view(2, 3, 1, 1, 1)
    se = horizon_squared_errors(pred, true)
    np.testing.assert_allclose(se / 2, [0.005, 0.02, (0.09 + 0.25) / 2], rtol=1e-6)


def test_tiny_cell_end_to_end(tmp_path):
    args = [sys.executable, "-m", "wmbench.cli", "run", "--task", "atari", "--game", "Krull", "--backbone",
            "gru", "--seeds", "0", "--steps", "3", "--data-steps", "3200", "--len", "24", "--eval-sequences", "4",
            "--threads", "1", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
            "--no-progress"]
    env = {**__import__("os").environ, "WMBENCH_MALLOC": "system"}
    small = ["--d-model", "32", "--layers", "1"]
    p = subprocess.run(args + small, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    path = p.stdout.strip().splitlines()[-1].split("record: ")[1]
    rec = json.loads(open(path).read())
    m = rec["metrics"]
    assert rec["kind"] == "wm-atari" and rec["config"]["dataset_key"]["game"] == "Krull"
    assert len(m["open_loop_mse"]["per_horizon"]) == 12 and m["train_ms_per_step"]["value"] > 0
    assert 0 < m["recon_mse"]["value"] < 1 and m["peak_memory"]["value"] > 0
    assert set(m["imagine_ms_per_step"]["value"]) == {"8", "64", "256", "1024"}
    assert (tmp_path / rec["artifacts"]["world_model"]).is_file()
    # the same command again: the cell is recorded, nothing runs
    p2 = subprocess.run(args + small, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert p2.returncode == 0 and "already done" in p2.stdout


@pytest.mark.parametrize("args,needle", [
    (["--game", "NotAGame"], "unknown game"),
    (["--game", "Krull", "--backbone", "lstm"], "lstm"),
    ([], "needs --game"),
    (["--game", "Krull", "--len", "1"], "--len must be"),
    (["--game", "Krull", "--preset", "huge"], "unknown preset"),
    (["--game", "Krull", "--policy", "/nonexistent/run"], "no such run dir"),
    (["--game", "Krull", "--variant", "goal_once"], "--variant applies to --task gridworld only"),
])
def test_bad_input_one_line_exit_2(args, needle):
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "run", "--task", "atari", *args, "--check"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_len_beyond_the_episodes_is_refused(tmp_path):
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "run", "--task", "atari", "--game", "Krull",
                        "--data-steps", "600", "--len", "5000", "--steps", "1", "--data-dir", str(tmp_path),
                        "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "longer than every" in p.stderr or "at least 2" in p.stderr, p.stderr


def _fake_record(backbone, seed, train_ms, psnr, imag):
    from wmbench.core.measure import metric
    from wmbench.core.records import make_record
    cfg = {**make_config("cpu", backbone=backbone, seed=seed).to_dict(), "dataset_key": KEY.as_dict()}
    m = {"train_ms_per_step": metric(train_ms, "ms"), "peak_memory": metric(2**20 * 100, "bytes"),
         "recon_psnr": metric(psnr, "dB"), "recon_mse": metric(10 ** (-psnr / 10), "per-pixel MSE"),
         "open_loop_mse": metric(0.01, "per-pixel MSE", per_horizon=[0.005, 0.01], repeat_last_frame=[0.004, 0.006],
                                 vs_reconstruction=[0.0, 0.002]),
         "reward_mae": metric(0.5, "reward units"), "termination_error": metric(0.01, "fraction"),
         "dynamics_kl": metric(1.0, "nats per step"), "imagine_ms_per_step": metric(imag, "ms per imagined step")}
    return make_record("wm-atari", cfg, m)


def test_report_table_is_mean_and_std_over_seeds(tmp_path):
    from wmbench.core.records import write_record
    from wmbench.report.tables import build_report
    runs = tmp_path / "runs"
    for seed, (ms, psnr) in enumerate([(100.0, 20.0), (140.0, 24.0)]):
        write_record(_fake_record("gru", seed, ms, psnr, {"8": 10.0 + seed, "1024": None}), runs, f"g{seed}")
    write_record(_fake_record("mamba2", 0, 90.0, 22.0, {"8": 30.0, "1024": 31.0}), runs, "m0")
    paths, _ = build_report(runs, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"wm_atari.md", "wm_atari.csv", "wm_atari_horizon.png", "wm_atari_imagination.png"} <= names
    md = (tmp_path / "out" / "tables" / "wm_atari.md").read_text()
    gru = next(line for line in md.splitlines() if "| gru |" in line)
    # mean 120, sample std sqrt(((100-120)^2 + (140-120)^2) / 1) = 28.28; PSNR 22.00 ± 2.83; OOM at 1024 -> —
    assert "| 2 | 120 ± 28 |" in gru and "22.00 ± 2.83" in gru and "10.5 ± 0.7" in gru and gru.endswith("| — |")
    assert md.index("| mamba2 |") < md.index("| gru |")             # the paper's backbone first
    import pandas as pd
    df = pd.read_csv(tmp_path / "out" / "tables" / "wm_atari.csv")
    row = df[df.backbone == "gru"].iloc[0]
    assert row.train_ms_mean == 120 and abs(row.train_ms_std - 800 ** 0.5) < 1e-9 and row.n_seeds == 2


def test_policy_run_dir_plays_the_dataset_and_a_mismatch_is_refused(tmp_path):
    """--policy: an agent's checkpoint (a tiny gridgoal run) plays the data; its id keys the cache; a run dir
    of another game is one line and exit 2."""
    env = {**__import__("os").environ, "WMBENCH_MALLOC": "system"}
    run = tmp_path / "agent"
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "atari", "--game", "gridgoal", "--preset", "tiny",
                        "--steps", "40", "--warmup", "20", "--eval-every", "0", "--final-eval-episodes", "1",
                        "--checkpoint-every", "20", "--threads", "1", "--no-progress", "--no-estimate",
                        "--run-dir", str(run), "--runs-dir", str(tmp_path / "agent-runs")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    cell = [sys.executable, "-m", "wmbench.cli", "run", "--task", "atari", "--policy", str(run), "--steps", "2",
            "--data-steps", "400", "--len", "8", "--eval-sequences", "2", "--d-model", "16", "--layers", "1",
            "--threads", "1", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
            "--no-progress"]
    bad = subprocess.run(cell + ["--game", "Krull", "--check"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "was trained on 'gridgoal', not Krull" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    ok = subprocess.run(cell + ["--game", "gridgoal"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                        env=env)
    assert ok.returncode == 0, ok.stderr
    rec = json.loads(open(ok.stdout.strip().splitlines()[-1].split("record: ")[1]).read())
    assert rec["config"]["dataset_key"]["policy"].startswith("checkpoint:")
    assert rec["config"]["policy"] == str(run.resolve())
