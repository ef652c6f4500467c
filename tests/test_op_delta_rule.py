"""The gated delta rule (backbones/ops/delta_rule.py) against a token-by-token recurrence written here."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmbench.backbones.ops.delta_rule import gated_delta_rule, gated_delta_rule_step, unit_lower_inverse

F64 = torch.float64


def naive_gated_delta_rule(q, k, v, g, beta, scale=None, state=None):
    """S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T and o_t = scale S_t^T q_t, token by token.

    q, k (B, T, H, K); v (B, T, H, V); g, beta (B, T, H); state (B, H, K, V) or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=q.dtype) if state is None else state.clone()
    os = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None, None] * S                           # a_t S_{t-1}
        pred = torch.einsum("bhkv,bhk->bhv", S, k[:, t])                     # a_t S_{t-1}^T k_t
        S = S + beta[:, t, :, None, None] * torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t] - pred)
        os.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(os, 1), S


def make_inputs(b=2, t=13, h=3, dk=4, dv=5, seed=0, dtype=F64, init=True, g_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)       # noqa: E731
    q = F.normalize(r(b, t, h, dk), dim=-1)
    k = F.normalize(r(b, t, h, dk), dim=-1)
    v = r(b, t, h, dv)
    g = -torch.rand(b, t, h, generator=gen, dtype=dtype) * g_scale    # log decays in (-g_scale, 0]
    beta = torch.rand(b, t, h, generator=gen, dtype=dtype) * 0.98 + 0.01
    state = r(b, h, dk, dv) if init else None
    return q, k, v, g, beta, state


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("chunk", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("t", [1, 8, 16, 23])
def test_one_call_matches_naive(chunk, t):
    q, k, v, g, beta, s0 = make_inputs(t=t, seed=chunk * 100 + t)
    o0, s_ref = naive_gated_delta_rule(q, k, v, g, beta, state=s0)
    o1, s1 = gated_delta_rule(q, k, v, g, beta, state=s0, chunk_size=chunk)
    assert o1.shape == v.shape and s1.shape == s0.shape
    assert o1.dtype == F64 and s1.dtype == F64
    assert max_err(o1, o0) <= 1e-6 and max_err(s1, s_ref) <= 1e-6


def test_zero_state_and_explicit_scale():
    q, k, v, g, beta, _ = make_inputs(t=10, init=False, dk=6, dv=3)
    o0, s_ref = naive_gated_delta_rule(q, k, v, g, beta, scale=0.7)
    o1, s1 = gated_delta_rule(q, k, v, g, beta, scale=0.7, chunk_size=4)
    assert max_err(o1, o0) <= 1e-6 and max_err(s1, s_ref) <= 1e-6


@pytest.mark.parametrize("t1", [1, 5, 8, 12])
def test_two_calls_carry_the_state(t1):
    q, k, v, g, beta, s0 = make_inputs(t=19, seed=t1)
    o0, s_ref = naive_gated_delta_rule(q, k, v, g, beta, state=s0)
    o, s = gated_delta_rule(q, k, v, g, beta, state=s0, chunk_size=4)
    oa, sa = gated_delta_rule(*(x[:, :t1] for x in (q, k, v, g, beta)), state=s0, chunk_size=4)
    ob, sb = gated_delta_rule(*(x[:, t1:] for x in (q, k, v, g, beta)), state=sa, chunk_size=4)
    o2 = torch.cat([oa, ob], 1)
    assert max_err(o2, o) <= 1e-6 and max_err(sb, s) <= 1e-6
    assert max_err(o2, o0) <= 1e-6 and max_err(sb, s_ref) <= 1e-6


def test_step_matches_chunked():
    q, k, v, g, beta, s0 = make_inputs(t=17, seed=3)
    o, s = gated_delta_rule(q, k, v, g, beta, state=s0, chunk_size=8)
    state, os = s0, []
    for t in range(q.shape[1]):
        o_t, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        assert o_t.shape == v[:, t].shape and state.shape == s0.shape
        os.append(o_t)
    assert max_err(torch.stack(os, 1), o) <= 1e-6 and max_err(state, s) <= 1e-6


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_gradients_match_naive(chunk, strong, grads):
    q, k, v, g, beta, s0 = make_inputs(t=14, seed=7)
    if strong:                                                        # every other token decays by e^-20
        g = torch.where(torch.arange(14)[:, None] % 2 == 0, torch.full_like(g, -20.0), g)
    inputs = (q, k, v, g, beta, s0)
    ref = grads(lambda q, k, v, g, beta, s0: naive_gated_delta_rule(q, k, v, g, beta, state=s0), inputs)
    got = grads(lambda q, k, v, g, beta, s0: gated_delta_rule(q, k, v, g, beta, state=s0, chunk_size=chunk),
                 inputs)
    for name, a, b in zip("q k v g beta state".split(), ref, got):
        assert max_err(a, b) / a.abs().max().item() <= 1e-6, (chunk, name)


def test_fp32_close_to_fp64_naive():
    q, k, v, g, beta, s0 = make_inputs(b=1, t=150, h=2, dk=16, dv=16, seed=5)
    o0, s_ref = naive_gated_delta_rule(q, k, v, g, beta, state=s0)
    o1, s1 = gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), state=s0.float(), chunk_size=64)
    assert o1.dtype == torch.float32 and s1.dtype == torch.float32
    assert max_err(o1.double(), o0) <= 1e-4 and max_err(s1.double(), s_ref) <= 1e-4


