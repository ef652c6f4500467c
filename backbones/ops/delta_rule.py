"""The gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh, ICLR 2025), chunked, in PyTorch.

The recurrence of one head. The state S is (K, V). At every token t we have q_t and k_t (K,), both
L2-normalised by the layer; v_t (V,); the log decay g_t <= 0; and the writing strength beta_t in (0, 1):

    a_t = exp(g_t)
    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T
        = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t                                      scale = K^-1/2 by default

`gated_delta_rule_step` is this, one token at a time (a backbone's `step`).

`gated_delta_rule` is the chunked WY/UT form, for training and prefill. It splits the sequence into
chunks of C tokens. Take a chunk whose entering state is S_0. Let b_t = g_1 + ... + g_t be the
cumulative log decay inside the chunk, so Gamma_t = exp(b_t). The correction that token t writes is
delta_t = beta_t (v_t - a_t S_{t-1}^T k_t), so that
S_t = Gamma_t S_0 + sum_{j<=t} (Gamma_t / Gamma_j) k_j delta_j^T.
Stack the chunk's tokens as rows (Q, K: (C, K); V: (C, V)):

    A     = strictly-lower( diag(beta) (Gamma/Gamma ⊙ K K^T) )     (C, C)  beta_t e^(b_t-b_j) k_t.k_j
    T     = (I + A)^-1 diag(beta)                                  (C, C)  the UT transform (not the length)
    U     = T V,   W = T (Gamma ⊙ K)                               (C, V), (C, K)
    Delta = U - W S_0                                              (C, V)  the rows delta_t
    P     = (Gamma/Gamma ⊙ Q K^T)_{t >= j}                         (C, C)
    O     = scale [ (Gamma ⊙ Q) S_0 + P Delta ]                    (C, V)
    S_C   = Gamma_C S_0 + (Gamma_C/Gamma ⊙ K)^T Delta              (K, V)  the state leaving the chunk

Everything but the S_0 terms is computed for all chunks at once: A, the UT transform, U, W and P. The
only sequential part is a loop over the chunks, with two (K, V)-sized matmuls per chunk (Delta and
S_C). After it, O is again one batched product over all chunks.

Stability. Every decay ratio is exp(b_t - b_j) with t >= j, masked to -inf *before* the exp, so nothing
overflows and the masked entries get exactly zero gradient. The cumulative sums b and their
differences are taken in float64 and rounded once, so the ratios near 1 keep full precision even after
long stretches of strong decay (|b| ~ 20 * C). Gamma_t <= 1, and since |k_t| = 1 and beta_t < 1 the
entries of A lie in [-1, 1]. The state and all matmuls are float32 (float64 for float64 inputs),
whatever the input dtype.

Autograd gives the backward, helped by three small functions with hand-written backwards: the
decay ratios, the UT solve, and the loop over chunks. The UT solve inverts I + A by blockwise
doubling, with batched matmuls. torch.linalg.solve_triangular is not used: on a CPU it makes one
small multithreaded trsm call per (C, C) matrix, and when the cores are shared those calls stall for
seconds.

Shapes follow flash-linear-attention: q, k (B, T, H, K); v (B, T, H, V); g, beta (B, T, H); state
(B, H, K, V). Internally the chunks are laid out as (N, B*H, C, ·), with N = ceil(T / C) chunks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from wmbench.backbones.ops.dtypes import state_dtype as _compute_dtype


class DecayRatios(torch.autograd.Function):
    """R[..., t, j] = exp(b_t - b_j) for t >= j, else 0, from cumulative log decays b (..., C) in float64.

    The differences are taken in float64 and rounded once into R (dtype `dtype`), then masked and exp'd.
    Backward: with G = dR ⊙ R, db_t = sum_j G[t, j] - sum_i G[i, t].
    """

    @staticmethod
    def forward(ctx, b, dtype):
        C = b.shape[-1]
        R = torch.empty(*b.shape, C, dtype=dtype, device=b.device)
        torch.sub(b[..., :, None], b[..., None, :], out=R)
        causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
        R.masked_fill_(~causal, -math.inf).exp_()
        ctx.save_for_backward(R)
        return R

    @staticmethod
    def backward(ctx, dR):
        R, = ctx.saved_tensors
        G = dR * R
        return G.sum(-1).double() - G.sum(-2).double(), None


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + strictly-lower(A))^-1 for A (..., C, C). The diagonal and upper part of A are never read.

    Blockwise doubling, without autograd. The inverse of [[L11, 0], [L21, L22]] is
    [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]. This is applied to the diagonal blocks of size
    1, 2, 4, ..., with C padded up to a power of two.
    """
    C = A.shape[-1]
    P = 1 << (C - 1).bit_length()
    batch = A.shape[:-2]
    if P != C:
        A = F.pad(A, (0, P - C, 0, P - C))
    Tinv = torch.zeros(*batch, P, P, dtype=A.dtype, device=A.device)
    Tinv.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    n = 1
    while n < P:   # Tinv holds the inverses of the diagonal blocks of size n: merge them in pairs
        m = P // (2 * n)
        Ab = A.view(*batch, m, 2 * n, m, 2 * n).diagonal(dim1=-4, dim2=-2)       # (..., 2n, 2n, m) views
        Tb = Tinv.view(*batch, m, 2 * n, m, 2 * n).diagonal(dim1=-4, dim2=-2)    # of the diagonal blocks
        T11, T22, A21 = (x.movedim(-1, -3)                                       # (..., m, n, n)
                         for x in (Tb[..., :n, :n, :], Tb[..., n:, n:, :], Ab[..., n:, :n, :]))
        Tb[..., n:, :n, :].copy_((T22 @ A21 @ T11).neg_().movedim(-3, -1))
        n *= 2
    return Tinv[..., :C, :C]


