"""RWKV-7's chunked op (backbones/ops/rwkv7.py) against a token-by-token recurrence written here in float64.

The reference is independent of the implementation: S_t = S_{t-1} (diag(exp w_t) + a_t b_t^T) + v_t k_t^T,
o_t = S_t r_t, one token at a time with einsum, differentiated by autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmbench.backbones.ops.rwkv7 import rwkv7, rwkv7_step

F64 = torch.float64


def naive_rwkv7(r, w, k, v, a, b, state=None):
    """r, w, k, a, b (B, T, H, K); v (B, T, H, V); state (B, H, V, K) -> o (B, T, H, V), final state."""
    Bsz, T, H, K = k.shape
    S = torch.zeros(Bsz, H, v.shape[-1], K, dtype=v.dtype) if state is None else state
    outs = []
    for t in range(T):
        # the (K, K) transition diag(exp w_t) + a_t b_t^T, per batch and head
        transition = torch.diag_embed(torch.exp(w[:, t])) + a[:, t, :, :, None] * b[:, t, :, None, :]
        S = torch.einsum("bhvi,bhij->bhvj", S, transition) + v[:, t, :, :, None] * k[:, t, :, None, :]
        outs.append(torch.einsum("bhvk,bhk->bhv", S, r[:, t]))
    return torch.stack(outs, 1), S


def make_inputs(B=2, T=13, H=2, K=8, V=4, kind="rwkv", w_min=-2.0, dtype=F64, seed=0, state=True):
    """kind="rwkv": a = -kappa_hat, b = kappa_hat * alpha (unit-norm kappa_hat, alpha in (0, 1)), a contraction
    as in RWKV-7; kind="general": independent random a, b of small norm. w uniform in (w_min, 0)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64)      # noqa: E731
    r, k, v = rnd(B, T, H, K), rnd(B, T, H, K) / K ** 0.5, rnd(B, T, H, V)
    w = torch.rand(B, T, H, K, generator=gen, dtype=F64) * w_min
    if kind == "rwkv":
        kappa = F.normalize(rnd(B, T, H, K), dim=-1)
        a, b = -kappa, kappa * torch.rand(B, T, H, K, generator=gen, dtype=F64)
    else:
        a, b = 0.3 * rnd(B, T, H, K) / K ** 0.5, 0.3 * rnd(B, T, H, K) / K ** 0.5
    S0 = rnd(B, H, V, K) if state else None
    cast = lambda x: None if x is None else x.to(dtype)              # noqa: E731
    return tuple(map(cast, (r, w, k, v, a, b))), cast(S0)


def max_err(x, y):
    return (x - y).abs().max().item()


# ----------------------------------------------------------------------------------------------
# forward against the naive recurrence
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rwkv", "general"])
@pytest.mark.parametrize("T", [1, 16, 23, 64])
@pytest.mark.parametrize("chunk", [1, 2, 8, 16, 64])
def test_matches_naive_fp64(kind, T, chunk):
    (r, w, k, v, a, b), S0 = make_inputs(T=T, kind=kind, seed=T * 100 + chunk)
    o0, S_ref = naive_rwkv7(r, w, k, v, a, b, S0)
    o, S = rwkv7(r, w, k, v, a, b, S0, chunk_size=chunk)
    assert o.shape == v.shape and o.dtype == F64 and S.shape == S0.shape and S.dtype == F64
    assert max_err(o, o0) <= 1e-6 and max_err(S, S_ref) <= 1e-6


def test_zero_state_by_default_and_shapes_with_K_ne_V():
    (r, w, k, v, a, b), _ = make_inputs(T=20, K=8, V=3, state=False)
    o0, S_ref = naive_rwkv7(r, w, k, v, a, b)
    o, S = rwkv7(r, w, k, v, a, b, chunk_size=8)
    assert S.shape == (2, 2, 3, 8)
    assert max_err(o, o0) <= 1e-6 and max_err(S, S_ref) <= 1e-6


