"""`wmbench report`: tables and plots from the run records under results/runs/.

Grid world -> results/tables/gridworld.{md,csv} laid out like the paper's Table 2 (method x length:
train ms/step, memory, error mean ± std over seeds) with the paper's values in adjacent columns, and
plots under results/plots/. Bench records -> results/tables/bench.md. Atari records -> atari.md (per run)
and atari100k.{md,tex,csv} (aggregates with bootstrap CIs; report/atari100k.py).
Peer-bench records (`wmbench bench --peers`) -> results/tables/peers.md.
The report reads nothing but the records (and the paper's numbers shipped in wmbench/data).
"""
from __future__ import annotations

import io
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from wmbench.core.registry import BUILTIN_BACKBONES
from wmbench.core.records import atomic_write_bytes, atomic_write_text, load_records, scientific_config

ORDER = list(BUILTIN_BACKBONES)
GIB8 = 8 * 2**30  # the paper reports memory as % of an 8 GB GPU


def paper_table2() -> pd.DataFrame:
    with resources.files("wmbench").joinpath("data/gridworld_table2.csv").open() as f:
        df = pd.read_csv(f)
    return df.rename(columns={"method": "backbone"})


def _value(rec: dict, name: str) -> float:
    m = rec.get("metrics", {}).get(name)
    return float(m["value"]) if isinstance(m, dict) and m.get("value") is not None else math.nan


GRID_DEFAULTS = {"grid_size": 5, "variant": "full"}    # what records from before --grid / --variant ran
VARIANT_ORDER = ["full", "goal_once", "agent_once"]


def _grid_defaults(rec: dict) -> dict:
    """The record with GRID_DEFAULTS filled into a copy of its config (the record itself is untouched)."""
    return {**rec, "config": {**GRID_DEFAULTS, **rec["config"]}}


def _newest_per_run(records: list[dict]) -> list[dict]:
    """Each run once after GRID_DEFAULTS: an old record and a newer one that spells out grid 5 / full are
    the same run (`dedupe` has already merged exact repeats); the newer is kept."""
    newest: dict[str, dict] = {}
    for rec in sorted(records, key=lambda r: (str(r.get("created_at", "")), str(r.get("_path", "")))):
        newest[record_key(rec) if {"kind", "environment"} <= set(rec) else str(id(rec))] = rec
    return list(newest.values())


def gridworld_frame(records: list[dict]) -> pd.DataFrame:
    """One row per run record (per seed)."""
    rows = []
    for r in _newest_per_run([_grid_defaults(r) for r in records]):
        c = r["config"]
        rows.append({
            "backbone": c.get("backbone"), "seq_len": int(c.get("seq_len")), "seed": c.get("seed"),
            "grid_size": int(c["grid_size"]), "variant": str(c["variant"]),
            "steps": int(c["steps"]) if c.get("steps") is not None else -1,   # -1: a record that did not say
            "status": r.get("status", "ok"), "device_name": r["environment"].get("device_name"),
            "batch_size": c.get("batch_size"),
            "train_ms": _value(r, "train_ms_per_step"), "peak_mib": _value(r, "peak_memory") / 2**20,
            "memory_method": r.get("metrics", {}).get("peak_memory", {}).get("method"),
            "error": _value(r, "error_pct"), "error_predictable": _value(r, "error_pct_predictable"),
            "floor": _value(r, "oracle_error_pct"), "tokens_per_s": _value(r, "tokens_per_s"),
            "imagine_ms_per_token": _value(r, "imagine_ms_per_token"),
            "teacher_forced_error": _value(r, "teacher_forced_error_pct"),
            "memoryless_predictable": _value(r, "memoryless_error_pct_predictable"),
        })
    return pd.DataFrame(rows)


