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
All but the state is computed for many chunks at once: batched matmuls, and (I - A_ab)^{-1} by the
blockwise doubling of ops.delta_rule.unit_lower_inverse (torch.linalg.solve_triangular makes one small
trsm call per matrix on a CPU, and those stall for seconds when the cores are shared). The state is
then carried across chunks by S <- S M + N, one (V, K) x (K, K) matmul per chunk, and the outputs get
their Q S_0^T term in one more batched matmul.

Groups and backward. The chunks are processed in groups of G consecutive chunks (all of them for
small inputs), each group's tensors below GROUP_ELEMENTS elements, so that a CPU's memory allocator
recycles one group's temporaries for the next (see _ChunkedRWKV7). The backward is written by hand
(_group_backward): every step of the forward reversed, with in-place accumulation.

Numerical stability. The pair matrices are matmuls of decayed receivers and senders, factored through
a reference token m in the middle of the chunk: exp(gx_t - g_s) = exp(gx_t - g_m) exp(g_m - g_s). Each
factor is exp of a sum of at most C/2 log decays, so it lies within exp(+-C max|w| / 2); the product
for a pair s <= t is the true decay ratio (<= 1), and the pairs s > t are masked out. The chunk is
halved (a power of two, at most chunk_size) until C max|w| <= 0.9 log(largest float), i.e. about 80
in float32, so no factor over- or underflows: RWKV-7's w > -0.61 keeps chunk_size = 64, while float32
inputs with w = -20 are still computed exactly, in chunks of 2 (slower; float64 uses chunks of 16).
The other decays, exp(g), exp(ge) and exp(g_C - g), are <= 1 and are formed from the same factors.

Shapes (public functions): r, w, k, a, b (B, T, H, K); v (B, T, H, V); state (B, H, V, K).
Float32 and bfloat16 inputs are computed in float32, float64 in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from wmbench.backbones.ops.delta_rule import unit_lower_inverse


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


GROUP_ELEMENTS = 1 << 22   # at most this many elements in a group's (chunks, B*H, C, max(C, K, V)) tensor


def _group_forward(r, w, k, v, a, b, S, keep: bool):
    """The chunks of one group, laid out (G, BH, C, .) in the compute dtype, entering with state S (BH, V, K).

    Returns O (G, BH, C, V), the state leaving the group, and (when keep) what the backward needs.
    With the decayed receivers and senders r~ = r e^(g - g_m), a~ = a e^(ge - g_m), k~ = k e^(g_m - g),
    b~ = b e^(g_m - g), the pair matrices are A_xy = mask(x~ y~^T); the other decays are e^(g_m),
    e^(g_C - g_m) and e^(g_C) per chunk.
    """
    G, BH, C, K = k.shape
    g = w.cumsum(-2)                                                   # (G, BH, C, K), <= 0
    m = (C - 1) // 2
    g_m = g[..., m:m + 1, :]                                           # (.., 1, K): the reference token
    er = torch.exp(g - g_m)
    ea = torch.exp((g - w).sub_(g_m))                                  # e^(ge - g_m)
    es = torch.reciprocal(er)                                          # e^(g_m - g)
    rt, at, kt, bt = r * er, a * ea, k * es, b * es
    A_rk = (rt @ kt.mT).tril_()                                        # (G, BH, C, C), s <= t
    A_rb = (rt @ bt.mT).tril_()
    A_ak = (at @ kt.mT).tril_(-1)                                      # s < t
    Tinv = unit_lower_inverse((at @ bt.mT).neg_())                     # (I - A_ab)^-1
    emc = torch.exp(g_m)                                               # e^(g_m)       (.., 1, K)
    eC = torch.exp(g[..., -1:, :] - g_m)                               # e^(g_C - g_m) (.., 1, K)
    eg_C = torch.exp(g[..., -1, :])                                    # e^(g_C)       (.., K)
    del g, g_m
    U = Tinv @ (A_ak @ v)                                              # U_v (G, BH, C, V)
    P = Tinv @ (at * emc)                                              # (G, BH, C, K)
    O = A_rb @ U                                                       # O_intra = A_rb U + A_rk V
    O.flatten(0, 1).baddbmm_(A_rk.flatten(0, 1), v.flatten(0, 1))
    Q = (A_rb @ P).addcmul_(rt, emc)
    bend, kend = bt * eC, kt * eC                                      # B^, K^
    N = U.mT @ bend                                                    # (G, BH, V, K) = U^T B^ + V^T K^
    N.flatten(0, 1).baddbmm_(v.flatten(0, 1).mT, kend.flatten(0, 1))
    M = P.mT @ bend                                                    # (G, BH, K, K)
    M.diagonal(dim1=-2, dim2=-1).add_(eg_C)
    del bend, kend
    S_in = torch.empty_like(N)                                         # the state entering each chunk
    for n in range(G):
        S_in[n] = S
        S = torch.baddbmm(N[n], S, M[n])
    del N
    O.flatten(0, 1).baddbmm_(Q.flatten(0, 1), S_in.flatten(0, 1).mT)   # O = O_intra + Q S_in^T
    saved = (v, er, ea, es, rt, at, kt, bt, A_rk, A_rb, A_ak, Tinv, U, P, Q, M, S_in, emc, eC, eg_C) if keep else ()
    return O, S, saved


