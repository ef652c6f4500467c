"""The chunked selective scan (backbones/ops/selective_scan.py) against a token-by-token recurrence.

The reference below is written independently of the implementation: a plain Python loop over time in
the official (b, d, n) layout, differentiated by autograd.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmbench.backbones.ops import selective_scan as ss
from wmbench.backbones.ops.selective_scan import selective_scan

F64 = torch.float64


def naive_scan(u, delta, A, B, C, D=None, h0=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t ;  y_t = <C_t, h_t> + D u_t   (one step at a time)."""
    b, L, d = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=u.dtype) if h0 is None else h0
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, t, :, None] * A)                      # (b, d, n)
        dBu = delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        h = dA * h + dBu
        y = torch.einsum("bdn,bn->bd", h, C[:, t])
        if D is not None:
            y = y + D * u[:, t]
        ys.append(y)
    return torch.stack(ys, 1), h


def make_inputs(b, L, d, n, dtype=F64, dt_scale=0.5, seed=0, h0=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = r(b, L, d)
    delta = torch.rand(b, L, d, generator=g, dtype=dtype) * dt_scale + 1e-3
    A = -(torch.rand(d, n, generator=g, dtype=dtype) * 4 + 0.5)
    return dict(u=u, delta=delta, A=A, B=r(b, L, n), C=r(b, L, n), D=r(d),
                initial_state=r(b, d, n) if h0 else None)


def _err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("L", [1, 7, 23])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 64, None])
def test_matches_naive_fp64(L, chunk):
    x = make_inputs(2, L, 5, 3)
    y_ref, h_ref = naive_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["initial_state"])
    y, h = selective_scan(**x, chunk_size=chunk, return_final_state=True)
    assert y.dtype == h.dtype == F64 and y.shape == (2, L, 5) and h.shape == (2, 5, 3)
    assert _err(y, y_ref) <= 1e-10
    assert _err(h, h_ref) <= 1e-10


@given(b=st.integers(1, 3), L=st.integers(1, 40), d=st.integers(1, 6), n=st.integers(1, 5),
       chunk=st.one_of(st.none(), st.integers(1, 12)), h0=st.booleans(), seed=st.integers(0, 1000))
def test_matches_naive_any_size(b, L, d, n, chunk, h0, seed):
    x = make_inputs(b, L, d, n, seed=seed, h0=h0)
    y_ref, h_ref = naive_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["initial_state"])
    y, h = selective_scan(**x, chunk_size=chunk, return_final_state=True)
    assert _err(y, y_ref) <= 1e-10 and _err(h, h_ref) <= 1e-10


def test_without_D_and_initial_state():
    x = make_inputs(2, 9, 4, 3, h0=False)
    x["D"] = None
    y_ref, h_ref = naive_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
    y, h = selective_scan(**x, chunk_size=4, return_final_state=True)
    assert _err(y, y_ref) <= 1e-10 and _err(h, h_ref) <= 1e-10
    assert torch.equal(selective_scan(**x, chunk_size=4), y)


@pytest.mark.parametrize("dA_per_step", [50.0, 1000.0])
def test_large_delta_stays_finite_and_exact(dA_per_step):
    """Δ·|A| ≈ 50 (decay e^-50 per step) or 1000 (underflows to 0): no overflow, no NaN, still exact."""
    x = make_inputs(2, 37, 4, 3)
    x["A"] = -torch.full((4, 3), 5.0, dtype=F64)
    x["delta"] = torch.full_like(x["delta"], dA_per_step / 5.0) * (1 + 0.1 * torch.rand_like(x["delta"]))
    y_ref, h_ref = naive_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["initial_state"])
    for chunk in (3, 8, None):
        y, h = selective_scan(**x, chunk_size=chunk, return_final_state=True)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        assert _err(y, y_ref) <= 1e-10 * y_ref.abs().max().item() and _err(h, h_ref) <= 1e-10 * h_ref.abs().max()
        # fp32 too, including the gradient
        x32 = {k: v.float().requires_grad_() for k, v in x.items()}
        y32, h32 = selective_scan(**x32, chunk_size=chunk, return_final_state=True)
        assert torch.isfinite(y32).all()
        assert _err(y32.double(), y_ref) <= 1e-4 * y_ref.abs().max().item()
        (y32.sum() + h32.sum()).backward()
        assert all(torch.isfinite(v.grad).all() for v in x32.values())


def _loss(y, h, wy, wh):
    return (y * wy).sum() + (h * wh).sum()


