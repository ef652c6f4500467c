"""The chunked SSD scan (backbones/ops/ssd.py) against a token-by-token recurrence written here."""
import math

import pytest
import torch
import torch.nn.functional as F

from wmbench.backbones.ops.ssd import SSDChunkScan, segsum, ssd_chunked_reference, ssd_scan

F64 = torch.float64


def naive_ssd(x, dt, A, B, C, D=None, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t, one token at a time.

    x (b, l, h, p), dt (b, l, h) (already positive), A (h,), B/C (b, l, g, n), head i -> group i // (h/g).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    group = torch.arange(h) // (h // g)
    state = torch.zeros(b, h, p, n, dtype=x.dtype) if h0 is None else h0.clone()
    ys = []
    for t in range(l):
        Bt, Ct = B[:, t, group], C[:, t, group]                          # (b, h, n)
        decay = torch.exp(dt[:, t] * A)                                 # (b, h)
        state = decay[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        y = (state * Ct[:, :, None, :]).sum(-1)
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, 1), state


def make_inputs(b=2, l=13, h=4, p=3, g=2, n=5, seed=0, dtype=F64, init=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)       # noqa: E731
    x, B, C = r(b, l, h, p), r(b, l, g, n), r(b, l, g, n)
    dt = torch.rand(b, l, h, generator=gen, dtype=dtype) * 0.6 + 0.02
    A = -torch.rand(h, generator=gen, dtype=dtype) * 4 - 0.1
    D = r(h)
    h0 = r(b, h, p, n) if init else None
    return x, dt, A, B, C, D, h0


def test_segsum_hand_computed():
    a = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    s = segsum(a)
    inf = math.inf
    expect = torch.tensor([[0.0, -inf, -inf], [2.0, 0.0, -inf], [6.0, 4.0, 0.0]], dtype=F64)
    assert torch.equal(s, expect)
    # exp gives the causal decay mask with exact zeros above the diagonal
    assert torch.exp(s)[0, 1] == 0


def test_segsum_is_stable_in_fp32():
    # large cumulative sums: cumsum_i - cumsum_j loses ~1e-5; the masked cumsum stays at fp32 rounding
    a = -(torch.rand(256, dtype=F64) * 1.5 + 1.0)
    exact = segsum(a)
    got = segsum(a.float()).double()
    mask = torch.ones(256, 256, dtype=torch.bool).tril()
    rel = ((got - exact).abs() / exact.abs().clamp_min(1.0))[mask]
    assert rel.max() < 1e-6


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 64])
@pytest.mark.parametrize("l", [1, 7, 16, 23])
def test_chunked_matches_naive_fp64(chunk, l):
    x, dt, A, B, C, D, h0 = make_inputs(l=l, seed=chunk * 100 + l)
    y0, s0 = naive_ssd(x, dt, A, B, C, D, h0)
    y1, s1 = ssd_scan(x, dt, A, B, C, chunk, D=D, initial_states=h0, kernel="torch")
    y2, s2 = ssd_chunked_reference(x, dt, A, B, C, chunk, D=D, initial_states=h0)
    for y, s in ((y1, s1), (y2, s2)):
        assert y.shape == x.shape and s.shape == h0.shape
        assert (y - y0).abs().max() <= 1e-10
        assert (s - s0).abs().max() <= 1e-10


def test_zero_initial_state_and_no_D():
    x, dt, A, B, C, _, _ = make_inputs(l=10, g=1, init=False)
    y0, s0 = naive_ssd(x, dt, A, B, C)
    y1, s1 = ssd_scan(x, dt, A, B, C, 4, kernel="torch")
    assert (y1 - y0).abs().max() <= 1e-10 and (s1 - s0).abs().max() <= 1e-10


def test_dt_bias_softplus_and_limit_applied_once():
    x, dt, A, B, C, D, h0 = make_inputs(l=9)
    raw = torch.randn_like(dt) * 2
    bias = torch.randn(dt.shape[-1], dtype=F64)
    lim = (0.05, 0.8)
    eff = F.softplus(raw + bias).clamp(*lim)
    y0, s0 = naive_ssd(x, eff, A, B, C, D, h0)
    y1, s1 = ssd_scan(x, raw, A, B, C, 4, D=D, dt_bias=bias, dt_softplus=True, dt_limit=lim,
                      initial_states=h0, kernel="torch")
    assert (y1 - y0).abs().max() <= 1e-10 and (s1 - s0).abs().max() <= 1e-10