def _group_backward(saved, dO, dS):
    """Gradients of one group from dO (G, BH, C, V) and dS, the gradient of the state leaving it.

    Returns dr, dw, dk, dv, da, db (G, BH, C, .) and the gradient of the state entering the group.
    Every step of _group_forward reversed, accumulating in place (baddbmm_, addcmul_).
    """
    (v, er, ea, es, rt, at, kt, bt, A_rk, A_rb, A_ak, Tinv, U, P, Q, M, S_in, emc, eC, eg_C) = saved
    G, BH, C, _ = v.shape
    m = (C - 1) // 2
    flat = lambda x: x.flatten(0, 1)                                   # noqa: E731  3-d views for baddbmm_
    # the state: O = .. + Q S_in^T and S_{n+1} = S_n M_n + N_n, backwards through the chunks
    dQ = dO @ S_in                                                     # (G, BH, C, K)
    dS_out = dO.mT @ Q                                                 # dO^T Q, then d(state leaving chunk n)
    for n in reversed(range(G)):
        dS_prev = torch.baddbmm(dS_out[n], dS, M[n].mT)                # d S_in[n] = dO^T Q + dS M^T
        dS_out[n] = dS
        dS = dS_prev
    dM = S_in.mT @ dS_out                                              # (G, BH, K, K); dN = dS_out
    # N = U^T B^ + V^T K^ and M = diag(e^g_C) + P^T B^, with B^ = b~ eC, K^ = k~ eC
    bend = bt * eC
    dU = bend @ dS_out.mT                                              # (G, BH, C, V)
    dP = bend @ dM.mT                                                  # (G, BH, C, K)
    del bend
    dbend = U @ dS_out
    flat(dbend).baddbmm_(flat(P), flat(dM))
    dv = (kt * eC) @ dS_out.mT
    dkend = v @ dS_out
    deC = torch.linalg.vecdot(dbend, bt, dim=-2).add_(torch.linalg.vecdot(dkend, kt, dim=-2))   # (.., K)
    dgC = torch.diagonal(dM, dim1=-2, dim2=-1) * eg_C                  # (G, BH, K)
    del dM, dS_out
    # Q = r~ e^(g_m) + A_rb P and O_intra = A_rb U + A_rk V
    flat(dP).baddbmm_(flat(A_rb).mT, flat(dQ))
    dA_rb = dQ @ P.mT
    flat(dA_rb).baddbmm_(flat(dO), flat(U).mT).tril_()
    flat(dU).baddbmm_(flat(A_rb).mT, flat(dO))
    dA_rk = (dO @ v.mT).tril_()
    flat(dv).baddbmm_(flat(A_rk).mT, flat(dO))
    # [U | P] = (I - A_ab)^-1 [A_ak V | a~ e^(g_m)]
    dX = Tinv.mT @ dU
    dY = Tinv.mT @ dP
    del dU, dP
    dA_ab = dX @ U.mT
    flat(dA_ab).baddbmm_(flat(dY), flat(P).mT).tril_(-1)
    dA_ak = (dX @ v.mT).tril_(-1)
    flat(dv).baddbmm_(flat(A_ak).mT, flat(dX))
    del dX
    # the pair matrices A_xy = mask(x~ y~^T)
    drt = dA_rk @ kt
    flat(drt).baddbmm_(flat(dA_rb), flat(bt))
    dat = dA_ak @ kt
    flat(dat).baddbmm_(flat(dA_ab), flat(bt))
    dkt = dA_rk.mT @ rt
    flat(dkt).baddbmm_(flat(dA_ak).mT, flat(at))
    dbt = dA_rb.mT @ rt
    flat(dbt).baddbmm_(flat(dA_ab).mT, flat(at))
    del dA_rk, dA_rb, dA_ak, dA_ab
    # the elementwise terms: r~ e^(g_m) in Q, a~ e^(g_m) in the solve, b~ eC and k~ eC in the state
    demc = torch.linalg.vecdot(dQ, rt, dim=-2).add_(torch.linalg.vecdot(dY, at, dim=-2))         # (.., K)
    drt.addcmul_(dQ, emc)
    dat.addcmul_(dY, emc)
    dbt.addcmul_(dbend, eC)
    dkt.addcmul_(dkend, eC)
    del dQ, dY, dbend, dkend
    # back through the decays, x~ = x e^(+-(g - g_m)): dg collects d/dg (ge = g - w adds dga to it)
    dg = drt * rt
    dg.addcmul_(dkt, kt, value=-1).addcmul_(dbt, bt, value=-1)
    dga = dat * at
    dg.add_(dga)
    dr, da, dk, db = drt.mul_(er), dat.mul_(ea), dkt.mul_(es), dbt.mul_(es)
    # g_m and g_C: d g_m = -sum_t dg + demc e^(g_m) - deC eC;  d g_C = dgC + deC eC
    deC.mul_(eC[..., 0, :])
    dg_m = demc.mul_(emc[..., 0, :]).sub_(dg.sum(-2)).sub_(deC)
    dg[..., m, :] += dg_m
    dg[..., -1, :] += dgC.add_(deC)
    # g = cumsum(w): dw = the reverse cumulative sum of dg, minus the ge = g - w term
    cs = dg.cumsum(-2)                                                 # sum_{s >= t} = total - sum_{s < t}
    total = cs[..., -1:, :].clone()
    dw = cs.neg_().add_(dg).add_(total).sub_(dga)
    return dr, dw, dk, dv, da, db, dS