def test_fp32_decay_ratios_keep_precision_after_strong_decay():
    # 48 tokens at g = -20 then 16 at g = -0.01 in every chunk: the cumulative log decays reach -940, and
    # ratios near 1 taken as differences of fp32 sums would lose ~1e-4 (float64 differences: ~1e-7)
    q, k, v, g, beta, s0 = make_inputs(b=1, t=128, h=2, dk=16, dv=16, seed=11)
    slow = torch.arange(128)[:, None] % 64 >= 48
    g = torch.where(slow, torch.full_like(g, -0.01), torch.full_like(g, -20.0))
    o0, s_ref = naive_gated_delta_rule(q, k, v, g, beta, state=s0)
    o1, s1 = gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), state=s0.float(), chunk_size=64)
    assert max_err(o1.double(), o0) <= 2e-6 and max_err(s1.double(), s_ref) <= 2e-6


@pytest.mark.parametrize("c", [1, 2, 5, 8, 13])
def test_unit_lower_inverse(c):
    gen = torch.Generator().manual_seed(c)
    A = torch.randn(3, c, c, generator=gen, dtype=F64)      # its diagonal and upper part must be ignored
    expect = torch.linalg.inv(torch.eye(c, dtype=F64) + A.tril(-1))
    assert max_err(unit_lower_inverse(A), expect) <= 1e-10


def test_bf16_inputs_keep_an_fp32_state():
    q, k, v, g, beta, s0 = (x.float() for x in make_inputs(t=20, seed=6))
    o32, s32 = gated_delta_rule(q, k, v, g, beta, state=s0, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ob, sb = gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, state=s0, chunk_size=8)
    assert ob.dtype == torch.bfloat16 and sb.dtype == torch.float32
    assert max_err(ob.float(), o32) / o32.abs().max().item() < 0.05
    assert max_err(sb, s32) / s32.abs().max().item() < 0.05


