"""Mamba-3 SISO (backbones/ops/mamba3.py) against a token-by-token recurrence written here from the paper."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import wmbench.backbones.ops.mamba3 as m3
from wmbench.backbones.ops.mamba3 import mamba3_siso, mamba3_siso_step
from wmbench.backbones.ops.ssd import ssd_chunked_reference

F64 = torch.float64


def naive_mamba3(x, dt, A, B, C, lam, theta=None, D=None, B_bias=None, C_bias=None, state=None):
    """The paper's recurrence, token by token, with the complex state written as complex numbers.

    alpha_t = exp(dt_t A_t), beta_t = (1 - lam_t) dt_t alpha_t, gamma_t = lam_t dt_t;
    Theta_t = Theta_{t-1} + theta_t; the pairs (2j, 2j+1) of B_t + b_B and C_t + b_C are complex numbers
    multiplied by exp(i Theta_t,j) (the other entries stay real): k_t and q_t;
    h_t = alpha_t h_{t-1} + beta_t x_{t-1} k_{t-1}^T + gamma_t x_t k_t^T;  y_t = h_t q_t + D x_t.
    Shapes as mamba3_siso; returns y and the state (Theta_L mod 2 pi, h_L, k_L, x_L).
    """
    b, T, h, p = x.shape
    g, n = B.shape[-2:]
    S = 0 if theta is None else theta.shape[-1]
    if state is None:
        state = (torch.zeros(b, h, S, dtype=x.dtype), torch.zeros(b, h, p, n, dtype=x.dtype),
                 torch.zeros(b, h, n, dtype=x.dtype), torch.zeros(b, h, p, dtype=x.dtype))
    Th, H, k_prev, x_prev = (s.clone() for s in state)
    ys = []
    for t in range(T):
        kq = []
        if S:
            Th = Th + theta[:, t]
        for M, bias in ((B, B_bias), (C, C_bias)):
            v = M[:, t].repeat_interleave(h // g, dim=1)                         # (b, h, n)
            if bias is not None:
                v = v + bias
            if S:
                z = torch.complex(v[..., 0:2 * S:2], v[..., 1:2 * S:2]) * torch.exp(1j * Th)
                v = torch.cat([torch.stack([z.real, z.imag], -1).flatten(-2), v[..., 2 * S:]], -1)
            kq.append(v)
        k, q = kq
        alpha = torch.exp(dt[:, t] * A[:, t])[..., None, None]
        beta = (1 - lam[:, t]) * dt[:, t]
        gamma = lam[:, t] * dt[:, t]
        H = (alpha * H + alpha * beta[..., None, None] * torch.einsum("bhp,bhn->bhpn", x_prev, k_prev)
             + gamma[..., None, None] * torch.einsum("bhp,bhn->bhpn", x[:, t], k))
        y = torch.einsum("bhpn,bhn->bhp", H, q)
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
        k_prev, x_prev = k, x[:, t]
    return torch.stack(ys, 1), (torch.remainder(Th, 2 * math.pi), H, k_prev, x_prev)


def make_inputs(b=2, t=13, h=4, g=2, p=3, n=6, S=2, seed=0, init=True, a_scale=1.0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)       # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=dtype)        # noqa: E731
    x = r(b, t, h, p)
    dt = u(b, t, h) * 0.5 + 0.02
    A = -(u(b, t, h) * 2 + 0.05) * a_scale
    B, C = r(b, t, g, n), r(b, t, g, n)
    lam = u(b, t, h)
    theta = r(b, t, h, S) if S else None
    D, B_bias, C_bias = r(h), r(h, n), r(h, n)
    state = (r(b, h, S) * 3, r(b, h, p, n), r(b, h, n), r(b, h, p)) if init else None
    return x, dt, A, B, C, lam, theta, D, B_bias, C_bias, state


def op(inputs, chunk):
    *args, state = inputs
    return mamba3_siso(*args, state=state, chunk_size=chunk)


def max_err(a, b):
    return (a - b).abs().max().item()


def state_err(s1, s2):
    # angles compare modulo 2 pi
    da = torch.remainder(s1[0] - s2[0] + math.pi, 2 * math.pi) - math.pi
    return max([da.abs().max().item() if da.numel() else 0.0] + [max_err(a, b) for a, b in zip(s1[1:], s2[1:])])


@pytest.mark.parametrize("chunk", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("t", [1, 8, 13])
def test_one_call_matches_naive(chunk, t):
    inputs = make_inputs(t=t, seed=chunk * 100 + t)
    y0, s0 = naive_mamba3(*inputs[:-1], state=inputs[-1])
    y1, s1 = op(inputs, chunk)
    assert y1.shape == y0.shape and y1.dtype == F64
    assert [s.shape for s in s1] == [s.shape for s in s0] and all(s.dtype == F64 for s in s1)
    assert max_err(y1, y0) <= 1e-6 and state_err(s1, s0) <= 1e-6


def test_zero_state_no_rotation_no_bias_no_D():
    x, dt, A, B, C, lam, *_ = make_inputs(t=10, S=0, init=False)
    y0, s0 = naive_mamba3(x, dt, A, B, C, lam)
    y1, s1 = mamba3_siso(x, dt, A, B, C, lam, chunk_size=4)
    assert max_err(y1, y0) <= 1e-6 and state_err(s1, s0) <= 1e-6
    assert s1[0].shape == (2, 4, 0)


@pytest.mark.parametrize("t1", [1, 5, 8, 12])
def test_two_calls_carry_the_state(t1):
    inputs = make_inputs(t=19, seed=t1)
    y0, s0 = naive_mamba3(*inputs[:-1], state=inputs[-1])
    seq = lambda lo, hi: [v[:, lo:hi] if v is not None and v.dim() >= 3 else v for v in inputs[:-1]]   # noqa: E731
    ya, sa = mamba3_siso(*seq(0, t1), state=inputs[-1], chunk_size=4)
    yb, sb = mamba3_siso(*seq(t1, 19), state=sa, chunk_size=4)
    assert max_err(torch.cat([ya, yb], 1), y0) <= 1e-6 and state_err(sb, s0) <= 1e-6


def test_step_matches_naive_and_chunked():
    inputs = make_inputs(t=17, seed=3)
    y0, s0 = naive_mamba3(*inputs[:-1], state=inputs[-1])
    state, ys = inputs[-1], []
    for t in range(17):
        args = [v[:, t] if v is not None and v.dim() >= 3 else v for v in inputs[:-1]]
        y_t, state = mamba3_siso_step(*args, state=state)
        assert y_t.shape == (2, 4, 3)
        ys.append(y_t)
    assert max_err(torch.stack(ys, 1), y0) <= 1e-6 and state_err(state, s0) <= 1e-6
    y1, s1 = op(inputs, 8)
    assert max_err(torch.stack(ys, 1), y1) <= 1e-6 and state_err(state, s1) <= 1e-6
    # in place: the same numbers, in the given tensors
    buf = tuple(s.clone() for s in inputs[-1])
    for t in range(17):
        args = [v[:, t] if v is not None and v.dim() >= 3 else v for v in inputs[:-1]]
        y_t, st_t = mamba3_siso_step(*args, state=buf, inplace=True)
        assert all(a is b for a, b in zip(st_t, buf))
        assert max_err(y_t, ys[t]) <= 1e-12
    assert state_err(buf, state) <= 1e-12
    with pytest.raises(ValueError):
        mamba3_siso_step(*args, state=tuple(s.float() for s in buf), inplace=True)


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_gradients_match_naive(chunk, strong, grads):
    x, dt, A, B, C, lam, theta, D, Bb, Cb, state = make_inputs(t=14, seed=7)
    if strong:                                                    # every other token decays by ~e^-20
        A = torch.where(torch.arange(14)[:, None] % 2 == 0, -20.0 / dt, A)
    inputs = (x, dt, A, B, C, lam, theta, D, Bb, Cb, *state)
    ref = grads(lambda *a: naive_mamba3(*a[:10], state=a[10:]), inputs)
    got = grads(lambda *a: mamba3_siso(*a[:10], state=a[10:], chunk_size=chunk), inputs)
    names = "x dt A B C lam theta D B_bias C_bias angle0 h0 k0 x0".split()
    for name, a, b in zip(names, ref, got):
        assert max_err(a, b) / a.abs().max().item() <= 1e-6, (chunk, name)


def test_gradients_odd_d_state(grads):
    # an odd d_state: two rotated pairs and one entry that stays put
    x, dt, A, B, C, lam, theta, D, Bb, Cb, state = make_inputs(t=9, n=5, S=2, seed=8)
    inputs = (x, dt, A, B, C, lam, theta, D, Bb, Cb, *state)
    ref = grads(lambda *a: naive_mamba3(*a[:10], state=a[10:]), inputs)
    got = grads(lambda *a: mamba3_siso(*a[:10], state=a[10:], chunk_size=4), inputs)
    for a, b in zip(ref, got):
        assert max_err(a, b) / a.abs().max().item() <= 1e-6


@pytest.mark.parametrize("n", [6, 5])
@pytest.mark.parametrize("heads_per_group", [1, 2, 3])
def test_head_groups(heads_per_group, n, grads, monkeypatch):
    """The scan works on groups of heads at a time; groups of 1, 2 and 3 of 4 heads (crossing the 2 B/C
    groups), for even and odd d_state, give the naive outputs and gradients."""
    inputs = make_inputs(b=2, t=11, h=4, g=2, n=n, S=2, seed=12)
    assert m3._groups(4, 2 * 11 * n * 8) == [(0, 4)]                  # the default: all heads at once here
    monkeypatch.setattr(m3, "GROUP_BYTES", heads_per_group * 2 * 11 * n * 8)
    assert len(m3._groups(4, 2 * 11 * n * 8)) == -(-4 // heads_per_group)
    x, dt, A, B, C, lam, theta, D, Bb, Cb, state = inputs
    flat = (x, dt, A, B, C, lam, theta, D, Bb, Cb, *state)
    ref = grads(lambda *a: naive_mamba3(*a[:10], state=a[10:]), flat)
    got = grads(lambda *a: mamba3_siso(*a[:10], state=a[10:], chunk_size=4), flat)
    for a, b in zip(ref, got):
        assert max_err(a, b) / a.abs().max().item() <= 1e-6
    y0, s0 = naive_mamba3(*inputs[:-1], state=inputs[-1])
    y1, s1 = op(inputs, 4)
    assert max_err(y1, y0) <= 1e-6 and state_err(s1, s0) <= 1e-6


@given(b=st.integers(1, 2), t=st.integers(1, 20), g=st.integers(1, 2), r=st.integers(1, 2), p=st.integers(1, 4),
       n=st.integers(1, 6), S=st.integers(0, 3), chunk=st.integers(1, 9), init=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_matches_naive(b, t, g, r, p, n, S, chunk, init, seed):
    S = min(S, n // 2)
    inputs = make_inputs(b=b, t=t, h=g * r, g=g, p=p, n=n, S=S, seed=seed, init=init, a_scale=3.0)
    y0, s0 = naive_mamba3(*inputs[:-1], state=inputs[-1])
    y1, s1 = op(inputs, chunk)
    assert max_err(y1, y0) <= 1e-6 and state_err(s1, s0) <= 1e-6


def test_lambda_one_is_mamba2_ssd():
    """lambda = 1, no rotation, no biases, A constant in time: the Mamba-2 recurrence (ops/ssd.py's oracle)."""
    x, dt, A, B, C, lam, *_ = make_inputs(t=21, S=0, init=False, seed=4)
    A_h = -torch.rand(4, dtype=F64) - 0.1
    y0, s0 = ssd_chunked_reference(x, dt, A_h, B, C, chunk_size=8, D=torch.ones(4, dtype=F64))
    y1, s1 = mamba3_siso(x, dt, A_h.expand_as(dt), B, C, torch.ones_like(lam), D=torch.ones(4, dtype=F64),
                         chunk_size=5)
    assert max_err(y1, y0) <= 1e-10 and max_err(s1[1], s0) <= 1e-10


def test_hand_made_two_tokens():
    """One head, p = 1, n = 2, one angle, B/C already with their biases, worked out by hand:

    y_1 = gamma_1 x_1 (q_1 . k_1) + D x_1 (the rotation cancels);
    y_2 = (alpha_2 gamma_1 + beta_2) x_1 (q_2 . k_1) + gamma_2 x_2 (q_2 . k_2) + D x_2, where
    q_2 . k_1 = c_2^T R(Theta_1 - Theta_2) b_1 = (1, 1) R(-pi/2) (1, 0)^T = (1, 1) . (0, -1) = -1 and
    q_2 . k_2 = c_2 . b_2 = (1, 1) . (3, 0) = 3; q_1 . k_1 = (2, 5) . (1, 0) = 2.
    """
    x = torch.tensor([2.0, -1.0], dtype=F64).view(1, 2, 1, 1)
    dt = torch.tensor([0.5, 0.25], dtype=F64).view(1, 2, 1)
    A = torch.tensor([-1.0, -2.0], dtype=F64).view(1, 2, 1)
    lam = torch.tensor([0.25, 0.75], dtype=F64).view(1, 2, 1)
    B = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=F64).view(1, 2, 1, 2)
    C = torch.tensor([[2.0, 5.0], [1.0, 1.0]], dtype=F64).view(1, 2, 1, 2)
    theta = torch.tensor([0.3, math.pi / 2], dtype=F64).view(1, 2, 1, 1)
    D = torch.tensor([0.5], dtype=F64)
    alpha2, beta2 = math.exp(0.25 * -2.0), 0.25 * 0.25 * math.exp(0.25 * -2.0)
    gamma1, gamma2 = 0.25 * 0.5, 0.75 * 0.25
    y1 = gamma1 * 2.0 * 2.0 + 0.5 * 2.0
    y2 = (alpha2 * gamma1 + beta2) * 2.0 * -1.0 + gamma2 * -1.0 * 3.0 + 0.5 * -1.0
    for chunk in (1, 2):
        y, _ = mamba3_siso(x, dt, A, B, C, lam, theta, D=D, chunk_size=chunk)
        assert max_err(y.flatten(), torch.tensor([y1, y2], dtype=F64)) <= 1e-12


