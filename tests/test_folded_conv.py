"""Inference with BatchNorm folded into the convs against the plain eval-mode modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from wmbench.world_model import folded_conv, get_preset
from wmbench.world_model.networks import Decoder, Encoder


def _trained_looking(*modules):
    """Non-trivial running statistics and affine parameters, as after training (fresh BN is identity-ish)."""
    g = torch.Generator().manual_seed(3)
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.05)
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
        mod.eval()


@pytest.mark.parametrize("preset", ["tiny", "cpu", "XS"])
def test_folded_encoder_and_decoder_equal_plain_modules(preset, monkeypatch):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    enc = Encoder(cfg)
    dec = Decoder(cfg, enc.out_shape)
    _trained_looking(enc, dec)
    res = cfg.image_size // cfg.obs_pool
    x = torch.rand(6, cfg.image_channels, res, res).contiguous(memory_format=torch.channels_last)
    z = torch.randn(6, cfg.latent_dim)
    x_before = x.clone()
    with torch.no_grad():
        folded = enc(x), dec(z)
        with monkeypatch.context() as mp:
            mp.setattr(folded_conv, "usable", lambda x, m: False)
            plain = enc(x), dec(z)
    assert torch.equal(x, x_before)                      # the caller's frames are not overwritten
    for f, p in zip(folded, plain):
        assert f.shape == p.shape
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-5)


def test_every_silu_overwrites_a_tensor_made_here(monkeypatch):
    """SiLU after a folded conv runs in place on the conv's fresh output (it once made a new 16 x 64 x 64
    tensor per frame at XS); only a SiLU straight on the caller's input may not."""
    cfg = get_preset("tiny")
    enc = Encoder(cfg)
    dec = Decoder(cfg, enc.out_shape)
    _trained_looking(enc, dec)
    calls, silu = [], folded_conv.F.silu
    monkeypatch.setattr(folded_conv.F, "silu", lambda x, inplace=False: calls.append(inplace) or silu(x, inplace))
    res = cfg.image_size // cfg.obs_pool
    with torch.no_grad():
        enc(torch.rand(2, cfg.image_channels, res, res))
        dec(torch.randn(2, cfg.latent_dim))
    assert len(calls) == 2 * len(cfg.enc_filters) and all(calls)
    calls.clear()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        out = folded_conv.run_folded(nn.Sequential(nn.SiLU()), x)
    assert calls == [False] and not torch.equal(out, x)


def test_folded_path_serves_only_eval_without_autograd():
    cfg = get_preset("tiny")
    enc = Encoder(cfg)
    x = torch.rand(2, cfg.image_channels, cfg.image_size, cfg.image_size)
    assert not folded_conv.usable(x, enc)                # training mode: batch statistics
    enc.eval()
    assert not folded_conv.usable(x, enc)                # autograd on: SiLU must not run in place
    with torch.no_grad():
        assert folded_conv.usable(x, enc)


def test_folding_a_hand_computed_conv_bn():
    """1x1 conv, one channel: w=2, b=1; BN mean 3, var 4-eps, gamma 5, beta 6 -> (2x + 1 - 3) / 2 * 5 + 6."""
    conv = nn.Conv2d(1, 1, 1)
    bn = nn.BatchNorm2d(1).eval()
    conv.weight.data.fill_(2.0)
    conv.bias.data.fill_(1.0)
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(4.0 - bn.eps)
    bn.weight.data.fill_(5.0)
    bn.bias.data.fill_(6.0)
    w, b = folded_conv.folded_params(conv, bn)
    assert w.item() == pytest.approx(5.0) and b.item() == pytest.approx(1.0)
    x = torch.tensor([[[[0.0, 1.0, -2.0]]]])
    with torch.no_grad():
        y = folded_conv.run_folded(nn.Sequential(conv, bn), x)
    torch.testing.assert_close(y, (2 * x + 1 - 3) / 2 * 5 + 6)
