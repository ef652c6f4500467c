"""Mamba-2 mixer and backbone: parallel pass vs step vs prefill, fused training path, sizes, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wmbench import create_backbone, list_backbones
from wmbench.backbones.mamba2 import Mamba2Mixer, mamba2


def _randomise(module):
    # non-trivial norm / D / conv bias so every term of the mixer is exercised
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".D") or name.endswith("conv1d.bias"):
                p.uniform_(-1.5, 1.5)


def _run_step(bb, x, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = bb.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@settings(max_examples=12, deadline=None)
@given(d_model=st.sampled_from([8, 16, 24]), headdim=st.sampled_from([4, 8]), d_state=st.integers(1, 6),
       ngroups=st.sampled_from([1, 2]), chunk=st.sampled_from([1, 3, 8, 64]), L=st.integers(1, 20),
       split=st.integers(0, 20), n_layers=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_forward_step_prefill_agree(d_model, headdim, d_state, ngroups, chunk, L, split, n_layers, seed):
    nheads = 2 * d_model // headdim
    if nheads % ngroups:
        ngroups = 1
    torch.manual_seed(seed)
    bb = mamba2(d_model, n_layers, d_state=d_state, headdim=headdim, ngroups=ngroups, chunk_size=chunk)
    _randomise(bb)
    x = torch.randn(2, L, d_model)
    with torch.no_grad():
        y = bb(x)
        y_step, _ = _run_step(bb, x, bb.init_state(2))
        k = min(split, L)
        state = bb.init_state(2)
        parts = []
        if k:
            y1, state = bb.prefill(x[:, :k], state)
            parts.append(y1)
        if k < L:
            # continue with a second prefill of part of the rest, then steps (chunked prefill, #641)
            m = k + (L - k) // 2
            if m > k:
                y2, state = bb.prefill(x[:, k:m], state)
                parts.append(y2)
            y3, state = _run_step(bb, x[:, m:], state)
            parts.append(y3)
        y_pre = torch.cat(parts, 1)
    assert y.shape == x.shape
    assert (y_step - y).abs().max() <= 1e-4
    assert (y_pre - y).abs().max() <= 1e-4


@pytest.mark.parametrize("opts,L", [
    (dict(d_state=5, headdim=4, chunk_size=4), 11),
    (dict(d_state=3, headdim=4, ngroups=2, chunk_size=5, dt_limit=(0.01, 0.05)), 13),
    (dict(d_state=4, headdim=8, chunk_size=16), 2),     # shorter than the conv
])
def test_fused_training_path_matches_composed_ops(opts, L):
    """forward() uses one fused autograd Function (hand-written backward); prefill uses ordinary
    autograd ops. Outputs and every gradient must agree (fp64)."""
    torch.manual_seed(0)
    m = Mamba2Mixer(16, **opts).double()
    _randomise(m)
    x = torch.randn(3, L, 16, dtype=torch.float64, requires_grad=True)
    y1 = m(x)
    y2, _ = m.prefill(x, m.init_state(3))
    assert (y1 - y2).abs().max() <= 1e-12
    g = torch.randn_like(y1)
    params = [x] + list(m.parameters())
    g1 = torch.autograd.grad((y1 * g).sum(), params)
    g2 = torch.autograd.grad((y2 * g).sum(), params)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, g1, g2):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item()), name


def test_state_shapes_and_step_is_constant_size():
    bb = mamba2(32, 2, d_state=4, headdim=16, chunk_size=8)
    state = bb.init_state(3)
    conv, ssm = state[0]
    assert conv.shape == (3, 64 + 2 * 4, 3) and ssm.shape == (3, 4, 16, 4) and ssm.dtype == torch.float32
    with torch.no_grad():
        _, state = bb.prefill(torch.randn(3, 10, 32), state)
        for _ in range(3):
            _, state = bb.step(torch.randn(3, 32), state)
    assert [tuple(t.shape) for t in state[0]] == [(3, 72, 3), (3, 4, 16, 4)]


def _mixer_params(d_model, d_state, headdim, expand=2, ngroups=1, d_conv=4):
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    return (d_model * (2 * d_inner + 2 * ngroups * d_state + nheads)    # in_proj
            + conv_dim * d_conv + conv_dim                                # depthwise conv + bias
            + 3 * nheads                                                  # A_log, dt_bias, D
            + d_inner                                                     # gated RMSNorm weight
            + d_inner * d_model)                                          # out_proj


def test_parameter_count_paper_configuration():
    # Drama / Mamba-2 paper: d 512, 2 layers, d_state 16, headdim 128, expand 2 -> 8 heads
    per_mixer = 512 * (2 * 1024 + 2 * 16 + 8) + (1056 * 4 + 1056) + 3 * 8 + 1024 + 1024 * 512
    assert per_mixer == _mixer_params(512, 16, 128) == 1_599_672
    m = Mamba2Mixer(512, d_state=16, headdim=128)
    assert sum(p.numel() for p in m.parameters()) == per_mixer
    bb = create_backbone("mamba2", d_model=512, n_layers=2)                # defaults = paper config
    assert bb.n_params == 2 * (per_mixer + 512) + 512                     # + block norms + final norm
    # the official Drama code uses headdim 64 (16 heads): 1,603,792 per mixer
    m64 = Mamba2Mixer(512, d_state=16, headdim=64)
    assert sum(p.numel() for p in m64.parameters()) == _mixer_params(512, 16, 64) == 1_603_792


def test_initialisation_and_no_weight_decay_flags():
    torch.manual_seed(0)
    m = Mamba2Mixer(256, headdim=16, dt_min=1e-3, dt_max=0.1)
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    A = torch.exp(m.A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert torch.equal(m.D, torch.ones(32))
    for p in (m.A_log, m.D, m.dt_bias):
        assert getattr(p, "_no_weight_decay", False)
    assert not getattr(m.in_proj.weight, "_no_weight_decay", False)
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None


@pytest.mark.parametrize("opts,match", [
    (dict(headdim=48), "multiple of headdim"),
    (dict(headdim=16, ngroups=3), "multiple of ngroups"),
    (dict(d_state=0), "d_state"),
    (dict(chunk_size=-1), "chunk_size"),
    (dict(kernel="triton"), "kernel"),
    (dict(dt_limit=(0.5, 0.1)), "dt_limit"),
    (dict(bogus=1), "unknown mamba2 option"),
])
def test_bad_sizes_raise_value_error(opts, match):
    with pytest.raises(ValueError, match=match):
        mamba2(64, 2, **opts)


def test_registered():
    assert "mamba2" in list_backbones()
    bb = create_backbone("mamba2", d_model=64, n_layers=1, headdim=32, d_state=8)
    assert bb.name == "mamba2" and bb.config["headdim"] == 32


def test_default_chunk_is_32_on_cpu_and_256_for_the_cuda_kernel_and_changes_nothing():
    torch.manual_seed(0)
    auto = mamba2(32, 2, headdim=16, d_state=8).double()
    mixer = auto.blocks[0].mixer
    x = torch.randn(2, 75, 32, dtype=torch.float64)
    assert mixer._chunk(x) == 32
    assert mixer._chunk(torch.empty(0, device="meta")) == 32       # not CUDA: the PyTorch path
    explicit = mamba2(32, 2, headdim=16, d_state=8, chunk_size=64).double()
    explicit.load_state_dict(auto.state_dict())
    xa, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, ye = auto(xa), explicit(xe)
    assert (ya - ye).abs().max() < 1e-10
    ya.square().sum().backward()
    ye.square().sum().backward()
    assert (xa.grad - xe.grad).abs().max() < 1e-10


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    bb = mamba2(64, 2, headdim=16, d_state=8, chunk_size=16)
    x = torch.randn(2, 40, 64)
    y32 = bb(x)
    xb = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = bb(xb)
    yb.float().sum().backward()
    assert torch.isfinite(xb.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bb.parameters())
    assert (yb.float() - y32).abs().max() < 0.1 * y32.abs().max()


def test_cuda_kernel_requested_on_cpu_is_an_error():
    bb = mamba2(16, 1, headdim=8, d_state=4, kernel="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        bb(torch.randn(1, 4, 16))