def reference_quadratic_form(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, init=None):
    """How mamba-ssm 2.3.2's `mamba3_siso_fwd_ref` (tests/ops/triton/test_mamba3_siso.py) defines Mamba-3
    SISO, re-derived here for one batch row (no z gate). Its arguments are raw: Trap is the trapezoid
    logit (lambda = sigmoid(Trap)), Angles the raw angle projection; ADT = A dt and DT are (h, l).
      - cumulative angles Theta = cumsum(pi tanh(Angles) DT) (+ the entering angle), mod 2 pi;
      - Q, K get their per-head biases, then rotate the pairs (2j, 2j+1) by Theta (the rest unrotated);
      - scale_t = DT_t lambda_t + DT_{t+1} (1 - lambda_{t+1}), shifted_gamma_t = DT_{t+1} (1 - lambda_{t+1})
        (both with DT_{L+1} = 0);
      - out = [tril(Q K^T) o exp(segsum(ADT))] (scale o V) - shifted_gamma_t (Q_t . K_t) V_t + D V_t
        (Q_t . K_t taken before the rotation, which does not change it);
      - with an entering state (Theta_0, S_0, K_0, V_0): S_0 + DT_1 (1 - lambda_1) V_0 K_0^T, decayed by
        exp(cumsum ADT) and read by Q_t, is added to out.
    """
    l, h, n = Q.shape
    lam = torch.sigmoid(Trap)
    Th = torch.cumsum(math.pi * torch.tanh(Angles) * DT.T[..., None], 0)
    if init is not None:
        Th = Th + init[0]
    Th = torch.remainder(Th, 2 * math.pi)
    S = Th.shape[-1]

    def rotate(t):
        z = torch.complex(t[..., 0:2 * S:2], t[..., 1:2 * S:2]) * torch.exp(1j * Th)
        return torch.cat([torch.stack([z.real, z.imag], -1).flatten(-2), t[..., 2 * S:]], -1)

    Qb, Kb = Q + Q_bias, K + K_bias
    qk = (Qb * Kb).sum(-1)                                                # (l, h)
    Qr, Kr = rotate(Qb), rotate(Kb)
    DT_next = torch.cat([DT[:, 1:], torch.zeros(h, 1, dtype=DT.dtype)], 1)
    lam_next = torch.cat([lam[:, 1:], torch.zeros(h, 1, dtype=DT.dtype)], 1)
    shifted_gamma = DT_next * (1 - lam_next)
    scale = DT * lam + shifted_gamma                                      # (h, l)
    cs = torch.cumsum(ADT, -1)
    decay = torch.exp(cs[:, :, None] - cs[:, None, :]).tril()             # (h, t, s)
    att = torch.einsum("thn,shn->hts", Qr, Kr) * decay * scale[:, None, :]
    out = torch.einsum("hts,shp->thp", att, V) - V * (qk * shifted_gamma.T)[..., None] + D[:, None] * V
    if init is not None:
        S0 = init[1] + (DT[:, 0] * (1 - lam[:, 0]))[:, None, None] * init[3][:, :, None] * init[2][:, None, :]
        out = out + torch.einsum("hpn,thn,ht->thp", S0, Qr, torch.exp(cs))
    return out


