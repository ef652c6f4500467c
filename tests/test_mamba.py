"""The Mamba-1 backbone (backbones/mamba.py): official block layout and init, parallel == recurrent,
a token-by-token re-implementation of the block written here, parameter count, bad sizes."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import wmbench
from wmbench.backbones.mamba import MambaMixer


def naive_mixer(m: MambaMixer, x: torch.Tensor) -> torch.Tensor:
    """The official Mamba block step by step (selective_scan_ref semantics), from m's parameters."""
    Bsz, L, _ = x.shape
    xz = x @ m.in_proj.weight.t()
    xs, z = xz[..., :m.d_inner], xz[..., m.d_inner:]
    k = m.d_conv
    w = m.conv1d.weight[:, 0, :]                                     # (d_inner, k)
    xpad = F.pad(xs, (0, 0, k - 1, 0))                               # causal: k-1 zeros in front
    u = torch.stack([(xpad[:, t:t + k].transpose(1, 2) * w).sum(-1) for t in range(L)], 1) + m.conv1d.bias
    u = u * torch.sigmoid(u)
    proj = u @ m.x_proj.weight.t()
    dt, Bm, Cm = proj[..., :m.dt_rank], proj[..., m.dt_rank:m.dt_rank + m.d_state], proj[..., -m.d_state:]
    delta = torch.log1p(torch.exp(dt @ m.dt_proj.weight.t() + m.dt_proj.bias))
    A = -torch.exp(m.A_log)
    h = torch.zeros(Bsz, m.d_inner, m.d_state, dtype=x.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + m.D * u[:, t])
    y = torch.stack(ys, 1) * (z * torch.sigmoid(z))
    return y @ m.out_proj.weight.t()


def test_mixer_matches_naive_block_fp64():
    torch.manual_seed(0)
    m = MambaMixer(12, d_state=5, dt_rank=3, chunk_size=4).double()
    with torch.no_grad():
        m.A_log.add_(torch.randn_like(m.A_log) * 0.3)               # leave the S4D init
        m.D.add_(torch.randn_like(m.D))
    x = torch.randn(2, 17, 12, dtype=torch.float64)
    with torch.no_grad():
        err = (m(x) - naive_mixer(m, x)).abs().max().item()
    assert err <= 1e-10


@given(d_model=st.integers(2, 24), d_state=st.sampled_from([1, 4, 16]), d_conv=st.integers(1, 5),
       expand=st.sampled_from([1, 2, 3]), chunk=st.one_of(st.none(), st.integers(1, 9)),
       n_layers=st.integers(1, 2), B=st.integers(1, 3), L=st.integers(1, 30), data=st.data())
def test_forward_equals_step_and_prefill(d_model, d_state, d_conv, expand, chunk, n_layers, B, L, data,
                                         backbone_contract):
    split = data.draw(st.integers(1, L), label="split")
    split2 = data.draw(st.integers(split, L), label="split2")
    torch.manual_seed(data.draw(st.integers(0, 999), label="seed"))
    bb = wmbench.create_backbone("mamba", d_model=d_model, n_layers=n_layers, d_state=d_state, d_conv=d_conv,
                                 expand=expand, chunk_size=chunk).eval()
    with torch.no_grad():  # trained-looking parameters: larger Δ and a non-S4D A
        for blk in bb.blocks:
            blk.mixer.dt_proj.bias.add_(torch.rand_like(blk.mixer.dt_proj.bias) * 3)
            blk.mixer.A_log.add_(torch.randn_like(blk.mixer.A_log))
    backbone_contract(bb, torch.randn(B, L, d_model), split, split2)


def test_long_sequence_step_vs_forward_fp32():
    """A default-chunked pass (T = ⌈√150⌉ = 13, 12 chunks) vs prefill(61) + 89 single steps, fp32."""
    torch.manual_seed(1)
    bb = wmbench.create_backbone("mamba", d_model=32, n_layers=2).eval()
    x = torch.randn(2, 150, 32)
    with torch.no_grad():
        y = bb(x)
        state = bb.init_state(2)
        y_pre, state = bb.prefill(x[:, :61], state)
        ys = [y_pre]
        for t in range(61, 150):
            y_t, state = bb.step(x[:, t], state)
            ys.append(y_t[:, None])
    assert (torch.cat(ys, 1) - y).abs().max().item() <= 1e-4


def test_parameter_count_of_the_paper_configuration():
    """d_model 512, 2 layers, d_state 16, d_conv 4, expand 2, dt_rank 32. Per mixer (official count):
    in_proj 512*2048 + conv 1024*4+1024 + x_proj 1024*64 + dt_proj 32*1024+1024 + A_log 1024*16 + D 1024
    + out_proj 1024*512 = 1,694,720; plus 2 block RMSNorms and the final one (512 each)."""
    bb = wmbench.create_backbone("mamba", d_model=512, n_layers=2, d_state=16)
    per_mixer = [sum(p.numel() for p in blk.mixer.parameters()) for blk in bb.blocks]
    assert per_mixer == [1_694_720, 1_694_720]
    assert bb.n_params == 2 * 1_694_720 + 3 * 512 == 3_390_976