@pytest.mark.parametrize("kind", ["rwkv", "general"])
@pytest.mark.parametrize("split", [1, 8, 13, 29])
def test_two_calls_carry_the_state(kind, split):
    (r, w, k, v, a, b), S0 = make_inputs(T=30, kind=kind, seed=split)
    xs = (r, w, k, v, a, b)
    o0, S_ref = naive_rwkv7(*xs, S0)
    o, S = rwkv7(*xs, S0, chunk_size=8)
    oa, Sa = rwkv7(*(x[:, :split] for x in xs), S0, chunk_size=8)
    ob, Sb = rwkv7(*(x[:, split:] for x in xs), Sa, chunk_size=8)
    o2 = torch.cat([oa, ob], 1)
    assert max_err(o2, o) <= 1e-6 and max_err(Sb, S) <= 1e-6
    assert max_err(o2, o0) <= 1e-6 and max_err(Sb, S_ref) <= 1e-6


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_step_matches_chunked(dtype, tol):
    (r, w, k, v, a, b), S0 = make_inputs(T=21, kind="rwkv", dtype=dtype, seed=3)
    o, S = rwkv7(r, w, k, v, a, b, S0, chunk_size=8)
    state, outs = S0, []
    for t in range(21):
        o_t, state = rwkv7_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        assert o_t.dtype == dtype and state.dtype == dtype
        outs.append(o_t)
    assert max_err(torch.stack(outs, 1), o) <= tol and max_err(state, S) <= tol


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rwkv", "general"])
@pytest.mark.parametrize("T,chunk", [(16, 8), (19, 4), (19, 16), (5, 64)])
def test_gradients_match_naive(kind, T, chunk, grads):
    (r, w, k, v, a, b), S0 = make_inputs(T=T, kind=kind, seed=T + chunk)
    inputs = (r, w, k, v, a, b, S0)
    ref = grads(naive_rwkv7, inputs)
    got = grads(lambda *x: rwkv7(*x, chunk_size=chunk), inputs)
    for name, g0, g1 in zip("r w k v a b state".split(), ref, got):
        assert max_err(g1, g0) <= 1e-6 * g0.abs().max().item(), name


# ----------------------------------------------------------------------------------------------
# precision and numerical range
# ----------------------------------------------------------------------------------------------

def test_fp32_close_to_fp64_on_a_long_sequence():
    # RWKV-7's own decay range: w = -0.6065 sigmoid(.) in (-0.61, 0)
    xs, S0 = make_inputs(B=1, T=300, H=2, K=16, V=8, w_min=-0.6065, seed=5)
    o64, S64 = rwkv7(*xs, S0)
    o32, S32 = rwkv7(*(x.float() for x in xs), S0.float())
    assert o32.dtype == torch.float32 and S32.dtype == torch.float32
    assert max_err(o32.double(), o64) <= 1e-4 * o64.abs().max().item()
    assert max_err(S32.double(), S64) <= 1e-4 * S64.abs().max().item()


def test_bf16_inputs_keep_a_float32_state():
    xs, S0 = make_inputs(T=40, seed=6)
    o32, S32 = rwkv7(*(x.float() for x in xs), S0.float(), chunk_size=16)
    ob, Sb = rwkv7(*(x.bfloat16() for x in xs), S0.float(), chunk_size=16)
    assert ob.dtype == torch.bfloat16 and Sb.dtype == torch.float32
    assert max_err(ob.float(), o32) <= 0.05 * o32.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):    # autocast must not lower the state math
        oa, Sa = rwkv7(*(x.float() for x in xs), S0.float(), chunk_size=16)
        o1, S1 = rwkv7_step(*(x[:, 0].float() for x in xs), S0.float())
    assert oa.dtype == torch.float32 and max_err(oa, o32) <= 1e-5 and max_err(Sa, S32) <= 1e-5
    assert o1.dtype == torch.float32 and max_err(o1, o32[:, 0]) <= 1e-5


