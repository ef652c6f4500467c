"""The sequence-mixing ops alone, side by side (pytest-benchmark; not in the default run):

    pytest tests/benchmarks/test_scan_ops.py --benchmark-only --benchmark-columns=min,median

fwd+bwd of Mamba-2's SSD scan, the gated delta rule, RWKV-7's generalised delta rule and the mLSTM at
B 16, T 1,664, in fp32, each with a state of 8 heads x 64 x 64 (the mLSTM: 4 heads x 128 x 128, its
reference kernels' default head size), chunk 64. The ops' inputs are drawn as their layers make them
(unit-norm keys for the delta rules, RWKV-7's contractive a = -k^, b = k^ * alpha with w in (-0.6, 0]).
"""
import pytest
import torch
import torch.nn.functional as F

from wmbench.backbones.ops.delta_rule import gated_delta_rule
from wmbench.backbones.ops.mlstm import mlstm
from wmbench.backbones.ops.rwkv7 import rwkv7
from wmbench.backbones.ops.ssd import ssd_scan

B, T, H, K = 16, 1664, 8, 64


def _inputs(op: str) -> tuple:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def rand(*shape):
        return torch.rand(*shape, generator=g)
    if op == "ssd":
        return randn(B, T, H, K), F.softplus(randn(B, T, H)), randn(B, T, 1, K), randn(B, T, 1, K)
    if op == "gated_delta_rule":
        q, k = (F.normalize(randn(B, T, H, K), dim=-1) for _ in range(2))
        return q, k, randn(B, T, H, K), -rand(B, T, H), rand(B, T, H)
    if op == "rwkv7":
        kh = F.normalize(randn(B, T, H, K), dim=-1)
        return randn(B, T, H, K), -0.6 * rand(B, T, H, K), randn(B, T, H, K), randn(B, T, H, K), -kh, \
            kh * rand(B, T, H, K)
    return randn(B, T, 4, 128), randn(B, T, 4, 128), randn(B, T, 4, 128), randn(B, T, 4), randn(B, T, 4) + 3


A = -torch.linspace(0.5, 4.0, H)
OPS = {
    "ssd": lambda x, dt, b, c: ssd_scan(x, dt, A, b, c, 64, kernel="torch"),
    "gated_delta_rule": lambda *xs: gated_delta_rule(*xs),
    "rwkv7": lambda *xs: rwkv7(*xs),
    "mlstm": lambda *xs: mlstm(*xs),
}


@pytest.mark.parametrize("op", list(OPS))
def test_fwd_bwd(benchmark, op):
    benchmark.group = f"scan op fwd+bwd B={B} T={T}"
    xs = [x.requires_grad_(True) for x in _inputs(op)]

    def fwd_bwd():
        out, _ = OPS[op](*xs)
        out.square().mean().backward()
        for x in xs:
            x.grad = None
    fwd_bwd()                                   # warm-up: the allocator's first touch of its pages
    benchmark.pedantic(fwd_bwd, rounds=3, iterations=1)
    benchmark.extra_info.update(threads=torch.get_num_threads(), shape=[B, T, H, K])
