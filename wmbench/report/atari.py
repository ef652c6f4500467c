"""Markdown tables of `wmbench atari` run records (called by wmbench/report/tables.py).

One table per game; one row per run (seed), then a mean row per configuration when it has several
seeds. The headline column is the paper's score: the mean of the last 5 training episodes (older
records call it `train_return_last5`), with its human-normalised value (Atari) or its ratio to the
random policy (gridgoal). Then the final evaluation (mean ± std over its full games, greedy unless the
run said otherwise), env steps/s and the hardware it ran on.
"""
from __future__ import annotations

import collections
import math

import numpy as np


def _m(rec: dict, name: str, key: str = "value"):
    v = rec.get("metrics", {}).get(name, {})
    return v.get(key) if isinstance(v, dict) else None


def _f(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def _mean(values: list):
    """The mean of the values that were measured: None (not measured) and NaN / inf are left out, so one
    seed without a value neither blanks its configuration's mean nor counts as 0. None if none is left."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _hardware(rec: dict) -> str:
    env = rec.get("environment", {})
    name = env.get("device_name") or env.get("cpu_model") or "?"
    if env.get("device", "cpu").startswith("cpu"):
        name += f" ({env.get('torch_threads', '?')} threads)"
    return name


def _score(rec: dict):
    v = _m(rec, "score")
    return v if v is not None else _m(rec, "train_return_last5")


def _score_ref(rec: dict, grid: bool):
    v = _m(rec, "score_over_random" if grid else "score_human_normalized")
    if v is None and _score(rec) is not None:   # records made before the score had its own metric
        if grid and _m(rec, "random_return"):
            v = _score(rec) / _m(rec, "random_return")
        elif not grid:
            from wmbench.tasks.atari import human_normalized
            v = human_normalized(rec["config"]["game"], _score(rec))
    return v


def _sampler(c: dict) -> str:
    """dfs (the official code's, the default), dfs-literal (section 2.4 as printed), or uniform."""
    if c.get("sampler") != "dfs":
        return str(c.get("sampler"))
    return "dfs" if c.get("dfs_mode") == "official" else "dfs-literal"


def _eval_ref(rec: dict, grid: bool):
    return _m(rec, "final_eval_over_random" if grid else "final_eval_human_normalized")


def atari_markdown(records: list[dict]) -> str:
    """Markdown for all `kind == "atari"` records (others are ignored)."""
    recs = [r for r in records if r.get("kind") == "atari"]
    lines = ["# Drama agent runs (`wmbench atari`)", ""]
    if not recs:
        return "\n".join(lines + ["No Atari run records.", ""])
    lines += ["Score: the mean return of the last 5 training episodes, as the paper reports it (a 5-episode "
              "running average read at the end of training; the paper averages it over 5 seeds per game). "
              "HNS: (x − random) / (human − random). For gridgoal: x / random policy (random and optimal "
              "returns are exact expectations). Final eval: the final model over N full games (± std). "
              "Faithful –: a record made before `--faithful` existed (then: literal DFS, acting on the "
              "posterior of the current frame).", ""]
    by_game: dict[str, list[dict]] = collections.defaultdict(list)
    for r in recs:
        by_game[r.get("config", {}).get("game", "?")].append(r)
    for game in sorted(by_game, key=lambda g: (g == "gridgoal", g)):
        rows = sorted(by_game[game], key=lambda r: tuple(str(r["config"].get(k)) for k in
                                                          ("backbone", "sampler", "size", "steps", "seed")))
        grid = game == "gridgoal"
        lines.append(f"## {game}")
        lines.append("")
        if grid:
            rnd, opt = _m(rows[0], "random_return"), _m(rows[0], "optimal_return")
            lines += [f"Random policy {_f(rnd)}, optimal policy {_f(opt)} (per episode).", ""]
        ref = "/ random" if grid else "HNS"
        lines.append(f"| backbone | sampler | size | faithful | seed | env steps | **score** | score {ref} | "
                     f"final eval (N) | eval {ref} | env steps/s | hardware |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        groups: dict[tuple, list[dict]] = collections.defaultdict(list)
        for r in rows:
            c = r["config"]
            key = (c.get("backbone"), _sampler(c), c.get("size"), c.get("faithful", "–"), c.get("steps"),
                   r["environment"].get("device_name"))    # a mean never mixes machines
            groups[key].append(r)
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {c.get('seed')} | {key[4]} | "
                f"**{_f(_score(r))}** | {_f(_score_ref(r, grid), 3)} | "
                f"{_f(_m(r, 'final_eval_return'))} ± {_f(_m(r, 'final_eval_return', 'std'))} "
                f"({_m(r, 'final_eval_return', 'n')}) | {_f(_eval_ref(r, grid), 3)} | "
                f"{_f(_m(r, 'env_steps_per_s'))} | {_hardware(r)} |")
        for key, rs in groups.items():
            if len(rs) < 2:
                continue
            mean = lambda f, digits=3: _f(_mean([f(r) for r in rs]), digits)  # noqa: E731
            lines.append(f"| **{key[0]}** | **{key[1]}** | **{key[2]}** | **{key[3]}** | mean of {len(rs)} | "
                         f"{key[4]} | **{mean(_score, 2)}** | **{mean(lambda r: _score_ref(r, grid))}** | "
                         f"{mean(lambda r: _m(r, 'final_eval_return'), 2)} | "
                         f"{mean(lambda r: _eval_ref(r, grid))} | | {key[5]} |")
        lines.append("")
    return "\n".join(lines)


def learning_curves(records: list[dict], plots_dir) -> list:
    """One PNG per Atari game (`atari_curves_<game>.png`): each seed's training-episode returns against
    env steps (dots, and a 5-episode running mean: the paper's score read along the run), the in-training
    evaluations (open markers), the final evaluation (a star at the last step), and the random and human
    scores. Runs differing in more than the seed get separate colours, seeds separate line styles. Only
    runs with at least 5 training episodes (the score's window) are drawn. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path
    from wmbench.report.tables import _savefig
    from wmbench.tasks.atari import reference_scores

    refs = reference_scores()
    by_game: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        if r.get("kind") == "atari" and len(r.get("episodes") or []) >= 5 and r["config"].get("game") != "gridgoal":
            by_game[r["config"]["game"]].append(r)
    paths = []
    for game, recs in sorted(by_game.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        configs = sorted({_curve_label(r) for r in recs})
        colours = dict(zip(configs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
        markers, styles = "os^vD<>", ["-", "--", "-.", ":"]
        for i, r in enumerate(sorted(recs, key=lambda r: (_curve_label(r), r["config"].get("seed")))):
            label, seed = _curve_label(r), r["config"].get("seed")
            steps = np.array([e["step"] for e in r["episodes"]], float)
            rets = np.array([e["return"] for e in r["episodes"]], float)
            c = colours[label]
            ax.plot(steps, rets, markers[i % len(markers)], color=c, alpha=0.35, ms=4)
            run5 = [rets[max(0, k - 4):k + 1].mean() for k in range(len(rets))]
            ax.plot(steps, run5, styles[i % len(styles)], color=c, lw=1.5, label=f"{label} seed {seed}: last-5 mean")
            ev = r.get("eval_history") or []
            if ev:
                ax.plot([e["step"] for e in ev], [e["mean"] for e in ev], markers[i % len(markers)],
                        color=c, mfc="none", ms=9, mew=1.5, label=f"{label} seed {seed}: evaluation")
            final = _m(r, "final_eval_return")
            if final is not None:
                ax.plot([r["config"].get("steps")], [final], "*", color=c, ms=13, mec="k", mew=0.6,
                        label=f"{label} seed {seed}: final evaluation ({_m(r, 'final_eval_return', 'n')} games)")
        if game in refs:
            rnd, human = refs[game]
            ax.axhline(rnd, color="k", ls="--", lw=1, label=f"random policy ({rnd:g})")
            ax.axhline(human, color="k", ls=":", lw=1, label=f"human ({human:g})")
        ax.set_xlabel("env steps (agent steps of 4 frames)")
        ax.set_ylabel("episode return")
        ax.set_title(f"{game}: training episodes (dots), their 5-episode running mean, evaluations")
        ax.legend(fontsize=7, loc="best")
        paths.append(_savefig(fig, Path(plots_dir) / f"atari_curves_{game}.png"))
        plt.close(fig)
    return paths


def _curve_label(r: dict) -> str:
    c = r["config"]
    return f"{c.get('backbone')} {_sampler(c)} {c.get('size')}"
