"""The Atari100k report (wmbench/report/atari100k.py) on hand-made records of several games and seeds:
its numbers equal a computation written here from the raw scores and the random/human table."""
from __future__ import annotations

import csv
import math
from importlib import resources

import numpy as np
import pytest

from wmbench.report import atari100k

SCORES = {   # config -> game -> seed scores
    ("mamba2", "dfs"): {"Krull": [3000.0, 5000.0, 4000.0], "Boxing": [10.0, 30.0, 20.0], "Pong": [-20.0, -10.0, -15.0]},
    ("mamba2", "uniform"): {"Krull": [2000.0, 2500.0, 3000.0], "Boxing": [5.0, 0.0, 10.0]},
}


def _table() -> dict[str, dict[str, float]]:
    text = resources.files("wmbench").joinpath("data/atari100k_scores.csv").read_text()
    return {r["game"]: {k: float(v) for k, v in r.items() if k != "game"} for r in csv.DictReader(text.splitlines())}


def _records():
    recs = []
    for (backbone, sampler), games in SCORES.items():
        for game, scores in games.items():
            for seed, s in enumerate(scores):
                episodes = [{"step": 1000 * (i + 1), "return": s * (i + 1) / 8} for i in range(8)]
                recs.append({"kind": "atari", "config": {
                    "game": game, "backbone": backbone, "sampler": sampler, "dfs_mode": "official", "size": "XS",
                    "steps": 100_000, "seed": seed}, "metrics": {"score": {"value": s}}, "episodes": episodes,
                    "environment": {"device_name": "test"}})
    recs.append({"kind": "atari", "config": {"game": "gridgoal", "backbone": "mamba2", "sampler": "dfs", "size": "XS",
                                             "steps": 100_000, "seed": 0}, "metrics": {"score": {"value": 1.0}}})
    return recs


def _hns(game, x):
    t = _table()[game]
    return (x - t["random"]) / (t["human"] - t["random"])


def test_aggregates_equal_an_independent_computation():
    df = atari100k.runs_frame(_records())
    assert set(df.game) == {"Krull", "Boxing", "Pong"}          # gridgoal is not an Atari100k game
    agg = atari100k.aggregate_table(df, n_resamples=500).set_index("config")
    row = agg.loc["mamba2 dfs XS"]
    per_game = {g: [_hns(g, x) for x in xs] for g, xs in SCORES[("mamba2", "dfs")].items()}
    means = [np.mean(v) for v in per_game.values()]
    pooled = sorted(x for v in per_game.values() for x in v)               # 9 runs: IQM trims 2 from each end
    assert row["mean"] == pytest.approx(np.mean(means))
    assert row["median"] == pytest.approx(np.median(means))
    assert row["iqm"] == pytest.approx(np.mean(pooled[2:7]))
    assert row["optimality_gap"] == pytest.approx(1 - np.mean([np.mean(np.minimum(v, 1)) for v in per_game.values()]))
    assert row["games"] == 3 and row["runs"] == 9
    assert row["mean_lo"] <= row["mean"] <= row["mean_hi"] and row["mean_hi"] > row["mean_lo"]
    # the paper's Drama XS on the same three games, beside ours
    paper = [_hns(g, _table()[g]["DramaXS"]) for g in ("Boxing", "Krull", "Pong")]
    assert row["paper_mean"] == pytest.approx(np.mean(paper))
    # and the published rows over all 26 games: Drama XS gives the paper's mean and median
    drama = agg.loc["Drama XS (paper)"]
    assert round(drama["mean"], 3) == 1.049 and round(drama["median"], 3) == 0.270
    assert math.isnan(drama["mean_lo"])                                      # one number per game: no CI


def test_probability_of_improvement_between_configs():
    df = atari100k.runs_frame(_records())
    poi = atari100k.poi_table(df, n_resamples=300)
    assert len(poi) == 1
    r = poi.iloc[0]
    assert {r.x, r.y} == {"mamba2 dfs XS", "mamba2 uniform XS"} and r.games == 2     # Pong only has dfs
    # hand: Krull dfs {3000,5000,4000} vs uniform {2000,2500,3000}: 8 wins + 1 tie of 9 -> 8.5/9;
    # Boxing dfs {10,30,20} vs {5,0,10}: 8 wins + 1 tie -> 8.5/9
    p_dfs = 8.5 / 9
    assert r.p_x_beats_y == pytest.approx(p_dfs if r.x == "mamba2 dfs XS" else 1 - p_dfs)


def test_per_game_table_and_files(tmp_path):
    written = atari100k.write_report(_records(), tmp_path, n_resamples=200)
    names = {p.name for p in written}
    assert {"atari100k.md", "atari100k.tex", "atari100k_games.csv", "atari100k_aggregates.csv", "atari100k_poi.csv",
            "atari100k_aggregates.png", "atari100k_profile.png", "atari100k_curves.png"} <= names
    import pandas as pd
    games = pd.read_csv(tmp_path / "tables" / "atari100k_games.csv")
    k = games[(games.config == "mamba2 dfs XS") & (games.game == "Krull")].iloc[0]
    assert k.n == 3 and k.score == pytest.approx(4000.0) and k["std"] == pytest.approx(1000.0)
    assert k.DramaXS == _table()["Krull"]["DramaXS"]
    md = (tmp_path / "tables" / "atari100k.md").read_text()
    assert "| mamba2 dfs XS | Krull | 3 | 4000.0 ± 1000.0 |" in md
    tex = (tmp_path / "tables" / "atari100k.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2 and "Drama XS (paper)" in tex
    for p in written:
        assert p.stat().st_size > 0


def test_no_atari_records_writes_nothing(tmp_path):
    assert atari100k.write_report([r for r in _records() if r["config"]["game"] == "gridgoal"], tmp_path) == []
