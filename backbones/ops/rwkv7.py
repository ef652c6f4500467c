"""RWKV-7's state update (the diagonal-plus-low-rank generalised delta rule): chunked, in PyTorch.

One head, state S of shape (V, K), one token t (RWKV-7 "Goose", Peng et al. 2025):

    S_t = S_{t-1} (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T          r, w, k, a, b (K,), v (V,)
    o_t = S_t r_t                                                   o (V,)

w_t <= 0 is the log decay. RWKV-7 sets a = -kappa_hat and b = kappa_hat * a_gate (kappa_hat unit norm,
a_gate in (0, 1)), which makes every transition a contraction; the op takes any a, b.

Chunked form. Write u_t = S_{t-1} a_t (V,), so that S_t = S_{t-1} D_t + u_t b_t^T + v_t k_t^T: a
linear attention with per-channel decay and two key/value pairs per token, (b_t, u_t) and (k_t, v_t).
In a chunk of C tokens entering with state S_0, let g_t = w_1 + ... + w_t (inclusive cumulative log
decay, (C, K)) and ge_t = g_{t-1} (exclusive, ge_1 = 0). Unrolling the recurrence inside the chunk:

    u_t = S_0 (a_t * exp(ge_t)) + sum_{s<t}  A_ab[t,s] u_s + sum_{s<t}  A_ak[t,s] v_s
    o_t = S_0 (r_t * exp(g_t))  + sum_{s<=t} A_rb[t,s] u_s + sum_{s<=t} A_rk[t,s] v_s

with the (C, C) pair matrices A_xy[t,s] = sum_i x_t,i y_s,i exp(gx_t,i - g_s,i) (gx = ge for x = a and
g for x = r). In matrix form, with I - A_ab unit lower triangular (the WY-like representation of the
product of the chunk's C transitions):

    [U_v | P] = (I - A_ab)^{-1} [A_ak V | a * exp(ge)]              (C, V) and (C, K)
    U = U_v + P S_0^T                                               the u_t as rows
    O = O_intra + Q S_0^T,  O_intra = A_rb U_v + A_rk V,  Q = r * exp(g) + A_rb P      (C, V), (C, K)
    S_C = S_0 M + N,   M = diag(exp(g_C)) + P^T B^,   N = U_v^T B^ + V^T K^         (K, K), (V, K)

where B^ = b * exp(g_C - g) and K^ = k * exp(g_C - g); M is exactly the product of the C transitions.
All but the state is computed for every chunk at once (batched matmuls and one batched triangular
solve); the state is then carried across chunks by S <- S M + N, one (V, K) x (K, K) matmul per chunk,
and the outputs get their Q S_0^T term in one more batched matmul.

Numerical stability. The pair matrices are matmuls of decayed receivers and senders, factored through
a reference token m in the middle of the chunk: exp(gx_t - g_s) = exp(gx_t - g_m) exp(g_m - g_s). Each
factor is exp of a sum of at most C/2 log decays, so it lies within exp(+-C max|w| / 2); the product
for a pair s <= t is the true decay ratio (<= 1), and the pairs s > t are masked out. The chunk is
halved (a power of two, at most chunk_size) until C max|w| <= 0.9 log(largest float), i.e. about 80
in float32, so no factor over- or underflows: RWKV-7's w > -0.61 keeps chunk_size = 64, while float32
inputs with w = -20 are still computed exactly, in chunks of 2 (slower; float64 uses chunks of 16).
The other decays, exp(g), exp(ge) and exp(g_C - g), are <= 1 and are formed from the same factors.

Shapes (public functions): r, w, k, a, b (B, T, H, K); v (B, T, H, V); state (B, H, V, K).
Float32 and bfloat16 inputs are computed in float32, float64 in float64. Differentiated by autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _stable_chunk_size(w: torch.Tensor, chunk_size: int, T: int, dtype: torch.dtype) -> int:
    """The largest power of two C <= chunk_size (and <= T rounded up) with C max|w| within exp's range."""
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    limit = 0.9 * math.log(torch.finfo(dtype).max)
    w_max = w.detach().abs().max().item() if w.numel() else 0.0
    while C > 1 and C * w_max > limit:
        C //= 2
    return C


