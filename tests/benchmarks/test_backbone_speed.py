"""Backbone speed and memory (pytest-benchmark; not in the default run).

    pytest tests/benchmarks --benchmark-only            # all cells (~15-25 min on a 2-core CPU)
    pytest tests/benchmarks --benchmark-only -k "208"   # the short-sequence cells only

fwd+bwd at the paper's sequence-model size (B 16, d 512, 2 layers) for L 208 and 1664, step latency
against context length, and mambapy's Mamba side by side when the `bench` extra is installed.
Peak memory (RSS sampler on CPU, max_allocated on CUDA) goes into `extra_info`.
"""
import pytest
import torch

import wmbench
from wmbench.core.measure import PeakMemory

B, D, N_LAYERS = 16, 512, 2
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fwd_bwd_bench(benchmark, model, x):
    def fwd_bwd():
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    # Memory is read on the first (cold) call: afterwards the allocator keeps freed pages and an
    # RSS sampler would see almost nothing new. Timing then excludes that warm-up call.
    with PeakMemory(DEVICE) as mem:
        fwd_bwd()
    benchmark.pedantic(fwd_bwd, rounds=3, iterations=1)
    tokens = x.shape[0] * x.shape[1]
    n_params = sum(p.numel() for p in model.parameters())
    benchmark.extra_info.update(peak_memory_bytes=mem.peak_bytes, peak_memory_method=mem.method,
                                n_params=n_params, tokens=tokens, linear_flops=6 * n_params * tokens)


@pytest.mark.parametrize("length", [208, 1664])
@pytest.mark.parametrize("backbone", ["mamba", "mamba2", "gru", "transformer"])
def test_fwd_bwd(benchmark, backbone, length):
    benchmark.group = f"fwd+bwd L={length}"
    torch.manual_seed(0)
    model = wmbench.create_backbone(backbone, D, N_LAYERS).to(DEVICE)
    x = torch.randn(B, length, D, device=DEVICE)
    _fwd_bwd_bench(benchmark, model, x)


@pytest.mark.parametrize("context", [8, 208, 1664])
@pytest.mark.parametrize("backbone", ["mamba", "mamba2", "gru", "transformer"])
def test_step_latency(benchmark, backbone, context):
    benchmark.group = f"step latency {backbone}"
    torch.manual_seed(0)
    model = wmbench.create_backbone(backbone, D, N_LAYERS).to(DEVICE).eval()
    with torch.no_grad():
        state = model.init_state(B, max_len=context + 64)
        _, state = model.prefill(torch.randn(B, context, D, device=DEVICE), state)
        x_t = torch.randn(B, D, device=DEVICE)
        holder = {"s": state}

        def step():
            _, holder["s"] = model.step(x_t, holder["s"])

        # fixed round count so the KV cache cannot overflow however fast the machine is
        benchmark.pedantic(step, rounds=40, iterations=1, warmup_rounds=3)
    benchmark.extra_info["context"] = context


@pytest.mark.parametrize("impl", ["wmbench", "mambapy"])
def test_mamba_vs_mambapy(benchmark, impl):
    """Mamba-1 fwd+bwd at L=1664, batch 4 (mambapy does not fit in 24 GB at batch 16)."""
    benchmark.group = "mamba vs mambapy B=4 L=1664"
    torch.manual_seed(0)
    if impl == "mambapy":
        mambapy = pytest.importorskip("mambapy.mamba", reason="install the bench extra: pip install 'wmbench[bench]'")
        model = mambapy.Mamba(mambapy.MambaConfig(d_model=D, n_layers=N_LAYERS)).to(DEVICE)
    else:
        model = wmbench.create_backbone("mamba", D, N_LAYERS).to(DEVICE)
    x = torch.randn(4, 1664, D, device=DEVICE)
    _fwd_bwd_bench(benchmark, model, x)
