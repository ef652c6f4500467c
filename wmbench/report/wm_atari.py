"""`wmbench run --task atari` records: the backbone x game table of the world-model benchmark, and plots
of open-loop error against horizon and of imagination ms against context length. Records only."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from wmbench.core.registry import BUILTIN_BACKBONES

BACKBONE_ORDER = BUILTIN_BACKBONES


def _cell_key(rec: dict) -> tuple:
    c = rec["config"]
    return (c["game"], c["backbone"], c["seq_len"], c["preset"], c.get("steps"), c.get("data_steps"),
            c.get("policy"), rec["environment"].get("device_name", ""))


def latest_per_seed(records: list[dict]) -> list[dict]:
    """One record per (cell, seed, machine): the newest."""
    best: dict = {}
    for r in records:
        k = _cell_key(r) + (r["config"]["seed"],)
        if k not in best or r.get("created_at", "") > best[k].get("created_at", ""):
            best[k] = r
    return list(best.values())


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in latest_per_seed(records):
        out.setdefault(_cell_key(r), []).append(r)
    order = lambda k: (k[7], k[0], BACKBONE_ORDER.index(k[1]) if k[1] in BACKBONE_ORDER else 99, k[1], k[2])
    return {k: out[k] for k in sorted(out, key=order)}


def _ms(vals: list[float], fmt: str) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(float(np.mean(vals)), fmt)} ± {format(float(np.std(vals, ddof=1)), fmt)}"


def wm_atari_rows(records: list[dict]) -> list[dict]:
    """One row per (machine, game, backbone, length, preset): mean and std over seeds of each metric."""
    rows = []
    for k, recs in _groups(records).items():
        m = [r["metrics"] for r in recs]
        ctxs = sorted({c for x in m for c in x["imagine_ms_per_step"]["value"]}, key=int)
        rows.append({
            "machine": k[7], "game": k[0], "backbone": k[1], "len": k[2], "preset": k[3], "steps": k[4],
            "n_seeds": len(recs),
            "train_ms": [x["train_ms_per_step"]["value"] for x in m],
            "peak_mib": [x["peak_memory"]["value"] / 2**20 for x in m],
            "psnr": [x["recon_psnr"]["value"] for x in m],
            "ol_mse": [x["open_loop_mse"]["value"] for x in m],
            "ol_curve": np.mean([x["open_loop_mse"]["per_horizon"] for x in m], 0).tolist(),
            "repeat_curve": np.mean([x["open_loop_mse"]["repeat_last_frame"] for x in m], 0).tolist(),
            "dyn_mse": [x["open_loop_mse"]["vs_reconstruction"][-1] for x in m if "vs_reconstruction" in x["open_loop_mse"]],
            "dyn_curve": (np.mean([x["open_loop_mse"]["vs_reconstruction"] for x in m], 0).tolist()
                          if all("vs_reconstruction" in x["open_loop_mse"] for x in m) else None),
            "reward_mae": [x["reward_mae"]["value"] for x in m],
            "term_err": [x["termination_error"]["value"] for x in m],
            "kl": [x["dynamics_kl"]["value"] for x in m],
            "imag": {c: [x["imagine_ms_per_step"]["value"].get(c) for x in m] for c in ctxs},
        })
    return rows


def wm_atari_markdown(records: list[dict]) -> str:
    rows = wm_atari_rows(records)
    lines = ["# World-model benchmark on Atari frames (`wmbench run --task atari`)", "",
             "The Drama world-model shell trained on a fixed offline dataset per game (every backbone on the same "
             "batches), scored on held-out episodes. Mean ± std over seeds (n). Open-loop MSE: per-pixel MSE of "
             "the decoded imagination at the last horizon, after prefilling real frames; 'repeat last' is the "
             "MSE of repeating the last real frame; 'vs recon.' scores the imagination against the true frames' "
             "own reconstructions (the dynamics' error without the autoencoder's). Imagination: ms per imagined step at batch 1024 after a "
             "prefill of c steps.", ""]
    by_machine: dict[str, list[dict]] = {}
    for r in rows:
        by_machine.setdefault(r["machine"], []).append(r)
    for machine, rs in by_machine.items():
        ctxs = sorted({c for r in rs for c in r["imag"]}, key=int)
        lines += [f"## {machine}", "",
                  "| game | backbone | len | steps | n | train ms/step | peak MiB | recon PSNR dB | open-loop MSE "
                  "| repeat last | open-loop vs recon. | reward MAE | term. error | KL nats | " + " | ".join(f"imag. ms @{c}" for c in ctxs)
                  + " |", "|---|---|---:|---:|---:|" + "---:|" * (9 + len(ctxs))]
        for r in rs:
            imag = " | ".join(_ms(r["imag"].get(c, []), ".1f") for c in ctxs)
            lines.append(f"| {r['game']} | {r['backbone']} | {r['len']} | {r['steps']} | {r['n_seeds']} "
                         f"| {_ms(r['train_ms'], '.0f')} | {_ms(r['peak_mib'], '.0f')} | {_ms(r['psnr'], '.2f')} "
                         f"| {_ms(r['ol_mse'], '.4f')} | {r['repeat_curve'][-1]:.4f} | {_ms(r['dyn_mse'], '.5f')} "
                         f"| {_ms(r['reward_mae'], '.3f')} "
                         f"| {_ms(r['term_err'], '.4f')} | {_ms(r['kl'], '.2f')} | {imag} |")
        lines.append("")
    return "\n".join(lines)


def wm_atari_csv(records: list[dict]) -> str:
    import pandas as pd
    flat = []
    for r in wm_atari_rows(records):
        row = {k: r[k] for k in ("machine", "game", "backbone", "len", "preset", "steps", "n_seeds")}
        for k in ("train_ms", "peak_mib", "psnr", "ol_mse", "dyn_mse", "reward_mae", "term_err", "kl"):
            vals = r[k]
            row[f"{k}_mean"] = float(np.mean(vals)) if vals else None
            row[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        for c, v in r["imag"].items():
            v = [x for x in v if x is not None]
            row[f"imag_ms_ctx{c}"] = float(np.mean(v)) if v else None
        flat.append(row)
    return pd.DataFrame(flat).to_csv(index=False)


def wm_atari_plots(records: list[dict], out_dir: Path) -> list[Path]:
    """wm_atari_horizon.png (error against horizon per game, one line per backbone, the repeat-last-frame
    baseline dashed) and wm_atari_imagination.png (ms per imagined step against context, per game)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wmbench.core.records import atomic_write_bytes
    rows = wm_atari_rows(records)
    if not rows:
        return []
    games = sorted({(r["machine"], r["game"]) for r in rows})
    several = len({m for m, _ in games}) > 1
    written = []
    for name, panels in (("wm_atari_horizon.png", (_horizon, _horizon_dynamics)), ("wm_atari_imagination.png", (_imagination,))):
        fig, axes = plt.subplots(len(panels), len(games), figsize=(4.8 * len(games), 3.8 * len(panels)), squeeze=False)
        for row, draw in enumerate(panels):
            for ax, (machine, game) in zip(axes[row], games):
                draw(ax, [r for r in rows if r["machine"] == machine and r["game"] == game])
                ax.set_title(f"{game} ({machine})" if several else game, fontsize=10)
            axes[row][0].legend(fontsize=8)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        written.append(atomic_write_bytes(out_dir / name, buf.getvalue()))
    return written