def test_official_initialisation():
    torch.manual_seed(0)
    m = MambaMixer(64, dt_min=1e-3, dt_max=0.1)
    n = m.d_state
    assert (m.d_inner, m.dt_rank, m.d_conv, n) == (128, 4, 4, 16)
    assert torch.allclose(-torch.exp(m.A_log), -torch.arange(1, n + 1.0).expand(128, n))  # S4D-real
    assert torch.equal(m.D.data, torch.ones(128))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.A_log.dtype == torch.float32
    dt = F.softplus(m.dt_proj.bias)                                  # inverse softplus of dt ~ logU
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert dt.log().std() > 0.5                                      # spread over the log range
    s = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= s and m.dt_proj.weight.abs().max() > 0.8 * s
    assert m.conv1d.weight.shape == (128, 1, 4) and m.conv1d.bias is not None
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.x_proj.bias is None
    # dt floor
    m2 = MambaMixer(16, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    assert torch.allclose(F.softplus(m2.dt_proj.bias), torch.full((32,), 1e-4), rtol=1e-3)


def test_state_shapes_and_dtypes():
    bb = wmbench.create_backbone("mamba", d_model=8, n_layers=2, d_state=4, d_conv=3)
    state = bb.init_state(3)
    for conv_state, ssm_state in state:
        assert conv_state.shape == (3, 16, 3) and ssm_state.shape == (3, 16, 4)
        assert ssm_state.dtype == torch.float32
    with torch.no_grad():
        _, state = bb.prefill(torch.randn(3, 5, 8), state)
        _, state = bb.step(torch.randn(3, 8), state)
    assert [tuple(s.shape) for cs in state for s in cs] == [(3, 16, 3), (3, 16, 4)] * 2


def test_bf16_autocast_keeps_fp32_states():
    torch.manual_seed(0)
    bb = wmbench.create_backbone("mamba", d_model=32, n_layers=2).eval()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        y32 = bb(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = bb(x)
            state = bb.init_state(2)
            _, state = bb.prefill(x[:, :30], state)
            for t in range(30, 40):
                y_t, state = bb.step(x[:, t], state)
    assert all(s.dtype == torch.float32 for _, s in state)
    assert torch.isfinite(y16).all()
    assert (y16.float() - y32).abs().max().item() <= 0.1 * y32.abs().max().item()
    assert (y_t.float() - y32[:, -1]).abs().max().item() <= 0.1 * y32.abs().max().item()
    # and it trains: gradients under autocast are finite
    bb.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bb(x).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in bb.parameters())


def test_gradients_through_prefill_state():
    """Truncated BPTT: the gradient reaches the state a prefill continues from."""
    torch.manual_seed(0)
    m = MambaMixer(4, d_state=3).double()
    conv_state, ssm_state = m.init_state(2)
    assert ssm_state.dtype == torch.float64
    conv_state = torch.randn_like(conv_state).requires_grad_()
    ssm_state = torch.randn_like(ssm_state).requires_grad_()
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c, s: m.prefill(x, (c, s))[0], (conv_state, ssm_state), fast_mode=True)


@pytest.mark.parametrize("opts,match", [
    ({"d_state": 0}, "d_state"), ({"d_conv": 0}, "d_conv"), ({"expand": 0}, "expand"),
    ({"expand": "2"}, "expand"), ({"dt_rank": 0}, "dt_rank"), ({"dt_rank": "big"}, "dt_rank"),
    ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min"), ({"dt_init": "zeros"}, "dt_init"),
    ({"chunk_size": 0}, "chunk_size"), ({"kernel": "triton"}, "kernel"), ({"d_sate": 16}, "d_sate"),
    ({"d_intermediate": -1}, "d_intermediate"), ({"dropout": 1.0}, "dropout"),
])
def test_bad_sizes_raise(opts, match):
    with pytest.raises(ValueError, match=match):
        wmbench.create_backbone("mamba", d_model=16, n_layers=2, **opts)


def test_bad_model_sizes_raise():
    with pytest.raises(ValueError):
        wmbench.create_backbone("mamba", d_model=0, n_layers=2)
    with pytest.raises(ValueError, match="d_model"):
        MambaMixer(0)


def test_kernel_cuda_needs_cuda_tensors():
    bb = wmbench.create_backbone("mamba", d_model=8, n_layers=1, kernel="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        bb(torch.randn(1, 4, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_torch_path_in_the_block():
    from wmbench.backbones.ops.cuda import load
    if load("mamba_ssm.ops.selective_scan_interface") is None:
        pytest.skip("mamba_ssm is not importable")
    torch.manual_seed(0)
    bb = wmbench.create_backbone("mamba", d_model=64, n_layers=2, kernel="cuda").cuda()
    x = torch.randn(2, 200, 64, device="cuda", requires_grad=True)
    y_cuda = bb(x)
    g_cuda = torch.autograd.grad(y_cuda.square().sum(), x)[0]
    for blk in bb.blocks:
        blk.mixer.kernel = "torch"
    y = bb(x)
    g = torch.autograd.grad(y.square().sum(), x)[0]
    assert (y_cuda - y).abs().max().item() <= 1e-3
    assert (g_cuda - g).abs().max().item() <= 1e-2 * (1 + g.abs().max().item())
