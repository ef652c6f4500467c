"""`wmbench bench`: fwd+bwd time, peak memory, FLOPs and step latency of backbones.

Each (backbone, length) cell runs in a fresh subprocess (wmbench/harness/cells.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import asdict, dataclass, field

import torch

from wmbench.core import allocator
from wmbench.core.errors import UserError
from wmbench.core.measure import PeakMemory, median, metric, time_calls
from wmbench.core.registry import BACKBONES, BUILTIN_BACKBONES, create_backbone
from wmbench.harness.cells import matmul_peak, run_cell_subprocess, save_cells_record, tick

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchConfig:
    backbones: list[str] = field(default_factory=lambda: list(BUILTIN_BACKBONES))
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
    threads: int = 0              # torch CPU threads in each cell (0: torch's default)


def check_bench_config(cfg: BenchConfig) -> None:
    """Every field, before any work: one-line ValueError naming the option."""
    from wmbench.core.device import resolve_device
    if not cfg.backbones:
        raise UserError("--backbones is empty; valid choices: " + ", ".join(BACKBONES.names()))
    for name in cfg.backbones:
        BACKBONES.get(name)  # unknown names fail naming the valid ones
    for flag, v in (("--batch", cfg.batch_size), ("--d-model", cfg.d_model), ("--layers", cfg.n_layers),
                    ("--iters", cfg.iters)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UserError(f"{flag} must be a positive integer, got {v!r}")
    for flag, v in (("--warmup", cfg.warmup), ("--threads", cfg.threads)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"{flag} must be an integer >= 0, got {v!r}")
    if not cfg.lengths or not cfg.step_contexts or min(cfg.lengths + cfg.step_contexts) <= 0:
        raise UserError("--len and --contexts must be non-empty lists of positive integers")
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown dtype {cfg.dtype!r}; valid choices: {', '.join(DTYPES)}")
    resolve_device(cfg.device)


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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    model = create_backbone(backbone, cfg.d_model, cfg.n_layers, **cfg.backbone_options).to(dev)
    x = torch.randn(cfg.batch_size, length, cfg.d_model, device=dev)

    def fwd_bwd():
        with _autocast(cfg):
            y = model(x)
        y.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def fwd_bwd_ticked():
        fwd_bwd()
        tick()

    with PeakMemory(dev) as mem:
        times = time_calls(fwd_bwd_ticked, warmup=cfg.warmup, iters=cfg.iters, device=dev)
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
            tick()
    out["step_latency"] = metric(step_ms, "ms", f"median of {cfg.step_iters} step() calls after prefill of the context, "
                                 f"batch {cfg.batch_size}, keyed by context length")
    return out


def ticks_per_cell(cfg: BenchConfig) -> int:
    return cfg.warmup + cfg.iters + len(cfg.step_contexts)


def _run_cell_subprocess(cfg: BenchConfig, backbone: str, length: int, tick=lambda: None) -> dict:
    # the cell runs with the parent's malloc mode (the record names it)
    return run_cell_subprocess("wmbench.harness.bench", {"cfg": asdict(cfg), "backbone": backbone,
                                                         "length": length, "malloc": allocator.active()}, tick)


def run_bench(cfg: BenchConfig, runs_dir: str = "results/runs", progress: bool = True) -> tuple[dict, str]:
    from tqdm import tqdm

    check_bench_config(cfg)
    cells = [(b, n) for b in cfg.backbones for n in cfg.lengths]
    results = {}
    bar = tqdm(total=len(cells) * ticks_per_cell(cfg), desc="bench", disable=not progress, unit="call",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    for i, (b, n) in enumerate(cells):
        bar.set_postfix_str(f"cell {i + 1}/{len(cells)}: {b} L={n}")
        results.setdefault(b, {})[str(n)] = _run_cell_subprocess(cfg, b, n, tick=lambda: bar.update(1))
        bar.n = (i + 1) * ticks_per_cell(cfg)    # a failed cell's missing ticks
        bar.refresh()
    bar.close()
    peak = matmul_peak(cfg.device, DTYPES[cfg.dtype], cfg.threads)
    for b in results:
        for cell in results[b].values():
            if "error" not in cell:
                cell["fraction_of_matmul_peak"] = metric(
                    cell["achieved_linear_flops"]["value"] / peak, "fraction",
                    "achieved linear FLOP/s / measured dense matmul FLOP/s")
    metrics = {"matmul_throughput": metric(peak, "FLOP/s", f"best of repeated 1024^3 {cfg.dtype} matmuls"),
               "cells": results}
    return save_cells_record("bench", asdict(cfg), metrics, cfg.device, cfg.threads, runs_dir, "bench")


def _cell_main(payload: str) -> None:
    d = json.loads(payload)
    allocator.configure(d["malloc"])
    cfg = BenchConfig(**d["cfg"])
    print(json.dumps(run_cell(cfg, d["backbone"], d["length"])))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", required=True)
    _cell_main(ap.parse_args().cell)
