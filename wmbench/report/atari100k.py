"""The Atari100k report from `wmbench atari` records: per-game scores beside the papers', and the
aggregates the field reports (human-normalised mean, median, IQM, optimality gap with 95% stratified
bootstrap CIs, probability of improvement), as md, csv and LaTeX; plus the aggregate intervals, a
performance profile and learning curves (mean and CI over seeds). The statistics are in stats.py.

A configuration is what a run changes besides the game and the seed: backbone, sampler, size and env
steps. Its aggregates cover the games it has records for ("games" column); the Drama XS paper's numbers
on the same games sit beside them, since an aggregate over 4 games is not comparable to one over 26.
"""
from __future__ import annotations

import collections
import csv
import functools
import io
import math
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from wmbench.report import stats

PAPER_COLUMNS = {"DramaXS": "Drama XS", "DreamerV3": "DreamerV3", "STORM": "STORM", "IRIS": "IRIS"}
AGG_NAMES = {"median": "Median", "iqm": "IQM", "mean": "Mean", "optimality_gap": "Optimality gap"}
N_RESAMPLES = 2000


@functools.lru_cache(maxsize=1)
def paper_scores() -> pd.DataFrame:
    """The per-game table shipped in wmbench/data (game, random, human, and one column per method); read
    once per process (callers only read it)."""
    with resources.files("wmbench").joinpath("data/atari100k_scores.csv").open() as f:
        return pd.read_csv(f).set_index("game")


def hns(scores, random: float, human: float):
    return (np.asarray(scores, dtype=float) - random) / (human - random)


