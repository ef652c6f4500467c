"""`wmbench bench` records as the fixed-width table the command prints and the report embeds."""


def format_table(record: dict) -> str:
    m = record["metrics"]
    lines = [f"matmul throughput: {m['matmul_throughput']['value'] / 1e9:.0f} GFLOP/s "
             f"({record['environment']['device_name']}, {record['environment']['torch_threads']} threads, "
             f"{record['config']['dtype']}, malloc {record['environment'].get('malloc', 'system')})",
             f"{'backbone':<12}{'L':>6}{'params':>11}{'fwd+bwd ms':>12}{'peak MB':>10}{'GFLOP':>9}"
             f"{'% matmul':>10}  step ms @ context"]
    for b, cells in m["cells"].items():
        for n, c in cells.items():
            if "error" in c:
                lines.append(f"{b:<12}{n:>6}  {c['error']}")
                continue
            steps = " ".join(f"{k}:{v:.2f}" for k, v in c["step_latency"]["value"].items())
            lines.append(f"{b:<12}{n:>6}{c['n_params']['value']:>11,}{c['fwd_bwd_time']['value']:>12.0f}"
                         f"{c['peak_memory']['value'] / 2**20:>10.0f}{c['model_flops']['value'] / 1e9:>9.1f}"
                         f"{100 * c['fraction_of_matmul_peak']['value']:>9.0f}%  {steps}")
    return "\n".join(lines)
