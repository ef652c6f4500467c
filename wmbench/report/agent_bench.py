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
             "fp32.", ""]
    for rec in records:
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


def agent_bench_plot(records: list[dict], path: Path) -> Path:
    """Stacked bars: ms per update by phase, one bar per (record, backbone)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wmbench.core.records import atomic_write_bytes
    labels, stacks = [], {k: [] for k in PHASE_NAMES}
    for rec in records:
        for b, cell in rec["metrics"]["cells"].items():
            if "error" in cell:
                continue
            labels.append(f"{b}\n{rec['config']['size']}")
            for k in PHASE_NAMES:
                stacks[k].append(_v(cell, k))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels)), 4.5))
    bottom = [0.0] * len(labels)
    for k, name in PHASE_NAMES.items():
        ax.bar(labels, stacks[k], bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, stacks[k])]
    ax.set(ylabel="ms per update", title="Drama agent update by phase")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
