"""The chunkwise mLSTM (backbones/ops/mlstm.py) against a token-by-token recurrence written here.

The reference below follows the definition (xLSTM's stabilised mLSTM, scale on q as in mlstm_kernels'
native step) one token at a time in float64, and is differentiated by autograd.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmbench.backbones.ops.mlstm import mlstm, mlstm_step

F64 = torch.float64


def naive_mlstm(q, k, v, i_pre, f_pre, scale=None, state=None):
    """m_t = max(log f_t + m_{t-1}, i_t); C_t = f'_t C_{t-1} + i'_t k_t v_t^T; n_t likewise;
    h_t = C_t^T q~_t / max(|n_t . q~_t|, exp(-m_t)) with q~ = scale q.  q, k (b, T, h, K), v (b, T, h, V)."""
    b, T, h, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    if state is None:
        C = torch.zeros(b, h, K, v.shape[-1], dtype=q.dtype)
        n = torch.zeros(b, h, K, dtype=q.dtype)
        m = torch.full((b, h), -math.inf, dtype=q.dtype)
    else:
        C, n, m = state
    hs = []
    for t in range(T):
        logf = F.logsigmoid(f_pre[:, t])                                    # (b, h)
        m_new = torch.maximum(logf + m, i_pre[:, t])
        fg = torch.exp(logf + m - m_new)[..., None]
        ig = torch.exp(i_pre[:, t] - m_new)[..., None]
        C = fg[..., None] * C + ig[..., None] * torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        n = fg * n + ig * k[:, t]
        qt = q[:, t] * scale
        num = torch.einsum("bhkv,bhk->bhv", C, qt)
        den = torch.maximum((n * qt).sum(-1).abs(), torch.exp(-m_new))
        hs.append(num / den[..., None])
        m = m_new
    return torch.stack(hs, 1), (C, n, m)


def make_inputs(b=2, T=13, h=3, K=4, V=5, seed=0, dtype=F64, init=True, i_shift=0.0, f_shift=2.0, i_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)            # noqa: E731
    q, k, v = r(b, T, h, K), r(b, T, h, K), r(b, T, h, V)
    i_pre = r(b, T, h) * i_scale + i_shift
    f_pre = r(b, T, h) * 2 + f_shift
    state = (r(b, h, K, V), r(b, h, K), r(b, h)) if init else None
    return q, k, v, i_pre, f_pre, state


def max_err(a, b):
    return (a - b).abs().max().item()


def assert_close(out, ref, tol):
    (h, (C, n, m)), (h0, (C0, n0, m0)) = out, ref
    assert h.shape == h0.shape and C.shape == C0.shape and n.shape == n0.shape and m.shape == m0.shape
    for name, a, b in (("h", h, h0), ("C", C, C0), ("n", n, n0), ("m", m, m0)):
        assert max_err(a, b) <= tol * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 64])
@pytest.mark.parametrize("T", [1, 8, 16, 23])
def test_matches_naive_fp64(T, chunk, init):
    q, k, v, i, f, s0 = make_inputs(T=T, seed=T * 100 + chunk, init=init)
    assert_close(mlstm(q, k, v, i, f, state=s0, chunk_size=chunk), naive_mlstm(q, k, v, i, f, state=s0), 1e-9)


def test_custom_scale_and_shapes():
    q, k, v, i, f, s0 = make_inputs(T=10, K=6, V=3)
    out = mlstm(q, k, v, i, f, scale=0.7, state=s0, chunk_size=4)
    assert out[0].shape == (2, 10, 3, 3) and out[1][0].shape == (2, 3, 6, 3)
    assert_close(out, naive_mlstm(q, k, v, i, f, scale=0.7, state=s0), 1e-9)
    # an empty sequence returns the state it was given
    h, (C, n, m) = mlstm(q[:, :0], k[:, :0], v[:, :0], i[:, :0], f[:, :0], state=s0)
    assert h.shape == (2, 0, 3, 3) and torch.equal(C, s0[0]) and torch.equal(m, s0[2])


@pytest.mark.parametrize("init", [True, False])
def test_two_calls_carry_the_state(init):
    q, k, v, i, f, s0 = make_inputs(T=29, seed=1, init=init)
    ref = naive_mlstm(q, k, v, i, f, state=s0)
    one = mlstm(q, k, v, i, f, state=s0, chunk_size=8)
    for split in (5, 16):   # mid-chunk and on a chunk boundary
        a = mlstm(q[:, :split], k[:, :split], v[:, :split], i[:, :split], f[:, :split], state=s0, chunk_size=8)
        b = mlstm(q[:, split:], k[:, split:], v[:, split:], i[:, split:], f[:, split:], state=a[1], chunk_size=8)
        two = (torch.cat([a[0], b[0]], 1), b[1])
        assert_close(two, ref, 1e-9)
        assert_close(two, one, 1e-9)


@pytest.mark.parametrize("init", [True, False])
def test_step_matches_chunkwise(init):
    q, k, v, i, f, s0 = make_inputs(T=11, seed=2, init=init)
    hc, sc = mlstm(q, k, v, i, f, state=s0, chunk_size=4)
    state, hs = s0, []
    for t in range(q.shape[1]):
        h_t, state = mlstm_step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], state)
        hs.append(h_t)
    assert_close((torch.stack(hs, 1), state), (hc, sc), 1e-9)
    # prefill a prefix with the chunkwise form, then step: the states are interchangeable
    hp, state = mlstm(q[:, :6], k[:, :6], v[:, :6], i[:, :6], f[:, :6], state=s0, chunk_size=4)
    hs = [hp]
    for t in range(6, q.shape[1]):
        h_t, state = mlstm_step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], state)
        hs.append(h_t[:, None])
    assert_close((torch.cat(hs, 1), state), (hc, sc), 1e-9)


def test_step_fp32_and_bf16():
    q, k, v, i, f = (t[:, 0] for t in make_inputs(T=1, seed=9)[:5])
    h64, _ = mlstm_step(q, k, v, i, f, None)
    h32, (C, n, m) = mlstm_step(q.float(), k.float(), v.float(), i.float(), f.float(), None)
    assert h32.dtype == torch.float32 and C.dtype == n.dtype == m.dtype == torch.float32
    assert max_err(h32.double(), h64) <= 1e-5 * h64.abs().max()
    hb, (C, n, m) = mlstm_step(q.bfloat16(), k.bfloat16(), v.bfloat16(), i, f, None)
    assert hb.dtype == torch.bfloat16 and C.dtype == torch.float32


@pytest.mark.parametrize("init", [True, False])
def test_gradients_match_naive(init, grads):
    q, k, v, i, f, s0 = make_inputs(T=14, seed=3, init=init)
    inputs = [q, k, v, i, f] + (list(s0) if init else [])
    names = "q k v i_pre f_pre C0 n0 m0".split()

    def state_of(rest):
        return tuple(rest) if rest else None

    ref = grads(lambda q, k, v, i, f, *s: naive_mlstm(q, k, v, i, f, state=state_of(s)), inputs)
    for chunk in (3, 8, 14):
        got = grads(lambda q, k, v, i, f, *s: mlstm(q, k, v, i, f, state=state_of(s), chunk_size=chunk), inputs)
        for name, a, b in zip(names, ref, got):
            assert torch.isfinite(b).all(), (chunk, name)
            assert max_err(a, b) <= 1e-6 * a.abs().max().item(), (chunk, name)


def test_step_gradients_match_naive(grads):
    q, k, v, i, f, s0 = make_inputs(T=1, seed=4)
    inputs = [q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], *s0]
    ref = grads(lambda q, k, v, i, f, *s: (lambda h, st: (h[:, 0], st))(
        *naive_mlstm(q[:, None], k[:, None], v[:, None], i[:, None], f[:, None], state=s)), inputs)
    got = grads(lambda q, k, v, i, f, *s: mlstm_step(q, k, v, i, f, s), inputs)
    for a, b in zip(ref, got):
        assert max_err(a, b) <= 1e-9 * a.abs().max().item()


def test_fp32_close_to_fp64_on_a_long_sequence():
    q, k, v, i, f, s0 = make_inputs(b=1, T=300, h=2, K=8, V=8, seed=5)
    h64, (C64, n64, m64) = mlstm(q, k, v, i, f, state=s0)
    h32, (C32, n32, m32) = mlstm(*(t.float() for t in (q, k, v, i, f)), state=tuple(t.float() for t in s0))
    assert h32.dtype == torch.float32 and C32.dtype == torch.float32
    assert max_err(h32.double(), h64) / h64.abs().max() < 1e-4
    for a, b in ((C32, C64), (n32, n64), (m32, m64)):
        assert max_err(a.double(), b) / b.abs().max() < 1e-4


def test_bf16_inputs_give_bf16_output_and_fp32_state():
    q, k, v, i, f = (t.float() for t in make_inputs(T=40, seed=6, init=False)[:5])
    h32, s32 = mlstm(q, k, v, i, f, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hb, sb = mlstm(q.bfloat16(), k.bfloat16(), v.bfloat16(), i, f, chunk_size=16)
    assert hb.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in sb)
    assert max_err(hb.float(), h32) / h32.abs().max() < 0.05


@pytest.mark.parametrize("T, i_shift, f_shift, i_scale", [(150, 30.0, -30.0, 2.0), (37, 30.0, 30.0, 2.0),
                                                          (150, -30.0, -30.0, 2.0), (150, 0.0, -30.0, 30.0)])
def test_extreme_gates_are_finite_and_accurate(T, i_shift, f_shift, i_scale):
    # exp(30) overflows nothing: the stabiliser m absorbs it; fp32 still agrees with the fp64 recurrence,
    # also when log f = -30 makes the in-chunk cumulative sums large (-1000s) and i_pre spans +-60, so
    # that older tokens still count (the weights b_l - b_s + i_s must not lose digits to cancellation).
    # Without forgetting (f_pre = 30) n.q can come close to 0 as T grows: h grows and so does its fp32
    # rounding error, in the fp32 token-by-token recurrence as much as here, so that case stays short.
    q, k, v, i, f, _ = make_inputs(T=T, seed=7, init=False, i_shift=i_shift, f_shift=f_shift, i_scale=i_scale)
    h0, s0 = naive_mlstm(q, k, v, i, f)
    args = [t.float().requires_grad_(True) for t in (q, k, v, i, f)]
    h, s = mlstm(*args)
    (h.sum() + s[0].sum() + s[1].sum() + s[2].sum()).backward()
    assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in s)
    assert all(torch.isfinite(a.grad).all() for a in args)
    assert max_err(h.double(), h0) <= 1e-4 * max(1.0, h0.abs().max().item())
    # a state that went through extreme gates carries on exactly
    h2, _ = mlstm(*(t.float() for t in (q, k, v, i, f)), state=s)
    h2_0, _ = naive_mlstm(q, k, v, i, f, state=s0)
    assert max_err(h2.double(), h2_0) <= 1e-4 * max(1.0, h2_0.abs().max().item())


@given(b=st.integers(1, 2), T=st.integers(1, 20), h=st.integers(1, 2), K=st.integers(1, 5), V=st.integers(1, 5),
       chunk=st.integers(1, 9), init=st.booleans(), seed=st.integers(0, 2**16))
def test_property_matches_naive(b, T, h, K, V, chunk, init, seed):
    q, k, v, i, f, s0 = make_inputs(b, T, h, K, V, seed=seed, init=init)
    assert_close(mlstm(q, k, v, i, f, state=s0, chunk_size=chunk), naive_mlstm(q, k, v, i, f, state=s0), 1e-9)


def test_causality():
    q, k, v, i, f, s0 = make_inputs(T=20, seed=8)
    h, _ = mlstm(q, k, v, i, f, state=s0, chunk_size=8)
    t0 = 11                                                                 # mid-chunk
    bumped = [t.clone() for t in (q, k, v, i, f)]
    for t in bumped:
        t[:, t0:] += torch.randn_like(t[:, t0:]) * 3
    h2, _ = mlstm(*bumped, state=s0, chunk_size=8)
    assert torch.equal(h2[:, :t0], h[:, :t0])
    assert (h2[:, t0] - h[:, t0]).abs().max() > 1e-3
    # and through the gradient: h_t depends on no later input
    args = [t.clone().requires_grad_(True) for t in (q, k, v, i, f)]
    h, _ = mlstm(*args, state=s0, chunk_size=8)
    h[:, :t0].sum().backward()
    for a in args:
        assert (a.grad[:, t0:] == 0).all()
