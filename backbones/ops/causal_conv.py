"""Causal depthwise conv1d over channels-last sequences, with a hand-written backward (CPU path).

    y[b, t, c] = bias[c] + sum_k w[c, k] x[b, t - (K-1) + k, c]        (zero history before t = 0)

nn.Conv1d wants (B, C, L): on our (B, L, C) activations that costs a transpose copy in and out, in
both directions, and its depthwise backward is slow on CPU. Here every term is one FMA over the
contiguous channel dimension. The weight gradient sums over (b, t) with vector-matrix products,
one sample at a time so that its (L, C) slices stay in cache over the K shifts.
"""
from __future__ import annotations

import torch


def conv_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None = None):
    """x (B, L, C) any strides with a contiguous C; w (C, K); b (C,) or None -> y (B, L, C)."""
    Bsz, L, C = x.shape
    K = w.shape[1]
    if out is None:
        out = torch.empty(Bsz, L, C, dtype=x.dtype, device=x.device)
    if b is None:
        torch.mul(x, w[:, K - 1], out=out)
    else:
        torch.addcmul(b, x, w[:, K - 1], out=out)
    for s in range(1, min(K, L + 1)):
        out[:, s:].addcmul_(x[:, :L - s], w[:, K - 1 - s])
    return out


def conv_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dx: torch.Tensor | None = None):
    """Gradients of conv_forward: (dx (B, L, C), dw (C, K) fp32+, db (C,) fp32+).

    dx may be a preallocated (B, L, C) view (e.g. a slice of a bigger gradient buffer).
    """
    Bsz, L, C = dy.shape
    K = w.shape[1]
    sd = torch.promote_types(dy.dtype, torch.float32)
    if dx is None:
        dx = torch.empty(Bsz, L, C, dtype=dy.dtype, device=dy.device)
    tmp = torch.empty(L, C, dtype=dy.dtype, device=dy.device)
    ones = torch.ones(Bsz * L, dtype=dy.dtype, device=dy.device)
    dw = torch.zeros(C, K, dtype=sd, device=dy.device)
    for i in range(Bsz):
        dyi, xi, dxi = dy[i], x[i], dx[i]
        torch.mul(dyi, w[:, K - 1], out=dxi)
        for s in range(min(K, L)):
            if s:
                dxi[:L - s].addcmul_(dyi[s:], w[:, K - 1 - s])
            torch.mul(dyi[s:], xi[:L - s], out=tmp[:L - s])
            dw[:, K - 1 - s] += (ones[:L - s] @ tmp[:L - s]).to(sd)
    db = (ones @ dy.reshape(Bsz * L, C)).to(sd)
    return dx, dw, db


class CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return conv_forward(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, dw, db = conv_backward(dy.contiguous(), x, w.to(x.dtype))
        return dx, dw.to(w.dtype), db.to(w.dtype) if ctx.has_bias else None


def causal_conv1d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y (B, L, C) = causal depthwise conv of x (B, L, C) with w (C, K) and bias b (C,) or None."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return CausalConv1d.apply(x, w, b)