class UTSolve(torch.autograd.Function):
    """U = Tinv Rv and W = Tinv Rk, with Tinv = (I + A)^-1. A (..., C, C) is strictly lower triangular;
    its diagonal and upper part are ignored. Rv is (..., C, V) and Rk is (..., C, K).

    Backward: dRv = Tinv^T dU, dRk = Tinv^T dW, and dA = -strictly-lower(dRv U^T + dRk W^T).
    """

    @staticmethod
    def forward(ctx, A, Rv, Rk):
        Tinv = unit_lower_inverse(A)
        U, W = Tinv @ Rv, Tinv @ Rk
        ctx.save_for_backward(Tinv, U, W)
        return U, W

    @staticmethod
    def backward(ctx, dU, dW):
        Tinv, U, W = ctx.saved_tensors
        dRv, dRk = Tinv.mT @ dU, Tinv.mT @ dW
        dA = dRv @ U.mT                                                         # (..., C, C)
        dA.flatten(0, -3).baddbmm_(dRk.flatten(0, -3), W.flatten(0, -3).mT)     # += dRk W^T
        return dA.tril_(-1).neg_(), dRv, dRk


class ChunkStates(torch.autograd.Function):
    """The sequential part of the chunked form: the state entering every chunk.

    For n = 0 .. N-1:  Delta_n = U_n - W_n S_n  and  S_{n+1} = gamma_n S_n + Kd_n^T Delta_n.
    U is (N, BH, C, V); W and Kd are (N, BH, C, K); gamma (N, BH) holds the chunk decays Gamma_C;
    S0 is (BH, K, V).
    Returns S (N, BH, K, V), where S[n] is the state entering chunk n, then Delta (N, BH, C, V) and the
    final state S_N (BH, K, V).
    The backward runs the loop in reverse, with two matmuls per chunk. The other two are batched over
    all chunks.
    """

    @staticmethod
    def forward(ctx, U, W, Kd, gamma, S0):
        N = U.shape[0]
        S = U.new_empty(N, *S0.shape)
        Delta = torch.empty_like(U)
        s = S0
        for n in range(N):
            S[n] = s
            torch.baddbmm(U[n], W[n], s, alpha=-1, out=Delta[n])
            s = torch.baddbmm(s * gamma[n, :, None, None], Kd[n].mT, Delta[n])
        ctx.save_for_backward(W, Kd, gamma, S, Delta)
        return S, Delta, s

    @staticmethod
    def backward(ctx, dS, dDelta, ds):
        W, Kd, gamma, S, Delta = ctx.saved_tensors
        dS_next = torch.empty_like(S)       # dS_next[n]: the gradient of the state leaving chunk n
        dD = torch.empty_like(Delta)        # the gradient of Delta_n, through both of its uses
        for n in reversed(range(S.shape[0])):
            dS_next[n] = ds
            torch.baddbmm(dDelta[n], Kd[n], ds, out=dD[n])
            ds = torch.baddbmm(dS[n], W[n].mT, dD[n], alpha=-1).add_(ds * gamma[n, :, None, None])
        dW = (dD @ S.mT).neg_()
        dKd = Delta @ dS_next.mT
        dgamma = (S * dS_next).sum((-1, -2))
        return dD, dW, dKd, dgamma, ds


