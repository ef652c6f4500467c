"""Aggregate statistics (wmbench/report/stats.py) on hand-computed cases, against an independent
stratified bootstrap written here with numpy, and against the paper's published aggregates."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmbench.report import stats
from wmbench.report.atari100k import hns, paper_scores

GAMES = [np.array([0.0, 1.0]), np.array([2.0, 2.0]), np.array([4.0, 6.0])]


def test_hand_computed_aggregates():
    # per-game means 0.5, 2, 5
    assert stats.mean(GAMES) == pytest.approx(2.5)
    assert stats.median(GAMES) == pytest.approx(2.0)
    # pooled 0 1 2 2 4 6: a quarter of 6 runs is 1.5, scipy's trim cuts 1 from each end -> mean(1, 2, 2, 4)
    assert stats.iqm(GAMES) == pytest.approx(2.25)
    # min(x, 1): [0, 1], [1, 1], [1, 1] -> per-game 0.5, 1, 1 -> 1 - 2.5/3
    assert stats.optimality_gap(GAMES) == pytest.approx(1 - 2.5 / 3)


def test_iqm_is_the_middle_half_when_it_divides():
    runs = np.arange(8.0)                       # 2 games x 4 runs; middle half of 0..7 is 2..5
    assert stats.iqm([runs[:4], runs[4:]]) == pytest.approx(3.5)


def test_probability_of_improvement_hand_case():
    # pairs (1,1) tie -> 0.5, (1,0), (2,1), (2,0) wins -> 3.5 / 4
    assert stats.probability_of_improvement([np.array([1.0, 2.0])], [np.array([1.0, 0.0])]) == pytest.approx(0.875)
    # averaged over games: second game X always loses
    assert stats.probability_of_improvement([np.array([1.0, 2.0]), np.array([0.0])],
                                            [np.array([1.0, 0.0]), np.array([5.0])]) == pytest.approx(0.4375)


def test_performance_profile_hand_case():
    prof = stats.performance_profile(GAMES, np.array([-1.0, 0.5, 2.0, 10.0]))
    # tau 0.5: game1 1/2, game2 1, game3 1 -> 2.5/3; tau 2: 0, 0, 1 -> 1/3 (strictly above)
    assert prof == pytest.approx([1.0, 2.5 / 3, 1 / 3, 0.0])


def _numpy_stratified_bootstrap(games, fn, n, seed):
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        vals.append(fn([g[rng.integers(0, g.size, g.size)] for g in games]))
    return np.percentile(vals, [2.5, 97.5])


@pytest.mark.parametrize("name", list(stats.AGGREGATES))
def test_bootstrap_ci_matches_an_independent_bootstrap(name):
    rng = np.random.default_rng(1)
    games = [rng.gamma(2.0, 0.4, size=5) for _ in range(8)]
    fn = stats.AGGREGATES[name]
    lo, hi = stats.stratified_bootstrap_ci(games, fn, n_resamples=4000, seed=3)
    ref_lo, ref_hi = _numpy_stratified_bootstrap(games, fn, 4000, seed=7)
    width = ref_hi - ref_lo
    assert lo <= fn(games) <= hi
    assert abs(lo - ref_lo) < 0.1 * width and abs(hi - ref_hi) < 0.1 * width


def test_one_run_per_game_has_no_ci_and_single_run_games_are_fixed():
    lo, hi = stats.stratified_bootstrap_ci([np.array([1.0]), np.array([2.0])], stats.mean)
    assert math.isnan(lo) and math.isnan(hi)
    # game 2 has one run: it contributes 3.0 to every resample, so the CI is game 1's spread / 2 + 1.5
    lo, hi = stats.stratified_bootstrap_ci([np.array([0.0, 1.0]), np.array([3.0])], stats.mean, n_resamples=2000)
    assert 1.5 - 1e-9 <= lo <= hi <= 2.0 + 1e-9


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        stats.mean([])
    with pytest.raises(ValueError):
        stats.mean([np.array([])])
    with pytest.raises(ValueError):
        stats.iqm([np.array([np.nan, 1.0])])


def test_the_papers_drama_xs_aggregates():
    """The per-game scores of Drama XS (wmbench/data) give the paper's mean 1.049 and median 0.270."""
    ref = paper_scores()
    games = [np.array([hns(ref.loc[g, "DramaXS"], ref.loc[g, "random"], ref.loc[g, "human"])]) for g in ref.index]
    assert len(games) == 26
    assert round(stats.mean(games), 3) == 1.049
    assert round(stats.median(games), 3) == 0.270


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 20, allow_nan=False), min_size=1, max_size=6), min_size=1, max_size=6))
def test_aggregate_properties(raw):
    games = [np.array(g) for g in raw]
    pooled = np.concatenate(games)
    assert pooled.min() - 1e-9 <= stats.iqm(games) <= pooled.max() + 1e-9
    assert stats.mean(games) == pytest.approx(np.mean([g.mean() for g in games]))
    assert stats.optimality_gap(games) >= -1e-12          # min(x, 1) <= 1, so never below zero
    assert stats.optimality_gap(games) == pytest.approx(1 - np.mean([np.minimum(g, 1).mean() for g in games]))
    # P(X > X) is one half for any scores
    assert stats.probability_of_improvement(games, games) == pytest.approx(0.5)
