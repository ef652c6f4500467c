"""The Mamba-3 (SISO) backbone: the contract, a naive float64 mixer written from the equations, options, sizes."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import wmbench
import wmbench.backbones.mamba3  # noqa: F401  (registers "mamba3")
from wmbench.backbones.mamba3 import Mamba3Mixer, default_headdim

F64 = torch.float64


def naive_mixer(m: Mamba3Mixer, u: torch.Tensor) -> torch.Tensor:
    """Mamba3Mixer's equations, one token at a time, from its parameters (float64 in, float64 out).

    [z, x, B, C, dd_dt, dd_A, trap, ang] = W_in u_t; dt = softplus(dd_dt + dt_bias); A = -max(f(dd_A), A_floor)
    with f(v) = 1 + v (v >= 0), 1 / (1 - v) (v < 0); lambda = sigmoid(trap); Theta += pi tanh(ang) dt;
    k = R(Theta)(rmsnorm(B) w_B + B_bias), q likewise (pairs (2j, 2j+1) as complex numbers times exp(i Theta));
    h = alpha h + beta x_prev k_prev^T + gamma x k^T; y = h q + D x; out = W_out (y * silu(z)), or with the
    output norm W_out (rmsnorm_head(y) w * silu(z)).
    """
    Bsz, L, _ = u.shape
    H, P, G, N, S = m.nheads, m.headdim, m.ngroups, m.d_state, m.n_angles
    r = H // G
    Th = torch.zeros(Bsz, H, S, dtype=F64)
    h = torch.zeros(Bsz, H, P, N, dtype=F64)
    k_prev = torch.zeros(Bsz, H, N, dtype=F64)
    x_prev = torch.zeros(Bsz, H, P, dtype=F64)

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    outs = []
    for t in range(L):
        proj = u[:, t] @ m.in_proj.weight.T
        z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(proj, m._sizes, dim=-1)
        dt = torch.log1p(torch.exp(dd_dt + m.dt_bias))                          # (B, H)
        f = torch.where(dd_A >= 0, 1 + dd_A, 1 / (1 - dd_A))
        A = -torch.maximum(f, torch.full_like(f, m.A_floor))
        lam = 1 / (1 + torch.exp(-trap))
        Th = Th + math.pi * torch.tanh(ang)[:, None, :] * dt[..., None]
        kq = []
        for M, w, bias in ((B, m.B_norm.weight, m.B_bias), (C, m.C_norm.weight, m.C_bias)):
            v = rms(M.view(Bsz, G, N), w)
            v = torch.stack([v[:, gi] for gi in range(G) for _ in range(r)], 1) + bias[:, 0]   # (B, H, N)
            zc = torch.complex(v[..., 0:2 * S:2], v[..., 1:2 * S:2]) * torch.exp(1j * Th)
            kq.append(torch.cat([torch.stack([zc.real, zc.imag], -1).flatten(-2), v[..., 2 * S:]], -1))
        k, q = kq
        x = x.view(Bsz, H, P)
        alpha = torch.exp(dt * A)
        beta = (1 - lam) * dt * alpha
        gamma = lam * dt
        h = (alpha[..., None, None] * h + beta[..., None, None] * x_prev[..., :, None] * k_prev[..., None, :]
             + gamma[..., None, None] * x[..., :, None] * k[..., None, :])
        y = (h * q[:, :, None, :]).sum(-1) + m.D[:, None] * x                   # (B, H, P)
        if m.norm is not None:
            y = (y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * m.norm.weight
        else:
            y = y.flatten(-2)
        y = y * z * torch.sigmoid(z)
        outs.append(y @ m.out_proj.weight.T)
        k_prev, x_prev = k, x
    return torch.stack(outs, 1)


@pytest.mark.parametrize("d_model, opts", [
    (8, {}),                                                            # mamba-ssm's defaults (d_state 128)
    (12, dict(d_state=8, headdim=6, ngroups=2, rope_fraction=1.0, chunk_size=4)),
    (8, dict(d_state=6, headdim=4, outproj_norm=True, chunk_size=3)),
    (6, dict(d_state=5, headdim=3, chunk_size=2)),                      # odd d_state
])
def test_forward_matches_naive_mixer(d_model, opts):
    torch.manual_seed(0)
    m = Mamba3Mixer(d_model, kernel="torch", **opts).double()
    with torch.no_grad():   # move every parameter off its init so that each one matters
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    u = torch.randn(2, 13, d_model, dtype=F64)
    with torch.no_grad():
        y = m(u)
        y0 = naive_mixer(m, u)
        assert (y - y0).abs().max().item() <= 1e-10
        # and the recurrent paths, in float64
        state = m.init_state(2)
        assert all(s.dtype == F64 for s in state)
        ya, state = m.prefill(u[:, :5], state)
        ys = [ya] + [m.step(u[:, t], state)[0][:, None] for t in range(5, 13)]
        assert (torch.cat(ys, 1) - y0).abs().max().item() <= 1e-10


@st.composite
def mamba3_sizes(draw):
    d_model = draw(st.integers(2, 12))
    d_inner = 2 * d_model
    k = draw(st.sampled_from([k for k in (1, 2, 3, 4) if d_inner % k == 0]))     # heads
    opts = dict(headdim=d_inner // k, ngroups=draw(st.sampled_from([g for g in (1, 2) if k % g == 0])),
                d_state=draw(st.sampled_from([4, 6, 8])), rope_fraction=draw(st.sampled_from([0.5, 1.0])),
                chunk_size=draw(st.sampled_from([None, 2, 4, 8])), outproj_norm=draw(st.booleans()))
    return d_model, opts


@given(data=st.data())
def test_contract(data, backbone_contract):
    d_model, opts = data.draw(mamba3_sizes(), label="d_model, options")
    n_layers = data.draw(st.integers(1, 2), label="n_layers")
    B = data.draw(st.integers(1, 3), label="batch")
    L = data.draw(st.integers(1, 19), label="length")
    split = data.draw(st.integers(1, L), label="split")
    split2 = data.draw(st.integers(split, L), label="split2")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    bb = wmbench.create_backbone("mamba3", d_model, n_layers, dropout=0.1, **opts).eval()
    backbone_contract(bb, torch.randn(B, L, d_model), split, split2)


@pytest.mark.parametrize("d_model", [2, 3, 5, 16])
def test_contract_with_defaults(d_model, backbone_contract):
    torch.manual_seed(d_model)
    bb = wmbench.create_backbone("mamba3", d_model, 2).eval()
    backbone_contract(bb, torch.randn(2, 70, d_model), 33, 65)     # chunks of 64 and a remainder


def test_causal():
    torch.manual_seed(1)
    bb = wmbench.create_backbone("mamba3", 8, 2, d_state=8, headdim=4, chunk_size=4).eval()
    x = torch.randn(2, 15, 8)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(2, 6, 8)
    with torch.no_grad():
        y, y2 = bb(x), bb(x2)
    assert torch.equal(y[:, :9], y2[:, :9])
    assert (y[:, 9:] - y2[:, 9:]).abs().max() > 1e-3


@pytest.mark.parametrize("opts", [{}, dict(outproj_norm=True, ngroups=2, headdim=4, d_state=8, chunk_size=4)])
def test_gradients_reach_every_parameter(opts):
    torch.manual_seed(2)
    bb = wmbench.create_backbone("mamba3", 16, 2, **opts).train()
    x = torch.randn(2, 11, 16, requires_grad=True)
    y = bb(x)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in bb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("opts", [
    dict(headdim=5),                       # d_inner 16 is no multiple of 5
    dict(headdim=4, ngroups=3),            # 4 heads, 3 groups
    dict(d_state=3),                       # no rotation angle at rope_fraction 0.5
    dict(d_state=1, rope_fraction=1.0),
    dict(rope_fraction=0.25),
    dict(d_state=0), dict(expand=0), dict(headdim=0), dict(ngroups=0), dict(chunk_size=0),
    dict(dt_min=0.0), dict(dt_min=0.2, dt_max=0.1), dict(A_floor=0.0), dict(dt_init_floor=-1.0),
    dict(outproj_norm="yes"),
    dict(conv_kernel=4),                   # unknown option (Mamba-3 has no short convolution)
    dict(kernel="triton"),
])
def test_bad_options_raise(opts):
    with pytest.raises(ValueError) as e:
        wmbench.create_backbone("mamba3", 8, 1, **opts)
    assert "\n" not in str(e.value)


def test_kernel_cuda_on_cpu_is_an_error():
    bb = wmbench.create_backbone("mamba3", 8, 1, kernel="cuda")
    with pytest.raises(RuntimeError):
        bb(torch.randn(1, 3, 8))


# (d_model, n_layers, Mamba-2's count, its d_state and headdim there)
SIZES = [(32, 1, 7_324, 8, 16), (64, 2, 56_368, 16, 16), (128, 1, 105_400, 16, 32), (512, 2, 3_200_880, 16, 128)]


@pytest.mark.parametrize("d_model, n_layers, count, d_state, headdim", SIZES)
def test_parameter_count_matches_mamba2(d_model, n_layers, count, d_state, headdim):
    m2 = wmbench.create_backbone("mamba2", d_model, n_layers, d_state=d_state, headdim=headdim)
    m3 = wmbench.create_backbone("mamba3", d_model, n_layers, d_state=d_state, headdim=headdim)
    assert m2.n_params == count
    assert abs(m3.n_params / count - 1) <= 0.10, m3.n_params


def test_parameter_count_formula():
    d, n_layers, N, P = 64, 2, 16, 16
    bb = wmbench.create_backbone("mamba3", d, n_layers, d_state=N, headdim=P)
    d_inner, H, S = 2 * d, 2 * d // P, N // 4
    mixer = d * (2 * d_inner + 2 * N + 3 * H + S) + d_inner * d + 2 * H * N + 2 * N + 2 * H
    assert bb.n_params == n_layers * (mixer + d) + d


def test_defaults_follow_mamba_ssm_and_every_d_model_builds():
    m = Mamba3Mixer(512)
    assert (m.d_inner, m.headdim, m.nheads, m.d_state, m.n_angles) == (1024, 64, 16, 128, 32)
    assert m.in_proj.weight.shape == (2 * 1024 + 2 * 128 + 3 * 16 + 32, 512)
    assert torch.equal(m.B_bias, torch.ones(16, 1, 128)) and torch.equal(m.C_bias, torch.ones(16, 1, 128))
    assert torch.equal(m.D, torch.ones(16)) and m.norm is None
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert [default_headdim(2 * d) for d in (1, 2, 5, 32, 40, 48, 512)] == [2, 4, 10, 64, 40, 48, 64]
    for d_model in range(2, 70):
        wmbench.create_backbone("mamba3", d_model, 1)


def test_state_shapes_and_in_place_prefill():
    bb = wmbench.create_backbone("mamba3", 16, 2, d_state=8, headdim=8).eval()
    state = bb.init_state(3, max_len=10)
    shapes = [(3, 4, 2), (3, 4, 8, 8), (3, 4, 8), (3, 4, 8)]
    assert all([tuple(s.shape) for s in layer] == shapes and all(s.dtype == torch.float32 for s in layer)
               for layer in state)
    with torch.no_grad():
        _, new = bb.prefill(torch.randn(3, 5, 16), state)
        assert all(a is b for la, lb in zip(state, new) for a, b in zip(la, lb))   # updated in place
        _, new = bb.step(torch.randn(3, 16), state)
        assert all(a is b for la, lb in zip(state, new) for a, b in zip(la, lb))


def test_bf16_autocast_runs_and_keeps_fp32_state():
    torch.manual_seed(3)
    bb = wmbench.create_backbone("mamba3", 16, 1, d_state=8, headdim=8).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        y = bb(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = bb(x)
            state = bb.init_state(2)
            _, state = bb.prefill(x[:, :4], state)
            y_t, state = bb.step(x[:, 4], state)
    assert torch.isfinite(yb).all() and torch.isfinite(y_t).all()
    assert (yb.float() - y).abs().max() / y.abs().max() < 0.1
    assert all(s.dtype == torch.float32 for s in state[0])