def _label(r: dict) -> str:
    return f"{r['backbone']} (L={r['len']}, n={r['n_seeds']})"


def _horizon(ax, rows: list[dict]) -> None:
    for r in rows:
        h = np.arange(1, len(r["ol_curve"]) + 1)
        ax.plot(h, r["ol_curve"], marker=".", label=_label(r))
    if rows:
        h = np.arange(1, len(rows[0]["repeat_curve"]) + 1)
        ax.plot(h, rows[0]["repeat_curve"], "k--", lw=1, label="repeat last real frame")
    ax.set(xlabel="imagination horizon (steps)", ylabel="per-pixel MSE")


def _horizon_dynamics(ax, rows: list[dict]) -> None:
    for r in rows:
        if r["dyn_curve"] is not None:
            ax.plot(np.arange(1, len(r["dyn_curve"]) + 1), r["dyn_curve"], marker=".", label=_label(r))
    ax.set(xlabel="imagination horizon (steps)", ylabel="per-pixel MSE vs reconstruction")


def _imagination(ax, rows: list[dict]) -> None:
    for r in rows:
        cs = [c for c in r["imag"] if any(v is not None for v in r["imag"][c])]
        ys = [float(np.mean([v for v in r["imag"][c] if v is not None])) for c in cs]
        ax.plot([int(c) for c in cs], ys, marker="o", label=_label(r))
    ax.set(xscale="log", yscale="log", xlabel="context length (steps prefilled)", ylabel="ms per imagined step")