def gated_delta_rule(q, k, v, g, beta, scale=None, state=None, chunk_size=64):
    """The gated delta rule over a sequence, in the chunked WY/UT form (see the module docstring).

    q, k (B, T, H, K), already L2-normalised; v (B, T, H, V); g (B, T, H) log decay <= 0;
    beta (B, T, H) in (0, 1); state (B, H, K, V) or None (zeros).
    Returns o (B, T, H, V) in v's dtype, and the final state (B, H, K, V) in float32 (float64 for
    float64 inputs). Any T works. The chunk length is evened out over T (a 7-token prefill is one
    chunk of 7). The last chunk is padded with tokens that leave the state unchanged
    (q = k = v = 0, g = 0, beta = 0).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt, out_dtype = _compute_dtype(v), v.dtype
    scale = K ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):       # dtypes are managed explicitly here
        S0 = torch.zeros(B, H, K, V, dtype=dt, device=v.device) if state is None else state.to(dt)
        if T == 0:
            return v.new_zeros(B, 0, H, V), S0
        N = -(-T // int(chunk_size))                          # number of chunks
        C = -(-T // N)                                        # chunk length
        pad = N * C - T

        def chunked(x, dtype=dt):   # (B, T, H, D) -> (N, B*H, C, D), zero-padded to N*C tokens
            x = x.to(dtype)
            if pad:
                x = F.pad(x, (0, 0, 0, 0, 0, pad))
            return x.reshape(B, N, C, H, -1).permute(1, 0, 3, 2, 4).reshape(N, B * H, C, x.shape[-1])

        q, k, v, beta = chunked(q), chunked(k), chunked(v), chunked(beta[..., None])   # beta (N, BH, C, 1)
        b = chunked(g[..., None], torch.float64)[..., 0].cumsum(-1)   # (N, BH, C) log Gamma_t, float64
        ratio = DecayRatios.apply(b, dt)                              # (N, BH, C, C) Gamma_t/Gamma_j, t >= j
        Gamma = b.exp().to(dt)[..., None]                             # (N, BH, C, 1)

        # the UT transform: (I + A) [U W] = diag(beta) [V  Gamma⊙K]. A is zero above the diagonal
        # (ratio is) and its diagonal is never read
        A = (k * beta) @ k.mT * ratio                                                  # (N, BH, C, C)
        U, W = UTSolve.apply(A, v * beta, k * (Gamma * beta))                          # (N, BH, C, V|K)
        P = q @ k.mT * ratio                                                           # (N, BH, C, C)
        Kd = k * (b[..., -1:] - b).exp().to(dt)[..., None]                       # Gamma_C/Gamma_j ⊙ k_j

        # across chunks: Delta = U - W S_0, and S_C = Gamma_C S_0 + Kd^T Delta
        gamma = b[..., -1].exp().to(dt)                                                # (N, BH)
        S, Delta, S_final = ChunkStates.apply(U, W, Kd, gamma, S0.reshape(B * H, K, V))

        # O = scale [ (Gamma ⊙ Q) S_0 + P Delta ], all chunks at once
        o = torch.baddbmm(((q * (Gamma * scale)) @ S).flatten(0, 1), P.flatten(0, 1), Delta.flatten(0, 1),
                          alpha=scale)                                                 # (N*BH, C, V)
        o = o.view(N, B, H, C, V).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(out_dtype), S_final.view(B, H, K, V)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One token of the gated delta rule (the recurrence itself), for a backbone's `step`.

    q, k (B, H, K), L2-normalised; v (B, H, V); g, beta (B, H); state (B, H, K, V).
    Returns o (B, H, V) in v's dtype, and the new state (B, H, K, V) in float32 (float64 for
    float64 inputs).
    """
    dt = _compute_dtype(v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        q, k, vt, g, beta, S = (x.to(dt) for x in (q, k, v, g, beta, state))
        S = S * g.exp()[..., None, None]                                      # a_t S_{t-1}
        delta = beta[..., None] * (vt - (k[..., None, :] @ S).squeeze(-2))   # beta_t (v_t - a_t S^T k_t)
        S = S + k[..., :, None] * delta[..., None, :]                         # + k_t delta_t^T
        o = scale * (q[..., None, :] @ S).squeeze(-2)                         # S_t^T q_t  (B, H, V)
    return o.to(v.dtype), S
