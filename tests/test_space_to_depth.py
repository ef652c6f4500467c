"""The decoder's last conv on 2 x 2 blocks (space_to_depth.py) against the direct convolution."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from wmbench.world_model import get_preset, lean_conv, space_to_depth
from wmbench.world_model.networks import Decoder, Encoder


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@settings(max_examples=25, deadline=None)
@given(transposed=st.booleans(), k=st.sampled_from([1, 3, 5, 7, 9]), c_in=st.integers(1, 12),
       c_out=st.integers(1, space_to_depth.MAX_OUT_CHANNELS), half_h=st.integers(16, 20),
       half_w=st.integers(16, 20), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_the_direct_conv(transposed, k, c_in, c_out, half_h, half_w, bias, seed):
    """Same sums, rearranged: equal to the direct (transposed) conv to float64 rounding."""
    torch.manual_seed(seed)
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(c_in, c_out, k, 1, k // 2, bias=bias).double()
    x = _cl(torch.randn(2, c_in, 2 * half_h, 2 * half_w, dtype=torch.float64))
    assert space_to_depth.usable(conv, x)
    out = space_to_depth.conv_forward(conv, x, conv.weight, conv.bias)
    ref = conv(x)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_autograd_through_it_gives_the_direct_convs_gradients():
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 3, 5, 1, 2).double()
    x = _cl(torch.randn(2, 6, 32, 32, dtype=torch.float64))
    g = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for fn in (lambda x: space_to_depth.conv_forward(conv, x, conv.weight, conv.bias), conv):
        xr = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(xr), (xr, conv.weight, conv.bias), g))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case, why", [
    (dict(stride=2, output_padding=1), "stride 2"),
    (dict(out_channels=16), "16 output channels: oneDNN's block, served well directly"),
    (dict(size=(33, 32)), "odd height"),
    (dict(size=(16, 16)), "small image"),
    (dict(layout="nchw"), "not channels-last"),
    (dict(padding=0), "not 'same' padding"),
])
def test_usable_only_where_it_is_equal_and_measured(case, why):
    c_out, stride = case.get("out_channels", 3), case.get("stride", 1)
    conv = nn.ConvTranspose2d(16, c_out, 5, stride, case.get("padding", 2),
                              output_padding=case.get("output_padding", 0))
    x = torch.randn(1, 16, *case.get("size", (64, 64)))
    x = x if case.get("layout") == "nchw" else _cl(x)
    assert not space_to_depth.usable(conv, x), why
    assert space_to_depth.usable(nn.ConvTranspose2d(16, 3, 5, 1, 2), _cl(torch.randn(1, 16, 64, 64)))


@pytest.mark.parametrize("preset, used", [("XS", True), ("cpu", False)])
def test_the_lean_stack_runs_the_xs_decoders_last_layer_on_blocks(preset, used, monkeypatch):
    """XS's last decoder layer (16 -> 3, stride 1, 64 x 64) takes it in training; the cpu preset's (stride
    2) does not; the encoder never does."""
    cfg = get_preset(preset)
    cfg.enc_filters = tuple(min(f, 16) for f in cfg.enc_filters)
    torch.manual_seed(0)
    enc, dec = Encoder(cfg), Decoder(cfg, Encoder(cfg).out_shape)
    calls = []
    real = space_to_depth.conv_forward
    monkeypatch.setattr(space_to_depth, "conv_forward", lambda conv, *a: calls.append(conv) or real(conv, *a))
    s = cfg.image_size // cfg.obs_pool
    feats = enc(_cl(torch.rand(2, cfg.image_channels, s, s)))
    assert lean_conv.usable(feats, dec)
    dec(torch.randn(2, cfg.latent_dim)).sum().backward()
    assert calls == ([dec.net[-1]] if used else [])
