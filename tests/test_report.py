"""`wmbench report` on synthetic records: Table-2 layout, paper columns, plots, OOM, corrupt files."""
import subprocess
import sys

import pandas as pd
import pytest

from wmbench.core.measure import metric
from wmbench.core.records import make_record, write_record
from wmbench.report.tables import build_report


def _grid_record(backbone, seq_len, seed, ms, err, status="ok"):
    metrics = {} if status == "OOM" else {
        "train_ms_per_step": metric(ms, "ms"), "peak_memory": metric(100 * 2**20 * seq_len / 208, "bytes", "rss_sampler"),
        "error_pct": metric(err, "%"), "error_pct_predictable": metric(err / 2, "%"),
        "oracle_error_pct": metric(5.0, "%"), "tokens_per_s": metric(1e5, "tokens/s"),
        "imagine_ms_per_token": metric(0.5, "ms"), "teacher_forced_error_pct": metric(err, "%"),
    }
    cfg = {"backbone": backbone, "seq_len": seq_len, "seed": seed, "task": "gridworld", "batch_size": 2}
    return make_record("gridworld", cfg, metrics, extra={"status": status})


@pytest.fixture
def runs(tmp_path):
    d = tmp_path / "runs"
    for seed, err in enumerate([10.0, 12.0, 14.0]):
        write_record(_grid_record("mamba2", 208, seed, 20.0, err), d, name=f"m2-208-{seed}")
        write_record(_grid_record("mamba2", 1664, seed, 160.0, err), d, name=f"m2-1664-{seed}")
        write_record(_grid_record("gru", 208, seed, 30.0, 20.0), d, name=f"gru-208-{seed}")
    write_record(_grid_record("transformer", 1664, 0, 0, 0, status="OOM"), d, name="tf-oom")
    (d / "corrupt.json").write_text("{not json")
    return d


def test_report_tables_and_plots(runs, tmp_path):
    out = tmp_path / "results"
    paths, messages = build_report(runs, out)
    assert [m for m in messages if "corrupt.json" in m and m.startswith("warning: skipping")]
    names = {p.name for p in paths}
    assert {"gridworld.csv", "gridworld.md", "gridworld_time_vs_length.png", "gridworld_memory_vs_length.png",
            "gridworld_error_by_backbone.png"} <= names
    table = pd.read_csv(out / "tables" / "gridworld.csv")
    m2 = table[(table.backbone == "mamba2") & (table.seq_len == 208)].iloc[0]
    assert m2.seeds == 3 and m2.error_mean == pytest.approx(12.0) and m2.error_std == pytest.approx(2.0)
    assert m2.paper_train_ms == 25 and m2.paper_error_mean == pytest.approx(15.6)   # the paper's column
    tf = table[table.backbone == "transformer"].iloc[0]
    assert tf.status == "OOM"
    md = (out / "tables" / "gridworld.md").read_text()
    assert "12.0 ± 2.0" in md and "OOM" in md and "15.6 ± 2.6" in md
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_runs_of_different_training_lengths_are_not_averaged_as_seeds(tmp_path):
    d = tmp_path / "runs"
    for steps, err in ((500, 100.0), (2000, 0.0)):
        rec = _grid_record("mamba2", 208, 0, 20.0, err)
        rec["config"]["steps"] = steps
        write_record(rec, d, name=f"m2-{steps}")
    build_report(d, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "tables" / "gridworld.csv")
    assert sorted(zip(table.steps, table.seeds, table.error_mean)) == [(500, 1, 100.0), (2000, 1, 0.0)]
    assert "| mamba2 | 5 | full | 208 | 2000 | 1 |" in (tmp_path / "out" / "tables" / "gridworld.md").read_text()


def test_report_cli_empty_dir_is_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "report", "--runs-dir", str(tmp_path / "none"),
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no run records" in p.stderr


def _atari_record(seed: int, returns: list, evals=(), final=None) -> dict:
    episodes = [{"step": 1000 * (i + 1), "return": float(r), "length": 900} for i, r in enumerate(returns)]
    metrics = {"score": metric(float(sum(returns[-5:]) / len(returns[-5:])), "return")}
    if final is not None:
        metrics["final_eval_return"] = metric(final, "return", n=16, std=1.0)
    rec = make_record("atari", {"game": "Krull", "backbone": "mamba2", "sampler": "dfs", "dfs_mode": "official",
                                "size": "cpu", "steps": 1000 * len(returns), "seed": seed}, metrics)
    rec["episodes"] = episodes
    rec["eval_history"] = [{"step": s, "mean": m} for s, m in evals]
    return rec


def test_learning_curves_drawn_from_records(tmp_path):
    """One PNG per game from the records' episodes; a run with fewer than 5 episodes is not drawn."""
    import matplotlib.image
    from wmbench.report.atari import learning_curves
    recs = [_atari_record(0, [1500, 2000, 2500, 3000, 3500, 4000], [(5000, 3100.0)], final=3900.0),
            _atari_record(1, [1600, 1900, 2600, 2900, 3600], final=3500.0)]
    paths = learning_curves(recs, tmp_path)
    assert [p.name for p in paths] == ["atari_curves_Krull.png"]
    img = matplotlib.image.imread(paths[0])
    assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0   # a real picture, not blank
    assert learning_curves([_atari_record(2, [1, 2, 3, 4])], tmp_path / "few") == []