def config_label(c: dict) -> str:
    from wmbench.report.atari import _sampler
    steps = c.get("steps")
    tail = "" if steps in (None, 100_000) else f" {int(steps) // 1000}k"
    return f"{c.get('backbone')} {_sampler(c)} {c.get('size')}{tail}"


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per Atari run (gridgoal records are not Atari100k): config, game, seed, score, HNS."""
    from wmbench.report.atari import _score
    from wmbench.tasks.atari import canonical_game, human_normalized
    rows = []
    for r in records:
        c = r.get("config", {})
        if r.get("kind") != "atari" or str(c.get("game", "")).lower() == "gridgoal":
            continue
        s = _score(r)
        if s is None or not math.isfinite(float(s)):
            continue
        game = canonical_game(c["game"])
        rows.append({"config": config_label(c), "game": game, "seed": c.get("seed"), "score": float(s),
                     "hns": human_normalized(game, s)})
    return pd.DataFrame(rows, columns=["config", "game", "seed", "score", "hns"])


def per_game_table(df: pd.DataFrame) -> pd.DataFrame:
    ref = paper_scores()
    g = df.groupby(["config", "game"])
    out = g.agg(n=("score", "size"), score=("score", "mean"), std=("score", lambda x: x.std(ddof=1) if len(x) > 1 else 0.0),
                hns=("hns", "mean")).reset_index()
    for col in PAPER_COLUMNS:
        out[col] = [float(ref.loc[game, col]) for game in out.game]
    out["random"] = [float(ref.loc[game, "random"]) for game in out.game]
    out["human"] = [float(ref.loc[game, "human"]) for game in out.game]
    return out


def _per_game(df: pd.DataFrame) -> tuple[list[str], list[np.ndarray]]:
    games = sorted(df.game.unique())
    return games, [df[df.game == g].hns.to_numpy() for g in games]


def _paper_hns(column: str, games: list[str]) -> list[np.ndarray]:
    ref = paper_scores()
    return [np.array([hns(ref.loc[g, column], ref.loc[g, "random"], ref.loc[g, "human"])]) for g in games]


def aggregate_rows(name: str, per_game: list[np.ndarray], games: list[str], source: str,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    row = {"config": name, "source": source, "games": len(games), "runs": int(sum(g.size for g in per_game))}
    for key, fn in stats.AGGREGATES.items():
        lo, hi = stats.stratified_bootstrap_ci(per_game, fn, n_resamples=n_resamples, seed=seed)
        row[key], row[f"{key}_lo"], row[f"{key}_hi"] = fn(per_game), lo, hi
    return row


def aggregate_table(df: pd.DataFrame, n_resamples: int = N_RESAMPLES) -> pd.DataFrame:
    """Our configs (with the Drama XS paper's aggregates on the same games), then the published methods
    over all 26 games (per-game means only: no CI), then per-seed baselines where they are packaged."""
    rows = []
    all_games = sorted(paper_scores().index)
    for config, sub in df.groupby("config", sort=True):
        games, per_game = _per_game(sub)
        row = aggregate_rows(config, per_game, games, "wmbench records", n_resamples)
        paper = _paper_hns("DramaXS", games)
        for key, fn in stats.AGGREGATES.items():
            row[f"paper_{key}"] = fn(paper)
        rows.append(row)
    for col, label in PAPER_COLUMNS.items():
        rows.append(aggregate_rows(f"{label} (paper)", _paper_hns(col, all_games), all_games,
                                   "per-game means, wmbench/data/atari100k_scores.csv", n_resamples))
    for method, per_game in _baseline_runs().items():
        rows.append(aggregate_rows(f"{method} (released runs)", per_game, all_games,
                                   "per-run scores, wmbench/data/baselines", n_resamples))
    return pd.DataFrame(rows)


def _baseline_runs() -> dict[str, list[np.ndarray]]:
    """Per-run HNS of the released baselines (wmbench/data/baselines), when every game is there."""
    try:
        from wmbench.report.baselines import baseline_scores, list_baselines
    except ImportError:
        return {}
    ref, out = paper_scores(), {}
    for method in list_baselines():
        b = baseline_scores(method)
        games = sorted(ref.index)
        if set(b.game) >= set(games):
            out[method] = [hns(b[b.game == g].score.to_numpy(), ref.loc[g, "random"], ref.loc[g, "human"])
                           for g in games]
    return out


def poi_table(df: pd.DataFrame, n_resamples: int = N_RESAMPLES) -> pd.DataFrame:
    """P(X > Y) for every ordered pair of configs, over the games both have."""
    rows = []
    configs = sorted(df.config.unique())
    for i, x in enumerate(configs):
        for y in configs[i + 1:]:
            games = sorted(set(df[df.config == x].game) & set(df[df.config == y].game))
            if not games:
                continue
            xs = [df[(df.config == x) & (df.game == g)].hns.to_numpy() for g in games]
            ys = [df[(df.config == y) & (df.game == g)].hns.to_numpy() for g in games]
            lo, hi = stats.poi_ci(xs, ys, n_resamples=n_resamples)
            rows.append({"x": x, "y": y, "games": len(games), "p_x_beats_y": stats.probability_of_improvement(xs, ys),
                         "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["x", "y", "games", "p_x_beats_y", "lo", "hi"])


# ---------------------------------------------------------------------------------------- text

def _f(v, d: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


def _ci(row, key: str) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    return _f(row[key]) + ("" if lo is None or not math.isfinite(lo) else f" [{_f(lo)}, {_f(hi)}]")


def markdown(games: pd.DataFrame, agg: pd.DataFrame, poi: pd.DataFrame) -> str:
    lines = ["# Atari100k (`wmbench atari`)", "",
             "Score: the mean return of the last 5 training episodes (the paper's), mean ± std over seeds. HNS: "
             "(score − random) / (human − random). Aggregates are over human-normalised scores with 95% "
             "stratified-bootstrap CIs (runs resampled within each game, percentile method, "
             f"{N_RESAMPLES} resamples); a configuration with one seed per game has no CI. The paper "
             "columns are per-game means (no seeds released), so their aggregates have no CI either.", "",
             "## Aggregates", "",
             "| configuration | games | runs | Median | IQM | Mean | Optimality gap | Drama XS paper, same games: median / IQM / mean |",
             "|---|---:|---:|---|---|---|---|---|"]
    for _, r in agg.iterrows():
        same = " / ".join(_f(r.get(f"paper_{k}")) for k in ("median", "iqm", "mean")) \
            if isinstance(r.get("paper_mean"), float) and math.isfinite(r.get("paper_mean")) else ""
        lines.append(f"| {r.config} | {r.games} | {r.runs} | {_ci(r, 'median')} | {_ci(r, 'iqm')} | "
                     f"{_ci(r, 'mean')} | {_ci(r, 'optimality_gap')} | {same} |")
    if len(poi):
        lines += ["", "## Probability of improvement", "",
                  "P(X > Y): the chance that a run of X scores above a run of Y on the same game, averaged over "
                  "the games both have (ties count half).", "", "| X | Y | games | P(X > Y) [95% CI] |", "|---|---|---:|---|"]
        for _, r in poi.iterrows():
            lines.append(f"| {r.x} | {r.y} | {r.games} | {_f(r.p_x_beats_y)} [{_f(r.lo)}, {_f(r.hi)}] |")
    lines += ["", "## Per game", "",
              "| configuration | game | seeds | score | HNS | " + " | ".join(PAPER_COLUMNS.values()) + " | random | human |",
              "|---|---|---:|---|---:|" + "---:|" * (len(PAPER_COLUMNS) + 2)]
    for _, r in games.iterrows():
        lines.append(f"| {r.config} | {r.game} | {r.n} | {_f(r.score, 1)} ± {_f(r['std'], 1)} | {_f(r.hns)} | "
                     + " | ".join(_f(r[c], 0) for c in PAPER_COLUMNS) + f" | {_f(r.random, 1)} | {_f(r.human, 1)} |")
    return "\n".join(lines) + "\n"


def _tex(s) -> str:
    return str(s).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&") \
        .replace("#", r"\#")


def latex(games: pd.DataFrame, agg: pd.DataFrame) -> str:
    """Two tabulars (booktabs): aggregates with CIs, then per-game scores beside the papers'."""
    def ci(r, k):
        lo, hi = r.get(f"{k}_lo"), r.get(f"{k}_hi")
        return _f(r[k]) + ("" if lo is None or not math.isfinite(lo) else f" [{_f(lo)}, {_f(hi)}]")
    out = [r"\begin{tabular}{lrrllll}", r"\toprule",
           r"Configuration & Games & Runs & Median & IQM & Mean & Optimality gap \\", r"\midrule"]
    for _, r in agg.iterrows():
        out.append(f"{_tex(r.config)} & {r.games} & {r.runs} & " + " & ".join(ci(r, k) for k in AGG_NAMES) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", "", r"\begin{tabular}{llrrr" + "r" * len(PAPER_COLUMNS) + "}",
            r"\toprule", "Configuration & Game & Seeds & Score & HNS & " + " & ".join(PAPER_COLUMNS.values()) + r" \\",
            r"\midrule"]
    for _, r in games.iterrows():
        out.append(f"{_tex(r.config)} & {_tex(r.game)} & {r.n} & {_f(r.score, 1)} $\\pm$ {_f(r['std'], 1)} & "
                   f"{_f(r.hns)} & " + " & ".join(_f(r[c], 0) for c in PAPER_COLUMNS) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def csv_text(table: pd.DataFrame) -> str:
    buf = io.StringIO()
    table.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def interval_plot(agg: pd.DataFrame, path: Path) -> Path:
    """One panel per aggregate: each configuration's point estimate and 95% CI (the rliable layout)."""
    from wmbench.report.tables import _savefig
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(13, 0.45 * len(agg) + 1.4), sharey=True)
    y = np.arange(len(agg))
    for ax, (key, title) in zip(axes, AGG_NAMES.items()):
        for i, (_, r) in enumerate(agg.iterrows()):
            lo, hi = r[f"{key}_lo"], r[f"{key}_hi"]
            ours = r.source == "wmbench records"
            if math.isfinite(lo):
                ax.plot([lo, hi], [i, i], lw=6, alpha=0.45, color="C0" if ours else "C7", solid_capstyle="butt")
            ax.plot([r[key]], [i], "|", ms=14, mew=2, color="k")
        ax.set_title(title)
        ax.set_xlabel("human-normalised score")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [f"{r.config} ({r.games} games)" for _, r in agg.iterrows()], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Atari100k aggregates: point estimate (|) and 95% stratified-bootstrap CI (bar)", fontsize=10)
    fig.tight_layout()
    out = _savefig(fig, path)
    plt.close(fig)
    return out


def profile_plot(df: pd.DataFrame, path: Path, n_resamples: int = N_RESAMPLES) -> Path:
    """Score distribution: the fraction of runs above each human-normalised threshold, with a 95% band,
    one line per configuration, and the published methods' per-game means for reference."""
    from wmbench.report.tables import _savefig
    plt = _plt()
    taus = np.linspace(0.0, 8.0, 161)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (config, sub) in enumerate(df.groupby("config", sort=True)):
        games, per_game = _per_game(sub)
        prof = stats.performance_profile(per_game, taus)
        lo, hi = stats.stratified_bootstrap_ci(per_game, lambda gs: stats.performance_profile(gs, taus),
                                               n_resamples=n_resamples)
        ax.plot(taus, prof, color=f"C{i}", lw=2, label=f"{config} ({len(games)} games, {sum(map(len, per_game))} runs)")
        if np.all(np.isfinite(lo)):
            ax.fill_between(taus, lo, hi, color=f"C{i}", alpha=0.2)
    all_games = sorted(paper_scores().index)
    for (col, label), colour in zip(PAPER_COLUMNS.items(), ("k", "C8", "C9", "C5")):
        ax.plot(taus, stats.performance_profile(_paper_hns(col, all_games), taus), ls="--", lw=1,
                color=colour, label=f"{label} (paper, 26 game means)")
    ax.set_xlabel("human-normalised score τ")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.set_title("Atari100k performance profile")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out = _savefig(fig, path)
    plt.close(fig)
    return out


def _curve(rec: dict, grid: np.ndarray) -> np.ndarray:
    """The 5-episode running mean of training returns, read at `grid` env steps (NaN before the 5th
    episode or after the run's last one)."""
    eps = rec.get("episodes") or []
    if len(eps) < 5:
        return np.full(grid.shape, np.nan)
    steps = np.array([e["step"] for e in eps], float)
    rets = np.array([e["return"] for e in eps], float)
    run5 = np.convolve(rets, np.ones(5) / 5, mode="valid")
    s = steps[4:]
    y = np.interp(grid, s, run5)
    y[(grid < s[0]) | (grid > s[-1])] = np.nan
    return y


def curves_plot(records: list[dict], path: Path, n_resamples: int = 1000, seed: int = 0) -> Path | None:
    """Learning curves per game (the paper's Fig. 10 layout): each configuration's mean over seeds of the
    5-episode running mean against env steps, with a 95% bootstrap band over seeds."""
    from wmbench.report.tables import _savefig
    from wmbench.tasks.atari import canonical_game
    by = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        c = r.get("config", {})
        if r.get("kind") == "atari" and str(c.get("game", "")).lower() != "gridgoal" and len(r.get("episodes") or []) >= 5:
            by[canonical_game(c["game"])][config_label(c)].append(r)
    if not by:
        return None
    plt = _plt()
    games = sorted(by)
    cols = min(4, len(games))
    rows = math.ceil(len(games) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    ref = paper_scores()
    rng = np.random.default_rng(seed)
    configs = sorted({k for g in by.values() for k in g})
    for ax, game in zip(axes.flat, games):
        for config, recs in sorted(by[game].items()):
            end = max(r["episodes"][-1]["step"] for r in recs)
            grid = np.linspace(0, end, 100)
            ys = np.stack([_curve(r, grid) for r in recs])          # (seeds, points)
            with warnings.catch_warnings():          # all-NaN columns (before the 5th episode) are expected
                warnings.simplefilter("ignore", RuntimeWarning)
                m = np.nanmean(ys, axis=0)
                idx = rng.integers(0, len(recs), size=(n_resamples, len(recs)))
                boot = np.nanmean(ys[idx], axis=1)                   # (resamples, points)
                lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0)
            i = configs.index(config)
            ax.plot(grid, m, color=f"C{i}", lw=1.5, label=f"{config} ({len(recs)} seeds)")
            if len(recs) > 1:
                ax.fill_between(grid, lo, hi, color=f"C{i}", alpha=0.2)
        ax.axhline(ref.loc[game, "random"], color="k", ls="--", lw=0.8, label="random")
        ax.axhline(ref.loc[game, "DramaXS"], color="k", ls=":", lw=0.8, label="Drama XS (paper)")
        ax.set_title(game, fontsize=9)
        ax.set_xlabel("env steps", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(games):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("Training return (5-episode running mean): mean over seeds, 95% bootstrap band", fontsize=10)
    fig.tight_layout()
    out = _savefig(fig, path)
    plt.close(fig)
    return out


def write_report(records: list[dict], out: Path, n_resamples: int = N_RESAMPLES) -> list[Path]:
    """tables/atari100k.{md,tex}, atari100k_games.csv, atari100k_aggregates.csv, atari100k_poi.csv and
    plots/atari100k_{aggregates,profile,curves}.png; nothing when there is no Atari100k record."""
    from wmbench.core.records import atomic_write_text
    df = runs_frame(records)
    if df.empty:
        return []
    games, agg, poi = per_game_table(df), aggregate_table(df, n_resamples), poi_table(df, n_resamples)
    t = Path(out) / "tables"
    written = [atomic_write_text(t / "atari100k.md", markdown(games, agg, poi)),
               atomic_write_text(t / "atari100k.tex", latex(games, agg)),
               atomic_write_text(t / "atari100k_games.csv", csv_text(games)),
               atomic_write_text(t / "atari100k_aggregates.csv", csv_text(agg)),
               atomic_write_text(t / "atari100k_poi.csv", csv_text(poi))]
    p = Path(out) / "plots"
    written += [interval_plot(agg, p / "atari100k_aggregates.png"), profile_plot(df, p / "atari100k_profile.png", n_resamples)]
    c = curves_plot(records, p / "atari100k_curves.png")
    return written + ([c] if c else [])