@pytest.mark.parametrize("init", [False, True])
def test_matches_mamba_ssm_reference_definition(init):
    """Our op with the layer's activations applied == mamba-ssm's reference definition (raw arguments)."""
    gen = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)         # noqa: E731
    l, h, p, n, S = 9, 3, 2, 8, 2
    Q, K, V, Trap, Angles = r(l, h, n), r(l, h, n), r(l, h, p), r(h, l), r(l, h, S)
    DT = torch.nn.functional.softplus(r(h, l))
    ADT = -torch.rand(h, l, generator=gen, dtype=F64) * DT
    Q_bias, K_bias, D = r(h, n), r(h, n), r(h)
    state = (r(1, h, S), r(1, h, p, n), r(1, h, n), r(1, h, p)) if init else None
    ref = reference_quadratic_form(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D,
                                   init=[s[0] for s in state] if init else None)
    dt = DT.T[None]
    y, _ = mamba3_siso(V[None], dt, (ADT / DT).T[None], K[None], Q[None], torch.sigmoid(Trap).T[None],
                       math.pi * torch.tanh(Angles)[None] * dt[..., None], D=D, B_bias=K_bias, C_bias=Q_bias,
                       state=state, chunk_size=4)
    assert max_err(y[0], ref) <= 1e-10