@pytest.mark.parametrize("kind", ["rwkv", "general"])
@pytest.mark.parametrize("w_strong", [-20.0, -60.0])
def test_strong_decay_is_finite_and_exact(kind, w_strong, grads):
    # w = -20 per step on half the channels and tokens, next to slow ones: exp(20 * chunk) would overflow
    (r, w, k, v, a, b), S0 = make_inputs(T=70, K=8, kind=kind, w_min=-0.5, seed=7)
    strong = torch.rand(w.shape, generator=torch.Generator().manual_seed(8), dtype=F64) < 0.5
    w = torch.where(strong, torch.full_like(w, w_strong), w)
    inputs = (r, w, k, v, a, b, S0)
    o0, S_ref = naive_rwkv7(*inputs)
    o64, S64 = rwkv7(*inputs, chunk_size=64)
    assert max_err(o64, o0) <= 1e-6 and max_err(S64, S_ref) <= 1e-6
    o32, S32 = rwkv7(*(x.float() for x in inputs), chunk_size=64)
    assert max_err(o32.double(), o0) <= 1e-4 * o0.abs().max().item()
    assert max_err(S32.double(), S_ref) <= 1e-4 * S_ref.abs().max().item()
    # gradients: float64 exact, float32 finite and close
    ref = grads(naive_rwkv7, inputs)
    g64 = grads(lambda *x: rwkv7(*x, chunk_size=64), inputs)
    g32 = grads(lambda *x: rwkv7(*x, chunk_size=64), [x.float() for x in inputs])
    for name, g0, g1, g2 in zip("r w k v a b state".split(), ref, g64, g32):
        scale = g0.abs().max().item()
        assert max_err(g1, g0) <= 1e-6 * scale, name
        assert torch.isfinite(g2).all() and max_err(g2.double(), g0) <= 1e-4 * scale, name


# ----------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------

@given(B=st.integers(1, 2), T=st.integers(1, 40), H=st.integers(1, 3), K=st.sampled_from([1, 2, 5, 8]),
       V=st.sampled_from([1, 3, 8]), chunk=st.sampled_from([1, 2, 4, 8, 16, 32]),
       kind=st.sampled_from(["rwkv", "general"]), w_min=st.sampled_from([-0.61, -3.0, -80.0]),
       state=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_matches_naive(B, T, H, K, V, chunk, kind, w_min, state, seed):
    xs, S0 = make_inputs(B, T, H, K, V, kind=kind, w_min=w_min, seed=seed, state=state)
    o0, S_ref = naive_rwkv7(*xs, S0)
    o, S = rwkv7(*xs, S0, chunk_size=chunk)
    assert o.shape == (B, T, H, V) and S.shape == (B, H, V, K)
    assert max_err(o, o0) <= 1e-6 and max_err(S, S_ref) <= 1e-6


@pytest.mark.parametrize("chunk", [4, 64])
def test_causal(chunk):
    xs, S0 = make_inputs(T=24, seed=9)
    o, _ = rwkv7(*xs, S0, chunk_size=chunk)
    t0 = 10
    gen = torch.Generator().manual_seed(10)
    changed = [torch.cat([x[:, :t0], torch.randn(x[:, t0:].shape, generator=gen, dtype=F64)], 1) for x in xs]
    changed[1] = -changed[1].abs()                                     # keep w a log decay
    o2, _ = rwkv7(*changed, S0, chunk_size=chunk)
    # equal up to rounding (a later w moves the chunk's reference token, which cancels mathematically)
    assert max_err(o2[:, :t0], o[:, :t0]) <= 1e-12
    assert max_err(o2[:, t0:], o[:, t0:]) > 1e-3
    # and no gradient flows from an output to a later input
    ins = [x.clone().requires_grad_(True) for x in xs]
    o, _ = rwkv7(*ins, S0, chunk_size=chunk)
    for x, g in zip(ins, torch.autograd.grad(o[:, t0].sum(), ins)):
        assert g[:, t0 + 1:].abs().max() <= 1e-12 * g.abs().max()


def test_inputs_unmodified_and_empty_sequence():
    xs, S0 = make_inputs(T=9, seed=11)
    copies = [x.clone() for x in (*xs, S0)]
    rwkv7(*xs, S0, chunk_size=4)
    assert all(torch.equal(x, c) for x, c in zip((*xs, S0), copies))
    o, S = rwkv7(*(x[:, :0] for x in xs), S0)
    assert o.shape == (2, 0, 2, 4) and torch.equal(S, S0)


def test_chunk_size_must_be_a_power_of_two():
    xs, _ = make_inputs(T=5)
    with pytest.raises(ValueError, match="power of two"):
        rwkv7(*xs, chunk_size=12)