def test_splitting_the_sequence_continues_the_state():
    x, dt, A, B, C, D, h0 = make_inputs(l=20)
    y, s = ssd_scan(x, dt, A, B, C, 8, D=D, initial_states=h0, kernel="torch")
    ya, sa = ssd_scan(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], 8, D=D, initial_states=h0, kernel="torch")
    yb, sb = ssd_scan(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], 8, D=D, initial_states=sa, kernel="torch")
    assert (torch.cat([ya, yb], 1) - y).abs().max() <= 1e-10 and (sb - s).abs().max() <= 1e-10


def test_gradients_match_naive_and_agree_across_chunk_sizes(grads):
    inputs = make_inputs(l=14)
    ref = grads(lambda x, dt, A, B, C, D, h0: naive_ssd(x, dt, A, B, C, D, h0), inputs)
    for chunk in (1, 3, 8, 14, 32):
        got = grads(lambda x, dt, A, B, C, D, h0: ssd_scan(x, dt, A, B, C, chunk, D=D, initial_states=h0,
                                                            kernel="torch"), inputs)
        for name, a, b in zip("x dt A B C D h0".split(), ref, got):
            assert (a - b).abs().max() <= 1e-9, (chunk, name)


def test_gradcheck_custom_backward():
    x, dt, A, B, C, D, h0 = make_inputs(b=1, l=6, h=2, p=2, g=1, n=3, seed=3)
    inputs = [t.requires_grad_(True) for t in (x, dt, A, B, C, D, h0)]
    assert torch.autograd.gradcheck(lambda *a: SSDChunkScan.apply(*a, 3), inputs, fast_mode=True)
    # two groups and a length that needs padding, through the public function
    x, dt, A, B, C, D, h0 = make_inputs(b=1, l=5, h=2, p=2, g=2, n=2, seed=4)
    inputs = [t.requires_grad_(True) for t in (x, dt, A, B, C, D, h0)]
    assert torch.autograd.gradcheck(
        lambda *a: ssd_scan(*a[:5], 4, D=a[5], initial_states=a[6], kernel="torch"), inputs, fast_mode=True)


def test_fp32_close_to_fp64_on_a_long_sequence():
    x, dt, A, B, C, D, h0 = make_inputs(b=1, l=600, h=2, p=4, g=1, n=4, seed=5)
    y64, s64 = ssd_scan(x, dt, A, B, C, 64, D=D, initial_states=h0, kernel="torch")
    y32, s32 = ssd_scan(*(t.float() for t in (x, dt, A, B, C)), 64, D=D.float(), initial_states=h0.float(),
                        kernel="torch")
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    assert (y32.double() - y64).abs().max() / y64.abs().max() < 1e-5
    assert (s32.double() - s64).abs().max() / s64.abs().max() < 1e-5


def test_bf16_autocast_keeps_fp32_state():
    x, dt, A, B, C, D, h0 = (t.float() for t in make_inputs(l=40, seed=6))
    y32, s32 = ssd_scan(x, dt, A, B, C, 16, D=D, initial_states=h0, kernel="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb, sb = ssd_scan(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 16, D=D, initial_states=h0,
                          kernel="torch")
    assert yb.dtype == torch.bfloat16 and sb.dtype == torch.float32
    assert (yb.float() - y32).abs().max() / y32.abs().max() < 0.05
    assert (sb - s32).abs().max() / s32.abs().max() < 0.05


def test_bad_groups_rejected():
    x, dt, A, B, C, D, h0 = make_inputs(h=4, g=3)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_scan(x, dt, A, B, C, 4, kernel="torch")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_torch_path():
    pytest.importorskip("mamba_ssm.ops.triton.ssd_combined")
    x, dt, A, B, C, D, h0 = (t.float().cuda() for t in make_inputs(b=2, l=100, h=4, p=16, g=2, n=16, seed=7))
    raw = torch.randn_like(dt)
    bias = torch.randn(4, device="cuda")
    args = dict(D=D, dt_bias=bias, dt_softplus=True, initial_states=h0)
    yt, st = ssd_scan(x, raw, A, B, C, 32, kernel="torch", **args)
    yc, sc = ssd_scan(x, raw, A, B, C, 32, kernel="cuda", **args)
    assert (yc - yt).abs().max() / yt.abs().max() < 1e-3
    assert (sc - st).abs().max() / st.abs().max() < 1e-3
