"""`wmbench bench --agent` records: a table of the update's phases per backbone, and a stacked bar plot."""
from __future__ import annotations

from pathlib import Path

PHASE_NAMES = {"wm_update": "world-model update", "imagine_context": "imagination: context",
               "imagine_rollout": "imagination: rollout", "ac_update": "actor-critic update"}


def _v(cell: dict, k: str) -> float:
    return float(cell[k]["value"])


def _step_kind(cell: dict) -> str:
    if "compiled" not in cell:   # records from before --compile existed ran eagerly
        return "eager"
    return "compiled" if cell["compiled"]["value"] else "eager"


def _x_fp32(cell: dict) -> str:
    return f"{_v(cell, 'x_fp32_bound'):.2f}×" if "x_fp32_bound" in cell else "-"


def agent_bench_markdown(records: list[dict]) -> str:
    lines = ["# Agent benchmark (`wmbench bench --agent`)", "",
             "Milliseconds per update, split by phase (medians), acting ms per env step (batch 1), peak "
             "memory of the cell, FLOPs of one update and the fraction of the dense matmul rate of the cell's "
             "precision (fp32, or bf16 for a bf16 cell) measured on the same machine and threads. "
             "× fp32 bound: the update's time over its FLOPs at the fp32 (sgemm) rate, the same yardstick "
             "for every precision (records before it existed: -). Records made before `--precision` ran "
             "fp32. Newest record first.", ""]
    for rec in sorted(records, key=lambda r: str(r["created_at"]), reverse=True):
        c, env = rec["config"], rec["environment"]
        lines += [f"## size {c['size']}, {env['device_name']}, {env['torch_threads']} threads — {rec['created_at']}", "",
                  "| backbone | " + " | ".join(PHASE_NAMES.values()) + " | update | acting ms/step | peak MiB "
                  "| GFLOP/update | % of matmul | × fp32 bound | rollout step | precision |",
                  "|---|" + "---:|" * (len(PHASE_NAMES) + 6) + "---|---|"]
        for b, cell in rec["metrics"]["cells"].items():
            if "error" in cell:
                lines.append(f"| {b} | {cell['error']} |" + " |" * (len(PHASE_NAMES) + 7))
                continue
            phases = " | ".join(f"{_v(cell, k):,.0f}" for k in PHASE_NAMES)
            lines.append(f"| {b} | {phases} | {_v(cell, 'update'):,.0f} | {_v(cell, 'acting'):.1f} "
                         f"| {_v(cell, 'peak_memory') / 2**20:,.0f} | {_v(cell, 'update_flops') / 1e9:,.1f} "
                         f"| {100 * _v(cell, 'fraction_of_matmul_peak'):.0f}% | {_x_fp32(cell)} | {_step_kind(cell)} "
                         f"| {cell.get('precision', {}).get('value', 'fp32')} |")
        lines.append("")
    return "\n".join(lines)


def latest_cells(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """The bars the plot draws: per panel (size, machine, threads), per bar (backbone, precision, rollout
    step), the cell of the newest record that has it. Older records stay in the table; a bar shows what
    the code measured last, not a pile of every run."""
    panels: dict[tuple, dict[str, tuple[str, dict]]] = {}
    for rec in records:
        c, env = rec["config"], rec["environment"]
        panel = (str(c["size"]), str(env.get("device_name", "?")), int(env.get("torch_threads", 0)))
        for b, cell in rec["metrics"]["cells"].items():
            if "error" in cell:
                continue
            bar = f"{b}\n{cell.get('precision', {}).get('value', 'fp32')}, {_step_kind(cell)}"
            seen = panels.setdefault(panel, {}).get(bar)
            if seen is None or str(rec["created_at"]) >= seen[0]:
                panels[panel][bar] = (str(rec["created_at"]), cell)
    # the record's date under each bar: a bar from an older record measured older code
    return {k: {f"{bar}\n{when[:16].replace('T', ' ')}": cell for bar, (when, cell) in sorted(v.items())}
            for k, v in sorted(panels.items())}


def agent_bench_plot(records: list[dict], path: Path) -> Path:
    """Stacked bars of time per update by phase: one panel per size and machine (each on its own scale:
    XS takes seconds, the cpu size milliseconds), one bar per backbone and precision, newest record."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wmbench.core.records import atomic_write_bytes
    panels = latest_cells(records)
    if not panels:
        raise ValueError("no agent-bench cell without an error to plot")
    widths = [max(2.5, 1.3 * len(bars)) for bars in panels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 1.0, 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, ((size, machine, threads), bars) in zip(axes[0], panels.items()):
        cells = list(bars.values())
        seconds = max(_v(c, "update") for c in cells) >= 2000.0
        scale, unit = (1e-3, "s") if seconds else (1.0, "ms")
        x = list(range(len(bars)))
        bottom = [0.0] * len(bars)
        for k, name in PHASE_NAMES.items():
            h = [scale * _v(c, k) for c in cells]
            ax.bar(x, h, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, h)]
        ax.set_xticks(x, list(bars), fontsize=8)
        ax.set(ylabel=f"{unit} per update", title=f"size {size}: {machine}, {threads} threads")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Drama agent update by phase (wmbench bench --agent, newest record per bar)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
