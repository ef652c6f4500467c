"""Aggregate statistics of normalised scores over games, with stratified-bootstrap confidence intervals.

The definitions follow Agarwal et al. (2021, "Deep RL at the edge of the statistical precipice"), the
convention of Atari100k papers since 2022. Scores come as one array per game (the runs, or seeds, of
that game; games may have different numbers of runs):

- mean:   the mean over games of each game's mean over runs;
- median: the median over games of each game's mean over runs;
- IQM:    the interquartile mean of all runs of all games pooled (the 25% trimmed mean);
- optimality gap: gamma - mean over games of each game's mean of min(score, gamma), gamma = 1
  (how far below human level, with no credit beyond it);
- probability of improvement P(X > Y): per game, the chance that a run of X beats a run of Y (ties
  count half, the Mann-Whitney U statistic over n·m), averaged over the games both have;
- performance profile: for each threshold tau, the fraction of runs above tau (games weighted equally).

Confidence intervals resample runs within each game (one stratum per game) with
`scipy.stats.bootstrap`, percentile method. rliable, the usual library, is not used: it fails to import
under pandas 3 (issue 10). A game with a single run is a fixed value in every resample; with a single run
in every game there is nothing to resample and the interval is undefined (NaN).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import scipy.stats

Games = Sequence[np.ndarray]          # one 1-d array of run scores per game


def _games(per_game) -> list[np.ndarray]:
    out = [np.asarray(g, dtype=float).ravel() for g in per_game]
    if not out or any(g.size == 0 for g in out):
        raise ValueError("every game needs at least one run score")
    if any(not np.all(np.isfinite(g)) for g in out):
        raise ValueError("scores must be finite")
    return out


def mean(per_game: Games) -> float:
    return float(np.mean([g.mean() for g in _games(per_game)]))


def median(per_game: Games) -> float:
    return float(np.median([g.mean() for g in _games(per_game)]))


def iqm(per_game: Games) -> float:
    return float(scipy.stats.trim_mean(np.concatenate(_games(per_game)), 0.25))


def optimality_gap(per_game: Games, gamma: float = 1.0) -> float:
    return float(gamma - np.mean([np.minimum(g, gamma).mean() for g in _games(per_game)]))


AGGREGATES: dict[str, Callable[[Games], float]] = {
    "median": median, "iqm": iqm, "mean": mean, "optimality_gap": optimality_gap}


def performance_profile(per_game: Games, taus: np.ndarray) -> np.ndarray:
    """Fraction of runs with a score above each tau (each game's fraction, averaged over games)."""
    games = _games(per_game)
    taus = np.asarray(taus, dtype=float)
    return np.mean([(g[None, :] > taus[:, None]).mean(axis=1) for g in games], axis=0)


def probability_of_improvement(x: Games, y: Games) -> float:
    """P(X > Y) over paired games: `x[i]` and `y[i]` are the runs of the same game."""
    xs, ys = _games(x), _games(y)
    if len(xs) != len(ys):
        raise ValueError("x and y must have the same games")
    per = [((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()) for a, b in zip(xs, ys)]
    return float(np.mean(per))


def stratified_bootstrap_ci(per_game: Games, statistic: Callable[[list[np.ndarray]], float | np.ndarray],
                            n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """(low, high) of `statistic(list of per-game arrays)`, resampling runs within each game."""
    games = _games(per_game)
    vary = [i for i, g in enumerate(games) if g.size >= 2]
    point = np.asarray(statistic(games), dtype=float)
    if not vary:
        nan = np.full(point.shape, np.nan)
        return (float(nan), float(nan)) if point.ndim == 0 else (nan, nan)

    def stat(*resampled):
        gs = list(games)
        for i, g in zip(vary, resampled):
            gs[i] = g
        return statistic(gs)

    with warnings.catch_warnings():      # a stratum whose runs are all equal is fine: no spread to show
        warnings.simplefilter("ignore", category=scipy.stats.DegenerateDataWarning)
        res = scipy.stats.bootstrap(tuple(games[i] for i in vary), stat, vectorized=False, paired=False,
                                    n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                                    random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    if point.ndim == 0:
        return float(lo), float(hi)
    return np.asarray(lo), np.asarray(hi)


def poi_ci(x: Games, y: Games, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Stratified-bootstrap CI of P(X > Y): X's and Y's runs are resampled independently within each game."""
    xs, ys = _games(x), _games(y)
    n = len(xs)
    return stratified_bootstrap_ci(xs + ys, lambda gs: probability_of_improvement(gs[:n], gs[n:]),
                                   n_resamples, confidence, seed)
