"""The paper's XS update on this machine: time against the FLOP bound, and peak memory (pytest-benchmark;
not in the default run). Each benchmark's extra_info holds the FLOPs, the matmul rate measured here, the
time over the FLOP-bound time (FLOPs / matmul rate; over_fp32_flop_bound: at the fp32 rate whatever the
precision) and the process's peak RSS (run `-k lean` and `-k plain`
separately for each one's own peak: freed memory stays in the process).

    pytest tests/benchmarks --benchmark-only -k xs --benchmark-columns=median,rounds

The world-model update runs with the memory-lean conv stack (the default) and with plain autograd (what
the code did before it), side by side in one process, in fp32 and under bf16 autocast (`-k bf16`, on a
CPU with native bf16 only: there its bound uses the bf16 matmul rate). `wmbench bench --agent --size XS` measures
the same update phase by phase, with a full replay buffer in memory, and writes a record.
"""
import pytest
import torch

from wmbench.agent import ActorCritic
from wmbench.agent.config import bf16_native
from wmbench.agent.estimate import random_batches
from wmbench.core import allocator
from wmbench.core.measure import PeakMemory, matmul_throughput
from wmbench.world_model import WorldModel, get_preset, lean_conv

N_ACTIONS = 18


class _Rates:
    """This precision's and fp32's dense matmul rates, the best of every reading taken (`_run` reads them
    again after its rounds: one reading on a shared host can be 30% low, which would flatter the ratios)."""

    def __init__(self, bf16: bool):
        self.bf16, self.own, self.fp32 = bf16, 0.0, 0.0
        self.read()

    def read(self) -> None:
        fp32 = matmul_throughput("cpu", torch.float32)
        self.fp32 = max(self.fp32, fp32)
        self.own = max(self.own, matmul_throughput("cpu", torch.bfloat16) if self.bf16 else fp32)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def xs(request):
    bf16 = request.param == "bf16"
    if bf16 and not bf16_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): autocast would emulate it")
    torch.manual_seed(0)
    m = get_preset("XS", backbone="mamba2", amp=bf16)
    wm, ac = WorldModel(m, N_ACTIONS), ActorCritic(m, N_ACTIONS)
    batch, ctx = random_batches(m, (m.image_size, m.image_size, m.image_channels), N_ACTIONS, 1.0)
    return wm, ac, batch, ctx, _Rates(bf16)


def _flops(fn) -> int:
    """The model's FLOPs: neither the recomputed first conv nor the zero taps of the 2 x 2 block forward."""
    from torch.utils.flop_counter import FlopCounterMode
    with lean_conv.model_flops(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _run(benchmark, fn, rates: _Rates, flops: int):
    """The time over the FLOP bound at this precision's matmul rate, and at fp32's (one yardstick for both)."""
    with PeakMemory("cpu") as mem:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    rates.read()
    rate, fp32_rate = rates.own, rates.fp32
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(flops=flops, matmul_flops_per_s=rate, over_flop_bound=t / (flops / rate),
                                over_fp32_flop_bound=t / (flops / fp32_rate),
                                peak_rss_gb=getattr(mem, "peak_total_bytes", mem.peak_bytes) / 1e9,
                                threads=torch.get_num_threads(), malloc=allocator.active())


@pytest.mark.parametrize("stack", ["lean", "plain"])
def test_xs_world_model_update(benchmark, xs, stack, monkeypatch):
    wm, _, batch, _, rate = xs
    if stack == "plain":
        monkeypatch.setattr(lean_conv, "usable", lambda x, m: False)
    _run(benchmark, lambda: wm.train_step(batch), rate, _flops(lambda: wm.train_step(batch)))


def test_xs_full_update(benchmark, xs):
    """World-model update, imagination (1024 contexts, 16 steps) and actor-critic update: one env step's
    training at XS."""
    wm, ac, batch, (obs, act), rate = xs

    def update():
        wm.train_step(batch)
        ac.update(wm.imagine(obs, act, ac))
    _run(benchmark, update, rate, _flops(update))