def _std(x: pd.Series) -> float:
    x = x.dropna()
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def gridworld_table(df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate over seeds per (variant, grid, backbone, length, training steps, hardware); join the
    paper's numbers (on the paper's task only: grid 5, full). Runs of different lengths of training
    are never averaged together as if they were seeds."""
    rows = []
    keys = ["variant", "grid_size", "backbone", "seq_len", "steps", "device_name"]
    for (v, gs, b, n, st, hw), g in df.fillna({"device_name": "unknown"}).groupby(keys):
        ok = g[g.status == "ok"]
        oom = len(ok) == 0 and (g.status == "OOM").any()
        rows.append({
            "backbone": b, "grid_size": gs, "variant": v, "seq_len": n, "steps": st, "hardware": hw, "seeds": len(ok),
            "train_ms": np.nan if oom else ok.train_ms.mean(),
            "memory_mib": np.nan if oom else ok.peak_mib.mean(),
            "memory_pct_8GiB": np.nan if oom else 100 * ok.peak_mib.mean() * 2**20 / GIB8,
            "error_mean": ok.error.mean() if len(ok) else np.nan, "error_std": _std(ok.error),
            "error_pred_mean": ok.error_predictable.mean() if len(ok) else np.nan,
            "error_pred_std": _std(ok.error_predictable),
            "floor": ok.floor.mean() if len(ok) else np.nan,
            "memoryless_pred_mean": ok.memoryless_predictable.mean() if len(ok) else np.nan,
            "imagine_ms_per_token": ok.imagine_ms_per_token.mean() if len(ok) else np.nan,
            "tokens_per_s": ok.tokens_per_s.mean() if len(ok) else np.nan,
            "status": "OOM" if oom else "ok",
        })
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    paper = paper_table2().rename(columns={
        "train_ms_per_step": "paper_train_ms", "memory_pct_of_8GiB": "paper_memory_pct_8GB",
        "error_pct_mean": "paper_error_mean", "error_pct_std": "paper_error_std"})
    paper = paper.assign(**GRID_DEFAULTS)
    out = out.merge(paper, on=["backbone", "seq_len", *GRID_DEFAULTS], how="left")
    out["_o"] = out.backbone.map({b: i for i, b in enumerate(ORDER)}).fillna(len(ORDER))
    out["_v"] = out.variant.map({v: i for i, v in enumerate(VARIANT_ORDER)}).fillna(len(VARIANT_ORDER))
    order = ["_v", "variant", "grid_size", "seq_len", "_o", "backbone", "steps", "hardware"]
    return out.sort_values(order).drop(columns=["_o", "_v"]).reset_index(drop=True)


def _pm(mean, std, fmt="{:.1f}") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return (fmt + " ± " + fmt).format(mean, std)


def _num(v, fmt="{:.0f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, str):
        return v
    return fmt.format(v)


def gridworld_markdown(table: pd.DataFrame, hardware: list[str]) -> str:
    lines = [
        "# Grid world (paper Table 2)", "",
        f"Ours: {', '.join(hardware) or 'unknown hardware'}. Paper: a laptop GPU (memory as % of 8 GB). "
        "Error (%) = mean(E_g, E_l) over imagined frames, mean ± sample std over seeds; "
        "'floor' is the perfect-dynamics oracle on the same frames (re-spawns are unpredictable); "
        "'pred.' is the error on predictable frames only. 'grid' is the side l_g; 'variant' says what frames "
        "show (full: everything, the paper's task; goal_once / agent_once: that object only where it appears, "
        "and the error is on the true state frames, hidden object included; README). 'no memory' is the "
        "reference that sees only the previous frame and action, on predictable frames: a backbone's distance "
        "below it is what its memory is worth. The paper columns apply to grid 5, full only.", "",
        "| backbone | grid | variant | L | steps | seeds | train ms/step | paper | memory MiB (% of 8 GiB) | paper % | error % "
        "| paper error % | floor % | error % pred. | no memory % pred. | imagine ms/token |"
        + (" hardware |" if len(hardware) > 1 else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if len(hardware) > 1 else ""),
    ]
    for r in table.itertuples():
        oom = r.status == "OOM"
        mem = "OOM" if oom else f"{r.memory_mib:,.0f} ({r.memory_pct_8GiB:.0f}%)"
        paper_mem = r.paper_memory_pct_8GB if isinstance(r.paper_memory_pct_8GB, str) else _num(r.paper_memory_pct_8GB)
        lines.append(
            f"| {r.backbone} | {r.grid_size} | {r.variant} | {r.seq_len} | {r.steps if r.steps >= 0 else '?'} | {r.seeds} "
            f"| {'OOM' if oom else _num(r.train_ms)} | {_num(r.paper_train_ms)} "
            f"| {mem} | {paper_mem} | {_pm(r.error_mean, r.error_std)} | {_pm(r.paper_error_mean, r.paper_error_std)} "
            f"| {_num(r.floor, '{:.1f}')} | {_pm(r.error_pred_mean, r.error_pred_std)} "
            f"| {_num(r.memoryless_pred_mean, '{:.1f}')} | {_num(r.imagine_ms_per_token, '{:.2f}')} |" + (f" {r.hardware} |" if len(hardware) > 1 else ""))
    lines += ["", "Regenerate: `wmbench report` (reads every record under results/runs/)."]
    return "\n".join(lines) + "\n"


def _savefig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def gridworld_plots(df: pd.DataFrame, table: pd.DataFrame, plots_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    ok = df[df.status == "ok"].copy()
    # the automatic batch keeps tokens per step fixed across lengths, so time per *sequence* is what
    # grows as O(n) (recurrent) or O(n^2) (attention)
    ok["ms_per_seq"] = ok.train_ms / ok.batch_size.astype(float)
    hue_order = [b for b in ORDER if b in set(ok.backbone)] + sorted(set(ok.backbone) - set(ORDER))
    paths = []

    # training time vs length, log-log, with O(n) and O(n^2) guides through the shortest mamba2 point
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sns.lineplot(data=ok, x="seq_len", y="ms_per_seq", hue="backbone", hue_order=hue_order, marker="o",
                 errorbar="sd", ax=ax)
    if len(ok):
        n0 = ok.seq_len.min()
        t0 = ok[ok.seq_len == n0].ms_per_seq.median()
        ns = np.array(sorted(ok.seq_len.unique()), dtype=float)
        ax.plot(ns, t0 * ns / n0, "k--", lw=1, label="O(n)")
        ax.plot(ns, t0 * (ns / n0) ** 2, "k:", lw=1, label="O(n²)")
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="training ms per sequence (step time / batch)",
           title="Grid world: training time vs length")
    ax.legend()
    paths.append(_savefig(fig, plots_dir / "gridworld_time_vs_length.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    sns.lineplot(data=ok, x="seq_len", y="peak_mib", hue="backbone", hue_order=hue_order, marker="o",
                 errorbar="sd", ax=ax)
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="peak memory (MiB)",
           title="Grid world: peak training memory vs length")
    paths.append(_savefig(fig, plots_dir / "gridworld_memory_vs_length.png"))
    plt.close(fig)

    # the error plot shows one task, the paper's (grid 5, full) where there is one: grids and variants
    # have floors of their own
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    cells = sorted(set(zip(ok.variant, ok.grid_size)), key=lambda c: (rank.get(c[0], len(rank)), c[0], c[1] != 5, c[1]))
    task = cells[0] if cells else ("full", 5)
    ok = ok[(ok.variant == task[0]) & (ok.grid_size == task[1])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.barplot(data=ok, x="backbone", y="error", hue="seq_len", order=hue_order, errorbar="sd", ax=ax)
    floor = ok.floor.mean() if len(ok) else math.nan
    if not math.isnan(floor):
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"oracle floor {floor:.1f}%")
    ax.set(xlabel="backbone", ylabel="error (%)", title="Grid world: imagination error by backbone"
           + ("" if task == ("full", 5) else f" ({task[0]}, grid {task[1]})"))
    ax.legend(title="length")
    paths.append(_savefig(fig, plots_dir / "gridworld_error_by_backbone.png"))
    plt.close(fig)
    return paths


def bench_markdown(records: list[dict]) -> str:
    lines = ["# Backbone benchmark (`wmbench bench`)", ""]
    for rec in records:
        from wmbench.report.bench import format_table
        c = rec["config"]
        lines += [f"## {rec['created_at']} — batch {c['batch_size']}, d_model {c['d_model']}, {c['n_layers']} layers, "
                  f"{c['dtype']}, {rec['environment']['device_name']}", "", "```", format_table(rec), "```", ""]
    return "\n".join(lines)


def record_key(rec: dict) -> str:
    """What makes two records the same run: kind, scientific configuration (the one `wmbench run` skips a
    seed by: no threads, paths or automatic precision) and hardware."""
    import json
    cfg = scientific_config(rec["config"])
    return json.dumps([rec["kind"], cfg, rec["environment"].get("device_name")], sort_keys=True, default=str)


def dedupe(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Each (config, seed, hardware) once: the newest record; notes name the older copies left out."""
    newest: dict[str, dict] = {}
    notes = []
    for rec in sorted(records, key=lambda r: (str(r.get("created_at", "")), r["_path"])):
        key = record_key(rec)
        if key in newest:
            notes.append(f"note: {Path(newest[key]['_path']).name} repeats the config and seed of "
                         f"{Path(rec['_path']).name}; kept the newer")
        newest[key] = rec
    return sorted(newest.values(), key=lambda r: r["_path"]), notes


