"""`wmbench bench`: fwd+bwd time, peak memory, FLOPs and step latency of backbones.

Each (backbone, length) cell runs in a fresh subprocess so that its peak memory is its own (the
allocator keeps freed pages, so a second cell in the same process would hide behind the first's
high-water mark) and an out-of-memory kill costs one cell, not the table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

from wmbench.core import allocator
from wmbench.core.errors import UserError
from wmbench.core.measure import PeakMemory, matmul_throughput, median, metric, time_calls
from wmbench.core.registry import BACKBONES, create_backbone

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchConfig:
    backbones: list[str] = field(default_factory=lambda: ["mamba", "mamba2", "gru", "transformer"])
    lengths: list[int] = field(default_factory=lambda: [208, 1664])
    batch_size: int = 16
    d_model: int = 512
    n_layers: int = 2
    dtype: str = "fp32"            # fp32 | bf16 (autocast; parameters stay fp32)
    device: str = "cpu"
    warmup: int = 1
    iters: int = 3
    step_contexts: list[int] = field(default_factory=lambda: [8, 208, 1664])
    step_iters: int = 100         # step() calls are ~1-15 ms: many samples for a stable median
    seed: int = 0
    backbone_options: dict = field(default_factory=dict)


def _autocast(cfg: BenchConfig):
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=DTYPES[cfg.dtype])


def _flops_fwd_bwd(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def run_cell(cfg: BenchConfig, backbone: str, length: int) -> dict:
    """Measure one backbone at one length in this process; returns metrics."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model = create_backbone(backbone, cfg.d_model, cfg.n_layers, **cfg.backbone_options).to(dev)
    x = torch.randn(cfg.batch_size, length, cfg.d_model, device=dev)

    def fwd_bwd():
        with _autocast(cfg):
            y = model(x)
        y.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    with PeakMemory(dev) as mem:
        times = time_calls(fwd_bwd, warmup=cfg.warmup, iters=cfg.iters, device=dev)
    t = median(times)
    with _autocast(cfg):
        flops = _flops_fwd_bwd(model, x)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = cfg.batch_size * length
    linear_flops = 6 * n_params * tokens
    out = {
        "n_params": metric(n_params, "parameters"),
        "fwd_bwd_time": metric(1e3 * t, "ms", f"median of {cfg.iters} timed fwd+bwd steps after {cfg.warmup} warm-up",
                               samples_ms=[1e3 * s for s in times]),
        "tokens_per_s": metric(tokens / t, "tokens/s", "batch*length / median fwd+bwd time"),
        "peak_memory": metric(mem.peak_bytes, "bytes", mem.method),
        "model_flops": metric(flops, "FLOP", "torch.utils.flop_counter, one fwd+bwd"),
        "linear_flops": metric(linear_flops, "FLOP", "6 x parameters x tokens"),
        "achieved_flops": metric(flops / t, "FLOP/s", "model_flops / median time"),
        "achieved_linear_flops": metric(linear_flops / t, "FLOP/s", "linear_flops / median time"),
    }
    del x
    model.eval()
    step_ms = {}
    with torch.no_grad(), _autocast(cfg):
        for ctx in cfg.step_contexts:
            state = model.init_state(cfg.batch_size, max_len=ctx + cfg.step_iters + 16)
            _, state = model.prefill(torch.randn(cfg.batch_size, ctx, cfg.d_model, device=dev), state)
            x_t = torch.randn(cfg.batch_size, cfg.d_model, device=dev)
            holder = {"s": state}

            def one_step():
                _, holder["s"] = model.step(x_t, holder["s"])

            ts = time_calls(one_step, warmup=8, iters=cfg.step_iters, device=dev)
            step_ms[str(ctx)] = 1e3 * median(ts)
    out["step_latency"] = metric(step_ms, "ms", f"median of {cfg.step_iters} step() calls after prefill of the context, "
                                 f"batch {cfg.batch_size}, keyed by context length")
    return out


def _run_cell_subprocess(cfg: BenchConfig, backbone: str, length: int) -> dict:
    # the cell runs with the parent's malloc mode (the record names it)
    payload = json.dumps({"cfg": asdict(cfg), "backbone": backbone, "length": length,
                          "malloc": allocator.active()})
    proc = subprocess.run([sys.executable, "-m", "wmbench.harness.bench", "--cell", payload],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        oom = proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower() or "MemoryError" in proc.stderr
        return {"error": "OOM" if oom else err}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(cfg: BenchConfig, runs_dir: str = "results/runs", progress: bool = True) -> tuple[dict, str]:
    from tqdm import tqdm
    from wmbench.core.records import make_record, write_record

    for name in cfg.backbones:
        BACKBONES.get(name)  # unknown names fail before any work
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown dtype {cfg.dtype!r}; valid choices: {', '.join(DTYPES)}")
    cells = [(b, n) for b in cfg.backbones for n in cfg.lengths]
    results = {}
    bar = tqdm(cells, desc="bench", disable=not progress, unit="cell")
    for b, n in bar:
        bar.set_postfix_str(f"{b} L={n}")
        results.setdefault(b, {})[str(n)] = _run_cell_subprocess(cfg, b, n)
    peak = matmul_throughput(cfg.device, DTYPES[cfg.dtype])
    for b in results:
        for cell in results[b].values():
            if "error" not in cell:
                cell["fraction_of_matmul_peak"] = metric(
                    cell["achieved_linear_flops"]["value"] / peak, "fraction",
                    "achieved linear FLOP/s / measured dense matmul FLOP/s")
    metrics = {"matmul_throughput": metric(peak, "FLOP/s", f"best of repeated 1024^3 {cfg.dtype} matmuls"),
               "cells": results}
    record = make_record("bench", asdict(cfg), metrics, device=cfg.device)
    path = write_record(record, runs_dir)
    return record, str(path)


def _cell_main(payload: str) -> None:
    d = json.loads(payload)
    allocator.configure(d["malloc"])
    cfg = BenchConfig(**d["cfg"])
    print(json.dumps(run_cell(cfg, d["backbone"], d["length"])))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", required=True)
    _cell_main(ap.parse_args().cell)