@pytest.mark.parametrize("chunk,group_bytes", [(1, None), (3, None), (4, 1), (5, 2000), (64, None)])
def test_gradients_match_autograd_through_naive(chunk, group_bytes, monkeypatch):
    """All seven gradients (u, Δ, A, B, C, D, h0), with a loss on y and on the final state; small
    GROUP_BYTES forces the backward through several groups of chunks."""
    if group_bytes is not None:
        monkeypatch.setattr(ss, "GROUP_BYTES", group_bytes)
    x = make_inputs(2, 13, 4, 3)
    wy, wh = torch.randn(2, 13, 4, dtype=F64), torch.randn(2, 4, 3, dtype=F64)
    xa = {k: v.clone().requires_grad_() for k, v in x.items()}
    xb = {k: v.clone().requires_grad_() for k, v in x.items()}
    _loss(*naive_scan(xa["u"], xa["delta"], xa["A"], xa["B"], xa["C"], xa["D"], xa["initial_state"]),
          wy, wh).backward()
    _loss(*selective_scan(**xb, chunk_size=chunk, return_final_state=True), wy, wh).backward()
    for k in x:
        assert _err(xb[k].grad, xa[k].grad) <= 1e-10, k


def test_gradcheck():
    x = make_inputs(2, 6, 3, 2)
    names = list(x)
    args = [x[k].clone().requires_grad_() for k in names]

    def f(*a):
        return selective_scan(**dict(zip(names, a)), chunk_size=4, return_final_state=True)
    assert torch.autograd.gradcheck(f, args)


def test_forward_saves_no_state_history():
    """Memory: what the forward keeps for backward is the (b, L, d)-sized inputs and one state per chunk,
    far below the (b, L, d, n) history a materialising scan keeps."""
    b, L, d, n = 2, 256, 32, 16
    x = {k: v.float().requires_grad_() for k, v in make_inputs(b, L, d, n).items()}
    y = selective_scan(**x)
    saved = sum(t.numel() for t in y.grad_fn.saved_tensors if t is not None)
    chunks = -(-L // ss.default_chunk_size(L))
    assert saved <= 2 * b * L * d + 2 * b * L * n + chunks * b * d * n + 2 * d * n
    assert saved < b * L * d * n / 3


def test_bf16_inputs_keep_fp32_state():
    x = make_inputs(2, 10, 4, 3, dtype=torch.float32)
    xb = {k: (v.bfloat16() if k in ("u", "B", "C") else v) for k, v in x.items()}
    y, h = selective_scan(**xb, chunk_size=3, return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y_ref, _ = selective_scan(**{k: v.float() if k in ("u", "B", "C") else v for k, v in xb.items()},
                              return_final_state=True)
    assert _err(y.float(), y_ref) <= 2e-2 * y_ref.abs().max().item()


def test_bad_shapes_raise():
    x = make_inputs(2, 5, 4, 3)
    with pytest.raises(ValueError, match="delta"):
        selective_scan(**{**x, "delta": x["delta"][:, :4]})
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**x, "A": x["A"][:3]})
    with pytest.raises(ValueError, match="C must be"):
        selective_scan(**{**x, "C": x["C"][..., :2]})
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(**{**x, "initial_state": x["initial_state"][:1]})
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**x, chunk_size=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_torch_path():
    """mamba-ssm's selective_scan_fn (Δ pre-softplus + bias inside) vs our scan with softplus outside."""
    from wmbench.backbones.ops.cuda import load
    mod = load("mamba_ssm.ops.selective_scan_interface")
    if mod is None:
        pytest.skip("mamba_ssm is not importable")
    x = make_inputs(2, 300, 64, 16, dtype=torch.float32, h0=False)
    dev = torch.device("cuda")
    x = {k: (v.to(dev) if v is not None else None) for k, v in x.items()}
    dt_raw = torch.randn(2, 300, 64, device=dev) - 4.0
    bias = torch.randn(64, device=dev) * 0.5
    z = torch.randn(2, 300, 64, device=dev)
    tr = (lambda t: t.transpose(1, 2).contiguous())  # noqa: E731
    y_cuda, h_cuda = mod.selective_scan_fn(tr(x["u"]), tr(dt_raw), x["A"], tr(x["B"]), tr(x["C"]), x["D"],
                                           z=tr(z), delta_bias=bias, delta_softplus=True, return_last_state=True)
    delta = torch.nn.functional.softplus(dt_raw + bias)
    y, h = selective_scan(x["u"], delta, x["A"], x["B"], x["C"], x["D"], return_final_state=True)
    y = y * torch.nn.functional.silu(z)
    assert _err(y_cuda.transpose(1, 2), y) <= 1e-3 * (1 + y.abs().max().item())
    assert _err(h_cuda, h) <= 1e-3 * (1 + h.abs().max().item())