def _chunk_transitions(r, w, k, v, a, b):
    """Everything that does not depend on the state entering a chunk, for all chunks at once.

    r, w, k, a, b (..., C, K), v (..., C, V). Returns
      O_intra (..., C, V): the outputs for a zero entering state,
      Q (..., C, K): the outputs are O_intra + Q S_0^T,
      M (..., K, K), N (..., V, K): the state leaving the chunk is S_0 M + N.
    """
    C, K, V = w.shape[-2], k.shape[-1], v.shape[-1]
    g = w.cumsum(-2)                                                   # (..., C, K), <= 0
    ge = F.pad(g[..., :-1, :], (0, 0, 1, 0))                          # g_{t-1}, exactly
    g_m = g[..., (C - 1) // 2, None, :]                                # (..., 1, K) reference token
    # receivers and senders factored through the reference (see the module docstring)
    r_m = r * torch.exp(g - g_m)                                       # (..., C, K)
    a_m = a * torch.exp(ge - g_m)
    from_m = torch.exp(g_m - g)
    k_m, b_m = k * from_m, b * from_m
    A_rk = (r_m @ k_m.mT).tril_()                                      # (..., C, C), s <= t
    A_rb = (r_m @ b_m.mT).tril_()
    A_ak = (a_m @ k_m.mT).tril_(-1)                                    # s < t
    A_ab = (a_m @ b_m.mT).tril_(-1)
    # UP = [U_v | P] = (I - A_ab)^{-1} [A_ak V | a exp(ge)], one batched triangular solve
    exp_gm = torch.exp(g_m)                                            # (..., 1, K)
    rhs = torch.cat([A_ak @ v, a_m * exp_gm], -1)                     # (..., C, V + K)
    eye = torch.eye(C, dtype=g.dtype, device=g.device)
    UP = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    # outputs: O_intra = A_rb U_v + A_rk V and Q = r exp(g) + A_rb P
    O_intra, Q = (A_rb @ UP).split([V, K], -1)                         # (..., C, V), (..., C, K)
    O_intra = O_intra + A_rk @ v
    Q = Q + r_m * exp_gm
    # state: [N; M] = [U_v | P]^T B^ (+ V^T K^ for N, + diag(exp g_C) for M)
    g_C = g[..., -1:, :]                                               # (..., 1, K)
    m_to_end = torch.exp(g_C - g_m)                                    # exp(g_C - g) = from_m * m_to_end
    b_end, k_end = b_m * m_to_end, k_m * m_to_end                      # (..., C, K)
    N, M = (UP.mT @ b_end).split([V, K], -2)                           # (..., V, K), (..., K, K)
    N = N + v.mT @ k_end
    M = M + torch.diag_embed(torch.exp(g_C[..., 0, :]))
    return O_intra, Q, M, N


def rwkv7(r, w, k, v, a, b, state=None, chunk_size=64):
    """RWKV-7's recurrence over a sequence, chunked (see the module docstring).

    r, w, k, a, b (B, T, H, K) with w the log decay (<= 0, finite); v (B, T, H, V); state (B, H, V, K)
    or None (zeros). chunk_size: a power of two, the largest chunk used. Returns o (B, T, H, V) in v's
    dtype and the final state (B, H, V, K) in float32 (float64 for float64 inputs). Any T works.
    """
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    Bsz, T, H, K = k.shape
    V = v.shape[-1]
    cdt = _compute_dtype(v)
    S = torch.zeros(Bsz, H, V, K, dtype=cdt, device=v.device) if state is None else state.to(cdt)
    if T == 0:
        return v.new_zeros(Bsz, 0, H, V), S
    C = _stable_chunk_size(w, chunk_size, T, cdt)
    pad = (-T) % C
    Nc = (T + pad) // C
    with torch.autocast(v.device.type, enabled=False):   # the dtypes are managed here
        # (B, T, H, X) -> (Nc, B, H, C, X) in the compute dtype; padded tokens (w = 0, all else 0)
        # are identity transitions, so the final state is exact
        def chunks(x):
            x = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad)) if pad else x.to(cdt)
            return x.unflatten(1, (Nc, C)).permute(1, 0, 3, 2, 4).contiguous()
        O_intra, Q, M, N = _chunk_transitions(*map(chunks, (r, w, k, v, a, b)))
        # carry the state across chunks: S_{n+1} = S_n M_n + N_n
        entering = []
        for M_n, N_n in zip(M, N):                                     # (B, H, K, K), (B, H, V, K)
            entering.append(S)
            S = torch.baddbmm(N_n.flatten(0, 1), S.flatten(0, 1), M_n.flatten(0, 1)).view(S.shape)
        S_in = torch.stack(entering)                                   # (Nc, B, H, V, K)
        O = (Q @ S_in.mT).add_(O_intra)                                # (Nc, B, H, C, V)
        o = O.permute(1, 0, 3, 2, 4).reshape(Bsz, Nc * C, H, V)[:, :T]
    return o.to(v.dtype), S


def rwkv7_step(r, w, k, v, a, b, state):
    """One token of RWKV-7's recurrence: r, w, k, a, b (B, H, K); v (B, H, V); state (B, H, V, K).

    Returns o (B, H, V) in v's dtype and the new state (B, H, V, K) in float32 (float64 for float64).
    """
    out_dtype, cdt = v.dtype, _compute_dtype(v)
    with torch.autocast(v.device.type, enabled=False):
        r, w, k, v, a, b, S = (x.to(cdt) for x in (r, w, k, v, a, b, state))
        Sa = S @ a[..., None]                                          # (B, H, V, 1)
        S = S * torch.exp(w)[..., None, :] + Sa * b[..., None, :] + v[..., :, None] * k[..., None, :]
        o = (S @ r[..., None])[..., 0]                                 # (B, H, V)
    return o.to(out_dtype), S
