"""The memory-lean conv stack (BN -> SiLU -> Conv as one autograd node) against plain autograd."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from wmbench.world_model import WorldModel, get_preset, lean_conv, space_to_depth
from wmbench.world_model.networks import Decoder, Encoder


def _plain(monkeypatch):
    monkeypatch.setattr(lean_conv, "usable", lambda x, m: False)


def _pair(cfg):
    torch.manual_seed(0)
    enc = Encoder(cfg)
    dec = Decoder(cfg, enc.out_shape)
    return enc, dec


def _run(enc, dec, x, bf16: bool = False):
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        feats = enc(x)
        proj = torch.Generator().manual_seed(2)
        z = torch.tanh(feats @ torch.randn(feats.shape[1], dec.fc.in_features, generator=proj))
        out = dec(z)
        loss = (out.float() - x).pow(2).sum() + feats.float().square().mean()
    loss.backward()
    return loss.detach(), out.detach()


def _biases_before_batchnorm(module: torch.nn.Module) -> set:
    """Names of the conv biases that a BatchNorm2d follows in `module.net` (their exact gradient is 0)."""
    net = list(module.net)
    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    return {f"net.{i}.bias" for i, m in enumerate(net[:-1])
            if isinstance(m, convs) and isinstance(net[i + 1], torch.nn.BatchNorm2d)}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("preset", ["tiny", "cpu", "XS"])
def test_lean_stack_equals_plain_autograd(preset, bf16, monkeypatch):
    cfg = get_preset(preset)
    cfg.enc_filters = tuple(min(f, 16) for f in cfg.enc_filters)  # narrow: the test is about the wiring
    lean = _pair(cfg)
    plain = copy.deepcopy(lean)
    torch.manual_seed(1)
    s = cfg.image_size // cfg.obs_pool
    x = torch.rand(6, cfg.image_channels, s, s).contiguous(memory_format=torch.channels_last)
    loss_lean, out_lean = _run(*lean, x, bf16)
    with monkeypatch.context() as m:
        _plain(m)
        loss_plain, out_plain = _run(*plain, x, bf16)
    assert out_lean.dtype == (torch.bfloat16 if bf16 else torch.float32)
    # the same ATen kernels forward, except the XS decoder's last layer on 2 x 2 blocks (space_to_depth.py):
    # equal up to float rounding
    torch.testing.assert_close(out_lean, out_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_lean, loss_plain, rtol=1e-6, atol=0.0)
    for part, a, b in (("encoder", lean[0], plain[0]), ("decoder", lean[1], plain[1])):
        noise = _biases_before_batchnorm(a)
        scale = max(q.grad.abs().max().item() for q in b.parameters())
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            # a conv bias that BatchNorm follows has gradient 0 exactly (BN removes any per-channel shift):
            # both sides hold float-rounding noise, which the lean stack's own bias sum rounds differently
            # else float rounding: the XS decoder's last layer runs its forward on 2 x 2 blocks, which moves
            # its output by ~1e-7 and every gradient by up to ~3e-6 of its tensor's largest entry
            atol = 1e-3 * scale if name in noise else 1e-5 * q.grad.abs().max().item() + 1e-6
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=atol, msg=f"{part} {name}")
    for (name, b), c in zip(list(lean[0].named_buffers()) + list(lean[1].named_buffers()),
                            list(plain[0].buffers()) + list(plain[1].buffers())):
        assert torch.equal(b, c), name                  # running statistics and batch counters


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_world_model_updates_match_plain_autograd(amp, monkeypatch):
    """Three optimiser steps of the world model: the same losses to 1e-5 with and without the lean stack,
    in fp32 and under the agent's bf16 autocast."""
    from wmbench.agent.estimate import random_batches
    cfg = get_preset("tiny", amp=amp)
    torch.manual_seed(0)
    wm_lean = WorldModel(cfg, 6)
    wm_plain = copy.deepcopy(wm_lean)
    batches = [random_batches(cfg, (cfg.image_size, cfg.image_size, cfg.image_channels), 6, 1.0)[0]
               for _ in range(3)]
    calls = []
    real = lean_conv.run_stack
    monkeypatch.setattr(lean_conv, "run_stack", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(5)
    lean = [wm_lean.train_step(b) for b in batches]
    assert calls, "the lean stack was not used"
    with monkeypatch.context() as m:
        _plain(m)
        torch.manual_seed(5)
        plain = [wm_plain.train_step(b) for b in batches]
    for a, b in zip(lean, plain):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_lean_stack_keeps_one_tensor_per_layer(bf16):
    """What autograd keeps for backward: about a third of the plain stack's activations (under autocast
    too, where both keep bf16 tensors)."""
    cfg = get_preset("XS")
    enc, dec = _pair(cfg)
    x = torch.rand(8, 3, 64, 64)

    def saved_bytes(fn):
        total = [0]

        def pack(t):   # activations only (parameters are kept either way)
            if t.dim() == 4 and t.shape[0] == x.shape[0]:
                total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total[0]
    lean = saved_bytes(lambda: _run(enc, dec, x, bf16))
    with pytest.MonkeyPatch.context() as m:
        _plain(m)
        plain = saved_bytes(lambda: _run(enc, dec, x, bf16))
    assert lean < 0.4 * plain, (lean, plain)


def test_eval_and_no_grad_take_the_plain_modules():
    cfg = get_preset("tiny")
    enc, _ = _pair(cfg)
    x = torch.rand(2, cfg.image_channels, cfg.image_size // cfg.obs_pool, cfg.image_size // cfg.obs_pool)
    assert lean_conv.usable(x, enc)
    with torch.no_grad():
        assert not lean_conv.usable(x, enc)
    enc.eval()
    assert not lean_conv.usable(x, enc)
    enc.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lean_conv.usable(x, enc)                 # bf16 autocast: served, in bf16
    with torch.autocast("cpu", dtype=torch.float16):
        assert not lean_conv.usable(x, enc)
    assert not lean_conv.usable(x.double(), enc)


def test_first_encoder_layer_keeps_the_frames_not_its_conv_output(monkeypatch):
    """The encoder's first block keeps its 16-channel conv output out of autograd's saved tensors (the frames,
    which the conv's weight gradient keeps anyway, are enough to recompute it): the saved bytes drop by
    that output's size, less the conv bias now kept for the recomputation (saved-tensor hooks)."""
    cfg = get_preset("XS")
    torch.manual_seed(0)
    enc = Encoder(cfg)
    x = torch.rand(4, cfg.image_channels, cfg.image_size, cfg.image_size)

    def saved_bytes(recompute: bool) -> int:
        monkeypatch.setattr(lean_conv, "RECOMPUTE_FIRST", recompute)
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            enc(x).sum()
        return sum(seen.values())

    conv1_out = 4 * cfg.enc_filters[0] * cfg.image_size ** 2 * 4        # stride 1 at XS: full resolution
    assert cfg.enc_strides[0] == 1
    saved_plain, saved_lean = saved_bytes(False), saved_bytes(True)
    assert saved_plain - saved_lean == conv1_out - enc.net[0].bias.numel() * 4



def test_model_flops_counts_what_the_plain_stack_computes(monkeypatch):
    """Inside lean_conv.model_flops() the FLOP counter sees the model's FLOPs: neither the recomputed
    first conv nor the zero taps of the decoder's last layer on 2 x 2 blocks (both used at XS)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = get_preset("XS")
    cfg.enc_filters = tuple(min(f, 16) for f in cfg.enc_filters)
    enc, dec = _pair(cfg)
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)

    def flops(lean: bool, counting: bool) -> int:
        with monkeypatch.context() as m:
            if not lean:
                _plain(m)
            with lean_conv.model_flops() if counting else contextlib.nullcontext(), \
                    FlopCounterMode(display=False) as fc:
                _run(enc, dec, x)
        return fc.get_total_flops()
    model = flops(lean=False, counting=False)
    assert flops(lean=True, counting=True) == model
    assert flops(lean=True, counting=False) > model      # the recomputation and the zero taps, when running
    assert lean_conv.RECOMPUTE_FIRST and space_to_depth.ENABLED   # restored after the block