def _usable(records: list[dict], render, skipped: list) -> list[dict]:
    """The records `render` can turn into a table on their own; the others go to `skipped`."""
    ok = []
    for rec in records:
        try:
            render([rec])
        except Exception as e:  # noqa: BLE001 - a schema-valid record holding a bad value
            skipped.append((rec["_path"], f"unusable value ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"))
            continue
        ok.append(rec)
    return ok


def build_report(runs_dir: str = "results/runs", out_dir: str = "results", machine: str | None = None,
                 strict: bool = False) -> tuple[list[Path], list[str]]:
    """Write the tables and plots; returns (paths written, warning and note lines for the user).

    A corrupt or unusable record is skipped with one warning line naming it (strict: UserError instead).
    Records repeating a (config, seed) on the same hardware count once (the newest). Rows never mix
    machines: tables group by hardware, and `machine` keeps only records whose CPU/GPU name contains it."""
    import logging

    from wmbench.core.errors import UserError
    from wmbench.core.paths import remove_orphans, writable_dir
    from wmbench.report.agent_bench import agent_bench_markdown, agent_bench_plot, latest_cells
    # matplotlib's font fallback notes ("findfont: ... not found") are noise here; our messages are ours
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    from wmbench.report.atari import atari_markdown, learning_curves
    from wmbench.report.atari100k import write_report as atari100k_report
    from wmbench.report.peers import peers_markdown
    from wmbench.report.wm_atari import wm_atari_csv, wm_atari_markdown, wm_atari_plots
    if not Path(runs_dir).is_dir():
        raise FileNotFoundError(f"no run records under {runs_dir} (no such folder)")
    out = writable_dir(out_dir, "--out")
    for folder in ("tables", "plots"):      # temp files of a report killed mid-write (a live one is kept)
        remove_orphans(out / folder)
    skipped: list = []
    records = load_records(runs_dir, skipped=skipped)
    if machine:
        records = [r for r in records if machine.lower() in str(r["environment"].get("device_name", "")).lower()]
    by_kind = {k: [r for r in records if r["kind"] == k]
               for k in ("gridworld", "bench", "atari", "agent-bench", "peer-bench", "wm-atari")}
    by_kind["gridworld"] = _usable(by_kind["gridworld"], lambda rs: gridworld_table(gridworld_frame(rs)), skipped)
    by_kind["bench"] = _usable(by_kind["bench"], bench_markdown, skipped)
    by_kind["atari"] = _usable(by_kind["atari"], atari_markdown, skipped)
    by_kind["agent-bench"] = _usable(by_kind["agent-bench"], agent_bench_markdown, skipped)
    by_kind["peer-bench"] = _usable(by_kind["peer-bench"], peers_markdown, skipped)
    by_kind["wm-atari"] = _usable(by_kind["wm-atari"], wm_atari_markdown, skipped)
    messages = [f"warning: skipping {p}: {why}" for p, why in skipped]
    if strict and skipped:
        raise UserError(f"{len(skipped)} unusable record(s), first {skipped[0][0]}: {skipped[0][1]} (--strict)")
    notes = []
    for k in ("gridworld", "atari"):
        by_kind[k], n = dedupe(by_kind[k])
        notes += n
    written: list[Path] = []
    grid = by_kind["gridworld"]
    if grid:
        df = gridworld_frame(grid)
        table = gridworld_table(df)
        hardware = sorted(set(df.device_name.dropna()))
        written.append(atomic_write_text(out / "tables" / "gridworld.csv", table.to_csv(index=False)))
        written.append(atomic_write_text(out / "tables" / "gridworld.md", gridworld_markdown(table, hardware)))
        written += gridworld_plots(df, table, out / "plots")
    if by_kind["bench"]:
        written.append(atomic_write_text(out / "tables" / "bench.md", bench_markdown(by_kind["bench"])))
    if by_kind["agent-bench"]:
        written.append(atomic_write_text(out / "tables" / "agent_bench.md", agent_bench_markdown(by_kind["agent-bench"])))
        if latest_cells(by_kind["agent-bench"]):   # every cell failed: the table says why, no plot
            written.append(agent_bench_plot(by_kind["agent-bench"], out / "plots" / "agent_bench_phases.png"))
    if by_kind["peer-bench"]:
        written.append(atomic_write_text(out / "tables" / "peers.md", peers_markdown(by_kind["peer-bench"])))
    if by_kind["atari"]:
        written.append(atomic_write_text(out / "tables" / "atari.md", atari_markdown(by_kind["atari"])))
        written += learning_curves(by_kind["atari"], out / "plots")
        written += atari100k_report(by_kind["atari"], out)
    if by_kind["wm-atari"]:
        written.append(atomic_write_text(out / "tables" / "wm_atari.md", wm_atari_markdown(by_kind["wm-atari"])))
        written.append(atomic_write_text(out / "tables" / "wm_atari.csv", wm_atari_csv(by_kind["wm-atari"])))
        written += wm_atari_plots(by_kind["wm-atari"], out / "plots")
    if not written:
        raise FileNotFoundError(f"no usable run records under {runs_dir}"
                                + (f" for machine {machine!r}" if machine else "")
                                + "; run `wmbench run`, `bench` or `atari` first")
    return written, messages + notes