def test_fp32_close_to_fp64_naive():
    inputs = make_inputs(b=1, t=150, h=2, g=1, p=8, n=16, S=4, seed=5)
    y0, s0 = naive_mamba3(*inputs[:-1], state=inputs[-1])
    f32 = [v.float() if isinstance(v, torch.Tensor) else v for v in inputs[:-1]]
    y1, s1 = mamba3_siso(*f32, state=tuple(s.float() for s in inputs[-1]), chunk_size=64)
    assert y1.dtype == torch.float32 and all(s.dtype == torch.float32 for s in s1)
    scale = y0.abs().max().item()
    assert max_err(y1.double(), y0) / scale <= 1e-5 and state_err(tuple(s.double() for s in s1), s0) <= 1e-4


def test_long_rotation_angles_keep_precision():
    # 2,000 tokens turning by ~1 rad each: Theta reaches ~2,000 rad, summed in fp64 and reduced mod 2 pi
    inputs = list(make_inputs(b=1, t=2000, h=1, g=1, p=2, n=4, S=2, seed=6, init=False))
    inputs[6] = inputs[6].abs() + 0.5
    f32 = [v.float() if isinstance(v, torch.Tensor) else v for v in inputs[:-1]]
    y1, s1 = mamba3_siso(*f32, chunk_size=64)
    state, ys = None, []
    for t in range(2000):
        y_t, state = mamba3_siso_step(*[v[:, t] if v is not None and v.dim() >= 3 else v for v in f32], state=state)
        ys.append(y_t)
    assert max_err(torch.stack(ys, 1), y1) <= 1e-4