def test_strongly_negative_g_stays_finite():
    q, k, v, g, beta, s0 = make_inputs(t=40, seed=8)
    g = torch.where(torch.rand(g.shape, generator=torch.Generator().manual_seed(0), dtype=F64) < 0.5,
                    torch.full_like(g, -20.0), g)                     # half the tokens forget everything
    o0, s_ref = naive_gated_delta_rule(q, k, v, g, beta, state=s0)
    for x in (q, k, v, g, beta, s0):
        x.requires_grad_(True)
    for dtype in (torch.float32, F64):
        inputs = [x.to(dtype) for x in (q, k, v, g, beta, s0)]
        o, s = gated_delta_rule(*inputs[:5], state=inputs[5], chunk_size=16)
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        assert max_err(o.double(), o0) <= 1e-4 and max_err(s.double(), s_ref) <= 1e-4
        grads = torch.autograd.grad((o.sum() + s.sum()), inputs)
        assert all(torch.isfinite(gr).all() for gr in grads)
    # g = -20 on every token: the state is forgotten at each step, all decay products underflow
    o, s = gated_delta_rule(q.float(), k.float(), v.float(), torch.full_like(g, -20.0).float(), beta.float(),
                            state=s0.float(), chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()


@given(b=st.integers(1, 2), t=st.integers(1, 20), h=st.integers(1, 2), dk=st.integers(1, 5),
       dv=st.integers(1, 5), chunk=st.integers(1, 9), init=st.booleans(), seed=st.integers(0, 2**16))
def test_property_matches_naive(b, t, h, dk, dv, chunk, init, seed):
    q, k, v, g, beta, s0 = make_inputs(b=b, t=t, h=h, dk=dk, dv=dv, seed=seed, init=init, g_scale=3.0)
    o0, s_ref = naive_gated_delta_rule(q, k, v, g, beta, state=s0)
    o1, s1 = gated_delta_rule(q, k, v, g, beta, state=s0, chunk_size=chunk)
    assert max_err(o1, o0) <= 1e-6 and max_err(s1, s_ref) <= 1e-6


@pytest.mark.parametrize("t0", [1, 6, 8, 13])
def test_causal(t0):
    inputs = make_inputs(t=20, seed=9)
    other = make_inputs(t=20, seed=10)
    o, _ = gated_delta_rule(*inputs[:5], state=inputs[5], chunk_size=8)
    changed = [torch.cat([x[:, :t0], y[:, t0:]], 1) for x, y in zip(inputs[:5], other[:5])]
    o2, _ = gated_delta_rule(*changed, state=inputs[5], chunk_size=8)
    assert max_err(o2[:, :t0], o[:, :t0]) <= 1e-12
    assert max_err(o2[:, t0:], o[:, t0:]) > 1e-3          # the change did reach the later outputs


def test_inputs_not_modified_and_empty_sequence():
    inputs = make_inputs(t=9, seed=10)
    copies = [x.clone() for x in inputs]
    gated_delta_rule(*inputs[:5], state=inputs[5], chunk_size=4)
    gated_delta_rule_step(*(x[:, 0] for x in inputs[:5]), inputs[5])
    assert all(torch.equal(a, b) for a, b in zip(inputs, copies))
    o, s = gated_delta_rule(*(x[:, :0] for x in inputs[:5]), state=inputs[5])
    assert o.shape == (2, 0, 3, 5) and torch.equal(s, inputs[5])


def test_strided_inputs_and_one_sided_losses():
    # q, k, v as slices of one fused projection (non-contiguous), as a layer would pass them
    q, k, v, g, beta, s0 = make_inputs(t=12, dk=4, dv=4, seed=12)
    qkv = torch.cat([q, k, v], -1).requires_grad_(True)
    o, s = gated_delta_rule(qkv[..., :4], qkv[..., 4:8], qkv[..., 8:], g, beta, state=s0, chunk_size=4)
    o0, s_ref = naive_gated_delta_rule(qkv[..., :4], qkv[..., 4:8], qkv[..., 8:], g, beta, state=s0)
    assert max_err(o, o0) <= 1e-6 and max_err(s, s_ref) <= 1e-6
    # a loss on the outputs only, then on the final state only (the other gradient is absent)
    for loss, loss0 in ((o.square().sum(), o0.square().sum()), (s.square().sum(), s_ref.square().sum())):
        (grad,) = torch.autograd.grad(loss, qkv, retain_graph=True)
        (grad0,) = torch.autograd.grad(loss0, qkv, retain_graph=True)
        assert max_err(grad, grad0) / grad0.abs().max().item() <= 1e-6