class _ChunkedRWKV7(torch.autograd.Function):
    """The chunked recurrence with a hand-written backward, over groups of G chunks at a time.

    r, w, k, a, b (B, T, H, K), v (B, T, H, V), S0 (B, H, V, K) -> o (B, T, H, V) in v's dtype, the
    final state (B, H, V, K) in the compute dtype cdt. Each group's tensors are laid out (G, B*H, C, .)
    and stay below GROUP_ELEMENTS, so that on a CPU the memory allocator recycles the temporaries of
    one group for the next instead of mapping fresh pages (glibc maps every tensor above 32 MiB anew,
    and page-faults it at each use: at B 16, L 1664, d_model 512 whole-sequence temporaries cost more
    than the arithmetic). Keeping each group's intermediates for the backward measured faster than
    recomputing them there (1.5x vs 2.6x Mamba-2's fwd+bwd time).
    """

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, S0, C, G, cdt):
        Bsz, T, H, K = k.shape
        V = v.shape[-1]
        Nc = -(-T // C)
        keep = any(ctx.needs_input_grad)
        o = torch.empty(Bsz, Nc * C, H, V, dtype=v.dtype, device=v.device)
        S = S0.to(cdt).reshape(Bsz * H, V, K)
        saved = []
        for c0 in range(0, Nc, G):
            t0, t1 = c0 * C, min(T, (c0 + G) * C)
            xs = [_chunks(x[:, t0:t1], C, cdt) for x in (r, w, k, v, a, b)]
            O, S, kept = _group_forward(*xs, S, keep)
            saved.extend(kept)
            o[:, t0:t0 + O.shape[0] * C].unflatten(1, (-1, C)).copy_(O.view(-1, Bsz, H, C, V).permute(1, 0, 3, 2, 4))
        if keep:
            ctx.save_for_backward(*saved)
            ctx.meta = (Bsz, T, H, K, V, C, G, cdt, [x.dtype for x in (r, w, k, v, a, b, S0)])
        return o[:, :T], S.view(Bsz, H, V, K)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS):
        Bsz, T, H, K, V, C, G, cdt, dtypes = ctx.meta
        saved = ctx.saved_tensors
        Nc = -(-T // C)
        starts = range(0, Nc, G)
        n_saved = len(saved) // len(starts)
        dev = saved[0].device
        grads = [torch.empty(Bsz, Nc * C, H, X, dtype=cdt, device=dev) for X in (K, K, K, V, K, K)]
        dS = torch.zeros(Bsz * H, V, K, dtype=cdt, device=dev) if dS is None else dS.to(cdt).reshape(Bsz * H, V, K)
        for i in reversed(range(len(starts))):
            t0, t1 = starts[i] * C, min(T, (starts[i] + G) * C)
            dO = torch.zeros(Bsz, t1 - t0, H, V, dtype=cdt, device=dev) if do is None else do[:, t0:t1]
            group = _group_backward(saved[i * n_saved:(i + 1) * n_saved], _chunks(dO, C, cdt), dS)
            dS = group[-1]
            for full, d in zip(grads, group[:-1]):
                full[:, t0:t0 + d.shape[0] * C].unflatten(1, (-1, C)).copy_(
                    d.view(-1, Bsz, H, C, d.shape[-1]).permute(1, 0, 3, 2, 4))
        out = [g[:, :T].to(dt) for g, dt in zip(grads, dtypes)]
        return (*out, dS.view(Bsz, H, V, K).to(dtypes[-1]), None, None, None)


def _chunks(x: torch.Tensor, C: int, cdt: torch.dtype) -> torch.Tensor:
    """(B, L, H, X) -> (ceil(L / C), B*H, C, X) in the compute dtype, zero-padded to whole chunks (a
    padded token has w = 0 and all else 0: an identity transition, so the final state is exact)."""
    pad = (-x.shape[1]) % C
    x = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad)) if pad else x.to(cdt)
    x = x.unflatten(1, (-1, C)).permute(1, 0, 3, 2, 4)                # (Nc, B, H, C, X)
    return x.reshape(x.shape[0], -1, C, x.shape[-1])


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
    G = max(1, GROUP_ELEMENTS // (Bsz * H * C * max(C, K, V)))        # chunks per group
    with torch.autocast(v.device.type, enabled=False):   # the dtypes are managed here
        return _ChunkedRWKV7.apply(r, w, k, v, a, b, S, C, G, cdt)


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
