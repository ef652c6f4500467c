"""The mLSTM backbone against the xLSTM layer's equations, written out token by token in float64.

The reference below re-derives the layer from its definition (backbones/mlstm.py's docstring): dense
block-diagonal matrices, the unstabilised mLSTM (C*_t = f_t C*_{t-1} + exp(i_t) k_t v_t^T, the same for
n*, h = C*^T q~ / max(|n*^T q~|, 1)), a per-head layer norm, the learnable skip and the output gate.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import wmbench
from wmbench.backbones.mlstm import MLSTMMixer, _BlockDiagonalFn


def _naive_mixer(m: MLSTMMixer, u: torch.Tensor) -> torch.Tensor:
    """u (B, L, D) float64 -> (B, L, D), one token at a time, no stabiliser, no chunking."""
    B, L, _ = u.shape
    H, dh, di = m.num_heads, m.d_head, m.d_inner
    dense = lambda w: torch.block_diag(*w)                               # (nb, out, in) -> (out_all, in_all)
    Wqk = m.qk_proj.weight                                               # (nb, 2 blk, blk): [q; k] per block
    blk = Wqk.shape[-1]
    Wq, Wk = dense(Wqk[:, :blk]), dense(Wqk[:, blk:])
    Wv = dense(m.v_proj.weight)
    # gate columns follow the [q_block, k_block] interleaving of qk_proj's output
    Wg_qk, Wg_v = m.gate_weight.split([2 * di, di], dim=1)
    Wg_qk = Wg_qk.view(2 * H, di // blk, 2, blk)
    Wg_q, Wg_k = Wg_qk[:, :, 0].reshape(2 * H, di), Wg_qk[:, :, 1].reshape(2 * H, di)
    K = m.conv.kernel_size
    x_in, z = (u @ m.in_proj.weight.T).split(di, dim=-1)
    xp = F.pad(x_in, (0, 0, K - 1, 0))
    out = []
    C = torch.zeros(B, H, dh, dh, dtype=u.dtype)
    n = torch.zeros(B, H, dh, dtype=u.dtype)
    for t in range(L):
        c = F.silu(sum(xp[:, t + j] * m.conv.weight[:, j] for j in range(K)) + m.conv.bias)
        q, k, v = c @ Wq.T, c @ Wk.T, x_in[:, t] @ Wv.T
        gates = q @ Wg_q.T + k @ Wg_k.T + v @ Wg_v.T
        i_pre, f_pre = gates[:, :H] + m.igate_bias, gates[:, H:] + m.fgate_bias
        qh, kh, vh = (x.view(B, H, dh) for x in (q, k, v))
        f, i = torch.sigmoid(f_pre), torch.exp(i_pre)
        C = f[..., None, None] * C + i[..., None, None] * kh[..., :, None] * vh[..., None, :]
        n = f[..., None] * n + i[..., None] * kh
        qs = qh / math.sqrt(dh)
        num = torch.einsum("bhkv,bhk->bhv", C, qs)
        den = torch.einsum("bhk,bhk->bh", n, qs).abs().clamp_min(1.0)
        h = num / den[..., None]
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        hn = ((h - mu) / torch.sqrt(var + m.norm_eps)).reshape(B, di) * m.norm_weight
        y = (hn + m.skip * c) * F.silu(z[:, t])
        out.append(y @ m.out_proj.weight.T)
    return torch.stack(out, 1)


@given(d_model=st.integers(2, 12), heads=st.sampled_from([1, 2]), L=st.integers(1, 9),
       chunk=st.sampled_from([2, 3, 64]), seed=st.integers(0, 1000))
def test_mixer_matches_the_equations_in_float64(d_model, heads, L, chunk, seed):
    torch.manual_seed(seed)
    m = MLSTMMixer(d_model, num_heads=heads, round_to=8 * heads, chunk_size=chunk).double()
    with torch.no_grad():   # non-trivial gates (the reference init has zero gate weights)
        m.gate_weight.normal_(0, 0.3)
        m.norm_weight.uniform_(0.5, 1.5)
    u = torch.randn(2, L, d_model, dtype=torch.float64)
    torch.testing.assert_close(m(u), _naive_mixer(m, u), rtol=1e-9, atol=1e-10)


def test_block_diagonal_backward_matches_autograd():
    x = torch.randn(37, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_BlockDiagonalFn.apply, (x, w))


def test_reference_initialisation():
    m = MLSTMMixer(64)
    assert m.d_inner == 128 and m.num_heads == 4 and m.d_head == 32
    assert torch.equal(m.fgate_bias, torch.linspace(3, 6, 4)) and not m.gate_weight.any()
    assert torch.equal(m.skip, torch.ones(128))


def test_causal():
    torch.manual_seed(0)
    bb = wmbench.create_backbone("mlstm", 16, 2, round_to=16).eval()
    x = torch.randn(2, 12, 16)
    y = bb(x)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 16)
    torch.testing.assert_close(bb(x2)[:, :7], y[:, :7], rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    ({"num_heads": 0}, "num_heads must be a positive integer"),
    ({"num_heads": 3}, "must split into num_heads = 3 heads"),
    ({"proj_factor": -1}, "proj_factor must be a number"),
    ({"norm_eps": 0}, "norm_eps must be positive"),
    ({"headdim": 4}, "unknown mlstm option"),
])
def test_bad_options_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        wmbench.create_backbone("mlstm", 32, 1, **bad)
