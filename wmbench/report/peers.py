"""`wmbench bench --peers` records: ours and each installed peer implementation at the same shapes."""
from __future__ import annotations

OURS = {"ours:mamba": "wmbench mamba", "ours:mamba2": "wmbench mamba2", "ours:ssd": "wmbench ssd_scan",
        "ours:gated_deltanet": "wmbench gated_deltanet", "ours:rwkv7": "wmbench rwkv7", "ours:mlstm": "wmbench mlstm",
        "ours:mamba3": "wmbench mamba3"}
PEER_OBJECT = {"mambapy": "Mamba", "hf-mamba": "MambaModel", "hf-mamba-seq": "MambaModel", "hf-mamba2": "Mamba2Model",
               "ssd-minimal": "ssd_minimal_discrete",
               "fla-gdn": "GatedDeltaNet math + naive_chunk_gated_delta_rule", "hf-gdn": "Qwen3NextGatedDeltaNet",
               "fla-rwkv7": "RWKV7Attention math + dplr_chunkwise", "xlstm": "xLSTMBlockStack (mLSTM)",
               "xlstm-large": "xLSTM-Large mLSTMLayer"}
COLUMNS = ("pair", "implementation", "B", "L", "fwd+bwd ms", "time vs ours", "peak MB", "memory vs ours",
           "params", "output", "notes")


def _v(cell: dict, k: str) -> float:
    return float(cell[k]["value"])


def _peer_label(pair: str, peer: dict) -> str:
    version = f" {peer['version']}" if peer.get("version") else ""
    return f"{peer.get('name', pair)}{version} {PEER_OBJECT.get(pair, '')}".strip()


def _notes(cell: dict) -> str:
    notes = []
    if "path" in cell:
        notes.append(f"{cell['path']} path")
    if "scan" in cell:
        notes.append(str(cell["scan"]))
    if "agreement" in cell:
        a = cell["agreement"]
        notes.append(f"max abs diff to ours {a['value']:.1e} (outputs up to {a.get('scale', float('nan')):.1f})")
    if cell.get("output_shape_matches_ours") is False:
        notes.append("OUTPUT SHAPE DIFFERS FROM OURS")
    return "; ".join(notes)


def _row(pair: str, label: str, B, L, cell: dict) -> str:
    if "error" in cell:
        return f"| {pair} | {label} | {B} | {L} | {cell['error']} |" + " |" * (len(COLUMNS) - 5)
    t_ratio = f"{_v(cell, 'time_ratio_to_ours'):.2f}x" if "time_ratio_to_ours" in cell else "1 (ours)"
    m_ratio = f"{_v(cell, 'memory_ratio_to_ours'):.2f}x" if "memory_ratio_to_ours" in cell else \
        ("1 (ours)" if "time_ratio_to_ours" not in cell else "—")
    params = f"{_v(cell, 'n_params') / 1e6:.2f}M" if "n_params" in cell else "—"
    shape = "×".join(str(n) for n in cell.get("output_shape", []))
    output = f"{shape}, {'finite' if cell.get('output_finite') else 'NOT FINITE'}"
    return (f"| {pair} | {label} | {B} | {L} | {_v(cell, 'fwd_bwd_time'):,.0f} | {t_ratio} "
            f"| {_v(cell, 'peak_memory') / 2**20:,.0f} | {m_ratio} | {params} | {output} | {_notes(cell)} |")


def peers_markdown(records: list[dict]) -> str:
    lines = ["# Peer implementations (`wmbench bench --peers`)", "",
             "Each implementation at the same shape, each in a fresh process: median fwd+bwd milliseconds after "
             "warm-up, peak memory of the cell (RSS above the start), and both as a ratio to ours (above 1: ours "
             "is faster / smaller). Weights differ between implementations; where a peer computes the same function "
             "as ours (the SSD op; the recurrence inside the Gated DeltaNet, RWKV-7 and mLSTM layers), its "
             "agreement with ours on a small input is shown.", ""]
    for rec in records:
        c, env = rec["config"], rec["environment"]
        lines += [f"## {env['device_name']}, {env['torch_threads']} threads, d_model {c['d_model']}, "
                  f"{c['n_layers']} layers, {c['warmup']} warm-up + {c['iters']} timed — {rec['created_at']}", "",
                  "| " + " | ".join(COLUMNS) + " |",
                  "|---|---|" + "---:|" * 7 + "---|---|"]
        for pair, entry in rec["metrics"]["pairs"].items():
            peer = entry["peer"]
            ours_label = OURS.get(entry["ours"], entry["ours"])
            for L, cells in entry["lengths"].items():
                lines.append(_row(pair, ours_label, entry["batch"], L, cells["ours"]))
                if peer.get("status") == "ok" and "peer" in cells:
                    lines.append(_row(pair, _peer_label(pair, peer), entry["batch"], L, cells["peer"]))
            if peer.get("status") != "ok":    # "not installed", or "skipped" (our side is missing)
                status = peer.get("status") or "not installed"
                lines.append(f"| {pair} | {peer.get('name', pair)} | | | {status}: {peer.get('reason', '?')} |"
                             + " |" * (len(COLUMNS) - 5))
        lines.append("")
        lines += _ours_side_by_side(rec)
    return "\n".join(lines)


def _ours_side_by_side(rec: dict) -> list[str]:
    """Our backbones measured in this run at Mamba-2's shape, as multiples of our Mamba-2's time."""
    ours: dict[str, tuple] = {}
    for entry in rec["metrics"]["pairs"].values():
        for L, cells in entry["lengths"].items():
            cell = cells.get("ours", {})
            if "fwd_bwd_time" in cell:
                ours.setdefault(entry["ours"], (entry["batch"], L, _v(cell, "fwd_bwd_time")))
    base = ours.get("ours:mamba2")
    if base is None or len(ours) < 2:
        return []
    rows = [f"Our backbones beside our Mamba-2 in this run (B {base[0]}, L {base[1]}; ×: their time over Mamba-2's):",
            "", "| ours | fwd+bwd ms | × mamba2 |", "|---|---:|---:|"]
    for impl, (B, L, t) in ours.items():
        if (B, L) == base[:2]:
            rows.append(f"| {OURS.get(impl, impl)} | {t:,.0f} | {t / base[2]:.2f}x |")
    return rows + [""]
