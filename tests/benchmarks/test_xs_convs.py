"""Each conv of the XS world model by itself, at the training batch (2,048 frames, channels-last): forward,
weight gradient and input gradient, against the matmul rate measured here (pytest-benchmark; not in the
default run). The README's per-layer table comes from these:

    pytest tests/benchmarks/test_xs_convs.py --benchmark-only --benchmark-columns=median

Each benchmark's extra_info holds the GFLOP of the pass, its GFLOP/s and the ratio to the FLOP-bound
time. The decoder's last layer is also timed on 2 x 2 blocks (space_to_depth.py), as training runs it.
"""
import pytest
import torch
import torch.nn as nn

from wmbench.agent.config import bf16_native
from wmbench.core import allocator
from wmbench.core.measure import matmul_throughput
from wmbench.world_model import get_preset, space_to_depth

aten = torch.ops.aten
N = 2048   # the XS world-model batch: 16 x 128 frames


def _layers():
    """(name, c_in, c_out, input size, stride, transposed) of the XS encoder, then the decoder."""
    cfg = get_preset("XS")
    f, s, out, size = cfg.enc_filters, cfg.enc_strides, [], cfg.image_size
    for i, (c, st) in enumerate(zip(f, s)):
        c_in = cfg.image_channels if i == 0 else f[i - 1]
        out.append((f"enc{i + 1}-{c_in}to{c}", c_in, c, size, st, False))
        size //= st
    for i in range(len(f) - 1, -1, -1):
        c_out = f[i - 1] if i else cfg.image_channels
        out.append((f"dec-{f[i]}to{c_out}", f[i], c_out, size, s[i], True))
        size *= s[i]
    return out


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def dtype_rate(request):
    dtype = torch.bfloat16 if request.param == "bf16" else torch.float32
    if dtype == torch.bfloat16 and not bf16_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX)")
    return dtype, matmul_throughput("cpu", dtype)


def _case(name, c_in, c_out, size, stride, transposed, dtype):
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(N, c_in, size, size, dtype=dtype).contiguous(memory_format=cl)
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(
        c_in, c_out, 5, stride, 2, **({"output_padding": stride - 1} if transposed else {}))
    w = conv.weight.detach().to(dtype)
    args = (list(conv.stride), list(conv.padding), [1, 1], transposed,
            list(conv.output_padding) if transposed else [0, 0], 1)
    y = aten.convolution(x, w, None, *args)
    g = torch.randn_like(y).contiguous(memory_format=cl)
    flops = 2 * (x.numel() * c_out if transposed else y.numel() * c_in) * 25
    return conv, x, w, args, g, flops


@pytest.mark.parametrize("layer", _layers(), ids=lambda t: t[0])
@pytest.mark.parametrize("pass_", ["fwd", "wgrad", "igrad", "fwd-blocks"])
def test_xs_conv(benchmark, dtype_rate, layer, pass_):
    dtype, rate = dtype_rate
    name, c_in, c_out, size, stride, transposed = layer
    if pass_ == "igrad" and name.startswith("enc1"):
        pytest.skip("the frames need no gradient")
    conv, x, w, args, g, flops = _case(*layer, dtype)
    if pass_ == "fwd-blocks" and not space_to_depth.usable(conv, x):
        pytest.skip("not a layer the 2 x 2 block forward serves")
    fn = {"fwd": lambda: aten.convolution(x, w, None, *args),
          "fwd-blocks": lambda: space_to_depth.conv_forward(conv, x, w, None),
          "wgrad": lambda: aten.convolution_backward(g, x, w, None, *args, [False, True, False]),
          "igrad": lambda: aten.convolution_backward(g, x, w, None, *args, [True, False, False])}[pass_]
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(gflop=flops / 1e9, gflop_per_s=flops / t / 1e9, matmul_gflop_per_s=rate / 1e9,
                                over_flop_bound=t / (flops / rate), threads=torch.get_num_threads(),
                                malloc=allocator.active())