def test_strong_decay_stays_finite():
    inputs = list(make_inputs(t=40, seed=8))
    inputs[2] = torch.where(torch.rand(inputs[2].shape, generator=torch.Generator().manual_seed(0)) < 0.5,
                            torch.full_like(inputs[2], -200.0), inputs[2])
    y0, s0 = naive_mamba3(*inputs[:-1], state=inputs[-1])
    f32 = [v.float().requires_grad_(True) if isinstance(v, torch.Tensor) else v for v in inputs[:-1]]
    st0 = tuple(s.float() for s in inputs[-1])
    y, s = mamba3_siso(*f32, state=st0, chunk_size=16)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in s)
    assert max_err(y.double(), y0) <= 1e-4
    gr = torch.autograd.grad(y.sum() + s[1].sum(), [v for v in f32 if isinstance(v, torch.Tensor)])
    assert all(torch.isfinite(t).all() for t in gr)


@pytest.mark.parametrize("t0", [1, 6, 8, 13])
def test_causal(t0):
    inputs, other = make_inputs(t=20, seed=9), make_inputs(t=20, seed=10)
    y, _ = op(inputs, 8)
    changed = [torch.cat([a[:, :t0], b[:, t0:]], 1) if a is not None and a.dim() >= 3 else a
               for a, b in zip(inputs[:-1], other[:-1])]
    y2, _ = mamba3_siso(*changed, state=inputs[-1], chunk_size=8)
    assert max_err(y2[:, :t0], y[:, :t0]) <= 1e-12
    assert max_err(y2[:, t0:], y[:, t0:]) > 1e-3


def test_inputs_not_modified_and_empty_sequence():
    inputs = make_inputs(t=9, seed=10)
    flat = [v for v in inputs[:-1] if v is not None] + list(inputs[-1])
    copies = [v.clone() for v in flat]
    op(inputs, 4)
    mamba3_siso_step(*[v[:, 0] if v is not None and v.dim() >= 3 else v for v in inputs[:-1]], state=inputs[-1])
    assert all(torch.equal(a, b) for a, b in zip(flat, copies))
    y, s = mamba3_siso(*[v[:, :0] if v is not None and v.dim() >= 3 else v for v in inputs[:-1]],
                       state=inputs[-1])
    assert y.shape == (2, 0, 4, 3) and all(torch.equal(a, b) for a, b in zip(s, inputs[-1]))


def test_bf16_autocast_keeps_fp32_state():
    inputs = [v.float() if isinstance(v, torch.Tensor) else v for v in make_inputs(t=20, seed=6, init=False)[:-1]]
    y32, s32 = mamba3_siso(*inputs, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb, sb = mamba3_siso(inputs[0].bfloat16(), *inputs[1:], chunk_size=8)
    assert yb.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in sb)
    assert max_err(yb.float(), y32) / y32.abs().max().item() < 0.05
