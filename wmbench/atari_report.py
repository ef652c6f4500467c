"""Markdown tables of `wmbench atari` run records (called by wmbench/report.py).

One table per game; one row per run (seed), then a mean row per configuration when it has several
seeds. Columns: backbone, sampler, size, seed, env steps, final evaluation score (mean ± std over its
episodes), human-normalised score (Atari) or agent / random (gridgoal), mean of the last 5 training
episodes (the paper's running average), env steps/s and the hardware it ran on.
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


def _hardware(rec: dict) -> str:
    env = rec.get("environment", {})
    name = env.get("device_name") or env.get("cpu_model") or "?"
    if env.get("device", "cpu").startswith("cpu"):
        name += f" ({env.get('torch_threads', '?')} threads)"
    return name


def atari_markdown(records: list[dict]) -> str:
    """Markdown for all `kind == "atari"` records (others are ignored)."""
    recs = [r for r in records if r.get("kind") == "atari"]
    lines = ["# Drama agent runs (`wmbench atari`)", ""]
    if not recs:
        return "\n".join(lines + ["No Atari run records.", ""])
    lines += ["Final eval: mean return of the final model over N evaluation episodes (± std). "
              "Last-5: mean of the last 5 training episodes (the paper's running average). "
              "HNS: (score − random) / (human − random). For gridgoal: agent / random policy "
              "(random and optimal returns are exact expectations).", ""]
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
        ref = "agent / random" if grid else "HNS"
        lines.append(f"| backbone | sampler | size | seed | env steps | final eval (N) | {ref} | last-5 train | "
                     "env steps/s | hardware |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        groups: dict[tuple, list[dict]] = collections.defaultdict(list)
        for r in rows:
            c = r["config"]
            key = (c.get("backbone"), c.get("sampler"), c.get("size"), c.get("steps"))
            groups[key].append(r)
            refv = _m(r, "final_eval_over_random") if grid else _m(r, "final_eval_human_normalized")
            lines.append(
                f"| {c.get('backbone')} | {c.get('sampler')} | {c.get('size')} | {c.get('seed')} | {c.get('steps')} | "
                f"{_f(_m(r, 'final_eval_return'))} ± {_f(_m(r, 'final_eval_return', 'std'))} "
                f"({_m(r, 'final_eval_return', 'n')}) | {_f(refv, 3)} | {_f(_m(r, 'train_return_last5'))} | "
                f"{_f(_m(r, 'env_steps_per_s'))} | {_hardware(r)} |")
        for key, rs in groups.items():
            if len(rs) < 2:
                continue
            mean = lambda name: float(np.mean([_m(r, name) for r in rs if _m(r, name) is not None]))  # noqa: E731
            refn = "final_eval_over_random" if grid else "final_eval_human_normalized"
            lines.append(f"| **{key[0]}** | **{key[1]}** | **{key[2]}** | mean of {len(rs)} | {key[3]} | "
                         f"**{_f(mean('final_eval_return'))}** | **{_f(mean(refn), 3)}** | "
                         f"{_f(mean('train_return_last5'))} | {_f(mean('env_steps_per_s'))} | |")
        lines.append("")
    return "\n".join(lines)
