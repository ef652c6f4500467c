"""Measuring time, memory and throughput honestly on CPU and CUDA.

CPU memory: tracemalloc does not see torch's allocator and `ru_maxrss` is a lifetime high-water
mark, so a background thread samples the process RSS (psutil) and reports peak minus baseline.
CUDA memory: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from typing import Any, Callable

import numpy as np
import psutil
import torch


def metric(value: Any, unit: str, method: str | None = None, **extra: Any) -> dict:
    out = {"value": value, "unit": unit}
    if method:
        out["method"] = method
    out.update(extra)
    return out


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], warmup: int = 2, iters: int = 5,
               device: torch.device | str | None = None) -> list[float]:
    """Seconds per call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def mean_or_nan(xs) -> float:
    """Mean of `xs`, NaN when there is none (e.g. no finished episode yet)."""
    return float(np.mean(xs)) if len(xs) else float("nan")


def finite_or_none(x) -> float | None:
    """A JSON-safe number for records: None instead of NaN / inf."""
    return float(x) if x is not None and math.isfinite(x) else None


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class PeakMemory:
    """Context manager measuring the peak memory used inside the block.

    `peak_bytes` is the peak above the level at entry; `method` names how it was measured.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.method = "cuda_max_allocated" if self.device.type == "cuda" else "rss_sampler"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            if rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_bytes = int(self._peak - self._base)
        self.peak_total_bytes = int(self._peak)      # the process's peak RSS inside the block


def matmul_throughput(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      n: int = 1024, min_time_s: float = 1.0) -> float:
    """Measured dense matmul throughput in FLOP/s (best of repeated n x n x n products)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    t_end = time.perf_counter() + min_time_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2.0 * n ** 3 / best
