"""Run one measurement cell in a fresh Python process, so its peak memory is its own (the allocator keeps
freed pages: a second cell in the same process would hide behind the first's high-water mark) and an
out-of-memory kill costs one cell, not the table. The cell prints progress ticks on stderr and one JSON
line of results on stdout."""
from __future__ import annotations

import json
import subprocess
import sys

TICK = "wmbench-cell-tick"


def tick() -> None:
    """One unit of a cell's work done: the parent's progress bar moves."""
    print(TICK, file=sys.stderr, flush=True)


def run_cell_subprocess(module: str, payload: dict, on_tick=lambda: None) -> dict:
    """`python -m MODULE --cell PAYLOAD`; its result dict, or {"error": "OOM" | last stderr line}."""
    proc = subprocess.Popen([sys.executable, "-m", module, "--cell", json.dumps(payload)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines = []
    for line in proc.stderr:           # stdout is one JSON line at the end: it cannot fill its pipe
        if line.strip() == TICK:
            on_tick()
        else:
            err_lines.append(line)
    out = proc.stdout.read()
    rc = proc.wait()
    if rc != 0:
        err = "".join(err_lines)
        last = (err.strip().splitlines() or ["killed"])[-1]
        oom = rc in (-9, 137) or "out of memory" in err.lower() or "MemoryError" in err
        return {"error": "OOM" if oom else last}
    return json.loads(out.strip().splitlines()[-1])


def matmul_peak(device: str, dtype, threads: int) -> float:
    """The dense matmul FLOP/s at the thread count the cells ran with (0: this process's)."""
    import torch

    from wmbench.core.measure import matmul_throughput
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return matmul_throughput(device, dtype)
    finally:
        torch.set_num_threads(before)


def save_cells_record(kind: str, config: dict, metrics: dict, device: str, threads: int, runs_dir, prefix: str):
    """The harness record: environment with the cells' thread count, saved (with fallbacks) as PREFIX-STAMP."""
    from wmbench.core.records import make_record, save_record
    record = make_record(kind, config, metrics, device=device)
    if threads:
        record["environment"]["torch_threads"] = threads    # what the cells ran with
    stamp = record["created_at"].replace(":", "").replace("-", "").replace("+0000", "")
    return record, str(save_record(record, runs_dir, name=f"{prefix}-{stamp}", fallbacks=(".",)))
