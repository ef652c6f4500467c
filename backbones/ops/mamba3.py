"""Mamba-3 SISO (Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu 2026, arXiv 2603.15569), chunked, in PyTorch.

The recurrence of one head (state h of shape (P, N), as in Mamba-2; all quantities are per token t
and per head unless said otherwise):

    alpha_t = exp(dt_t A_t)                  A_t < 0 data-dependent, dt_t > 0
    gamma_t = lambda_t dt_t                  trapezoid weight of the current token, lambda_t in [0, 1]
    beta_t  = (1 - lambda_t) dt_t alpha_t    trapezoid weight of the previous token
    Theta_t = Theta_{t-1} + theta_t          cumulative rotation angles (S of them), mod 2 pi
    k_t     = R(Theta_t) (B_t + b_B)         B_t, C_t (N,): the layer normalises them; b_B, b_C (N,) per head
    q_t     = R(Theta_t) (C_t + b_C)
    h_t     = alpha_t h_{t-1} + beta_t x_{t-1} k_{t-1}^T + gamma_t x_t k_t^T       x_t (P,)
    y_t     = h_t q_t + D x_t

R(Theta) rotates the pairs of entries (0, 1), (2, 3), ..., (2S-2, 2S-1) by the angles Theta_1..S and
leaves the other N - 2S entries as they are. It is the complex-valued state of the paper written as
data-dependent rotary embeddings: a complex diagonal transition exp(dt (A + i omega)) on pairs of
state entries equals the real decay applied to a state whose inputs and read-outs are rotated by
the accumulated phases, q_t . k_s = (C_t + b_C)^T R(Theta_s - Theta_t) (B_s + b_B). With lambda = 1 it is
Mamba-2's (exponential-Euler) recurrence; lambda = 1/2 is the trapezoid rule.

This is mamba-ssm 2.3.2's `mamba3_siso_step_ref` term for term, but in its arguments after the
activations: mamba-ssm passes the raw trapezoid logits (lambda = sigmoid of them) and raw angles
(theta = pi tanh(angles) dt, shared by the heads except for dt), and applies the z gate in the op; the
layer (backbones/mamba3.py) does these here. `mamba3_siso_step` is the recurrence, one token.

`mamba3_siso` is the chunked form (training and prefill). The two-term input is removed by carrying
the next token's share early. With sg_t = (1 - lambda_{t+1}) dt_{t+1} (and sg = 0 for the last token
of the call, whose successor is not known yet), the shifted state h~_t = h_t + sg_t x_t k_t^T obeys

    h~_t = alpha_t h~_{t-1} + w_t x_t k_t^T,    w_t = gamma_t + sg_t,    h~_0 = h_0 + sg_0 x_0 k_0^T
    y_t  = h~_t q_t - sg_t (q_t . k_t) x_t + D x_t

where h_0, k_0, x_0 come from the state and sg_0 = (1 - lambda_1) dt_1. This is Mamba-2's SSD with a
log decay a_t = dt_t A_t and an input weight w_t that differ, per-head k and q, and a per-token
diagonal: in the (Q, Q) block of a chunk, M[l, s] = (q_l . k_s) exp(cs_l - cs_s) w_s for s < l and
M[l, l] = (q_l . k_l) gamma_l + D (cs: the in-chunk cumulative sum of a). mamba-ssm's reference
(`mamba3_siso_fwd_ref`) computes the same quadratic form, its kernel the same diagonal. The final h~
equals h, since sg = 0 there.

The chunked algorithm is backbones/ops/ssd.py's (intra-chunk blocks, chunk states, a pass across the
chunks, state -> output), generalised to per-token decays, weights and diagonal and to per-head k, q,
in the autograd Function `Mamba3ChunkScan` with a hand-written backward. It runs a group of heads at a
time (the heads are independent): the group's k and q (biases added, pairs rotated as complex numbers)
are built from the shared B, C and never stored for all heads, and its (Q, Q) blocks and chunk states
stay in cache. The pass across chunks is two matmuls per group with the matrix of chunk-to-chunk decays
(as in ssd.py) rather than a loop over the chunks. The cumulative sums of the log decays are taken in
fp64 (their differences keep full precision). Saved for the backward: the inputs, the states entering
the chunks and the (Q, Q) decay blocks. The cumulative angles, the shift by sg and the entering state
are plain autograd around it.

Where this differs from mamba-ssm's references (numerics only, not the math): the cumulative angles are
summed in fp64 and reduced mod 2 pi before rounding to fp32 (the reference: an fp32 cumsum), and the k and
x of the state are kept in fp32. mamba-ssm's Triton kernel computes in bf16.

State (what a call needs to continue exactly): (angle (b, h, S), ssm (b, h, p, n), k (b, h, n), x (b, h, p)):
the cumulative angles mod 2 pi, h_t, the last token's rotated and biased k_t, and its x_t (mamba-ssm's
(Angle_State, SSM_State, K_State, V_State)). Angles and ssm are fp32 (fp64 for fp64 inputs); k, x too.

Shapes: x (b, l, h, p); dt, A, lam (b, l, h); B, C (b, l, g, n), h % g == 0, head i uses group
i // (h / g); theta (b, l, h, S), S <= n / 2 (None: no rotation); D (h,); B_bias, C_bias (h, n).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from wmbench.backbones.ops.dtypes import state_dtype as _sd


TWO_PI = 2 * math.pi


def _decay_blocks(cs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """cs (..., Q) inclusive cumsums -> out (..., Q, Q) = exp(cs_l - cs_s) for l >= s, else 0.

    The differences are taken in fp64 and rounded once, so large cumulative sums do not cancel."""
    Q = cs.shape[-1]
    cs64 = cs.double()
    torch.sub(cs64[..., :, None], cs64[..., None, :], out=out)
    out.masked_fill_(~torch.ones(Q, Q, dtype=torch.bool, device=cs.device).tril(), -math.inf)
    return out.exp_()


def _rotate_(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t <- R(Theta) t in place: the pairs (t_2j, t_2j+1), j < S, rotate by Theta_j (cos, sin (..., S))."""
    S = cos.shape[-1]
    if S:
        t0, t1 = t[..., 0:2 * S:2], t[..., 1:2 * S:2]
        r0 = t0 * cos - t1 * sin
        t1.mul_(cos).addcmul_(t0, sin)
        t0.copy_(r0)
    return t


# --------------------------------------------------------------------------------------------------
# the chunked scan: Mamba-2's SSD with per-token decay a, weight w and diagonal gamma, and the per-head
# biases and rotations of k and q applied on the fly
# --------------------------------------------------------------------------------------------------

class Mamba3ChunkScan(torch.autograd.Function):
    """Y, final = the chunked scan of h~_t = exp(a_t) h~_{t-1} + w_t x_t k_t^T and
    y_t = h~_t q_t - sg_t (q_t.k_t) x_t + D x_t (sg_t = w_t - gamma_t), with k_t = R(Theta_t)(B_t + B_bias)
    and q_t = R(Theta_t)(C_t + C_bias) per head.

    Head-major shapes, L a multiple of Q, all contiguous and of one dtype (fp32 or fp64): x (h, b, L, p);
    a, w, gamma (h, b, L); D (h,); B, C (b, L, g, n); B_bias, C_bias (h, n); Theta (h, b, L, S); h0 (b, h, p, n).
    Returns Y (h, b, L, p) and the final state (b, h, p, n).

    In a chunk's (Q, Q) block, token l reads token s < l with (q_l . k_s) exp(cs_l - cs_s) w_s and itself
    with (q_l . k_l) gamma_l + D: its own w_l (which holds token l+1's dt and lambda) never enters its
    output, so the outputs are exactly causal, as in mamba-ssm's kernel.
    The heads are independent, so all four steps run for a group of heads at a time (_groups: blocks of at
    most GROUP_BYTES): the group's k and q are built from the shared B, C and dropped (the backward
    rebuilds them), and its blocks and states stay in cache. Across chunks, two matmuls with the
    (nc+1, nc+1) matrix of chunk-to-chunk decays replace a loop over the chunks. That keeps the op count
    to a few dozen per group: on a shared CPU each intra-op parallel region waits for all its threads, so
    the number of ops counts, not only the flops. Saved for the backward: the inputs, the states entering
    the chunks and the (Q, Q) decay blocks.
    """

    @staticmethod
    def forward(ctx, x, a, w, gamma, D, B, C, B_bias, C_bias, Th, h0, Q):
        with torch.autocast(x.device.type, enabled=False):
            Y, final, saved = _scan_forward(x, a, w, gamma, D, B, C, B_bias, C_bias, Th, h0, Q)
        ctx.save_for_backward(*saved)
        ctx.Q = Q
        return Y, final

    @staticmethod
    def backward(ctx, dY, dfinal):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return (*_scan_backward(ctx.saved_tensors, ctx.Q, dY, dfinal), None)


GROUP_BYTES = 28 << 20


def _groups(h: int, per_head_bytes: int):
    """Head ranges processed together: as many heads as keep one (heads, b, L, n) block under GROUP_BYTES.

    Fewer, larger ops suit a shared CPU (each intra-op parallel region waits for all its threads), smaller
    blocks stay in cache, and blocks above glibc's 32 MB mmap threshold come fresh from the kernel, page
    faults and all, every time."""
    hg = max(1, min(h, GROUP_BYTES // max(per_head_bytes, 1)))
    return [(i, min(i + hg, h)) for i in range(0, h, hg)]


def _rotation(Th: torch.Tensor, n: int):
    """What rotates pairs by Theta (..., S): exp(i Theta) (complex) for even n, else (cos, sin); None if S = 0."""
    if Th.shape[-1] == 0:
        return None
    if n % 2 == 0:
        return torch.polar(torch.ones((), dtype=Th.dtype, device=Th.device), Th)
    return torch.cos(Th), torch.sin(Th)


def _pairs(t: torch.Tensor, S: int) -> torch.Tensor:
    """The first S pairs of t (..., n), n even, as complex numbers (a view)."""
    return torch.view_as_complex(t[..., :2 * S].unflatten(-1, (S, 2)))


def _build(X, bias, rot, lo, h):
    """k (or q) of heads lo .. lo+hh-1 of h, (hh, b, L, n): each head's group of X (b, L, g, n) plus the head's
    bias (bias: (hh, n)), its pairs rotated (rot: from _rotation, (hh, b, L, S))."""
    hh, (b, L, g, n) = bias.shape[0], X.shape
    r = h // g
    t = torch.empty(hh, b, L, n, dtype=X.dtype, device=X.device)
    for gi in range(lo // r, (lo + hh - 1) // r + 1):     # the groups these heads read
        i0, i1 = max(lo, gi * r), min(lo + hh, (gi + 1) * r)
        torch.add(X[:, :, gi], bias[i0 - lo:i1 - lo, None, None], out=t[i0 - lo:i1 - lo])
    if isinstance(rot, torch.Tensor):
        _pairs(t, rot.shape[-1]).mul_(rot)
    elif rot is not None:
        _rotate_(t, *rot)
    return t


def _unrotate_(d: torch.Tensor, out: torch.Tensor, rot) -> torch.Tensor:
    """Backward of out = R(Theta) u: returns dTheta = Im(conj(out) d) per pair, and d <- R(Theta)^T d in place."""
    if rot is None:
        return d.new_zeros(*d.shape[:-1], 0)
    if isinstance(rot, torch.Tensor):
        S = rot.shape[-1]
        dc = _pairs(d, S)
        dTh = (_pairs(out, S).conj() * dc).imag
        dc.mul_(rot.conj())
        return dTh
    cos, sin = rot
    S = cos.shape[-1]
    d0, d1 = d[..., 0:2 * S:2], d[..., 1:2 * S:2]
    o0, o1 = out[..., 0:2 * S:2], out[..., 1:2 * S:2]
    dTh = d1 * o0 - d0 * o1
    r0 = d0 * cos + d1 * sin
    d1.mul_(cos).addcmul_(d0, sin, value=-1.0)
    d0.copy_(r0)
    return dTh


def _chunk_decays(cs: torch.Tensor, h: int, b: int, nc: int, dtype: torch.dtype) -> torch.Tensor:
    """P (h*b, nc+1, nc+1): P[i, j] = exp(a_chunk j + ... + a_chunk i-1) for i >= j, else 0, where the chunk
    log decays are the last in-chunk cumulative sums cs[..., -1] (h, b*nc, Q): the decay from the end of chunk
    j-1 to the end of chunk i-1 (index 0 = the entering state)."""
    cum = F.pad(cs[..., -1].reshape(h * b, nc).double().cumsum(-1), (1, 0))
    return _decay_blocks(cum, torch.empty(h * b, nc + 1, nc + 1, dtype=dtype, device=cs.device))


def _scan_forward(x, a, w, gamma, D, B, C, B_bias, C_bias, Th, h0, Q):
    h, b, L, p = x.shape
    n = B.shape[3]
    nc = L // Q
    bc, pn = b * nc, p * n
    dtype, dev = x.dtype, x.device
    # in-chunk cumulative log decays, summed in fp64 so that their differences keep full precision
    cs = a.view(h, bc, Q).double().cumsum(-1)
    ecs = torch.exp(cs).to(dtype)
    ww = torch.exp(cs[..., -1:] - cs).to(dtype).mul_(w.view(h, bc, Q))   # exp(cs_last - cs_s) w_s
    P = _chunk_decays(cs, h, b, nc, dtype)                            # (h*b, nc+1, nc+1)
    h0P = P[:, :, :1] * h0.permute(1, 0, 2, 3).reshape(h * b, 1, pn)  # P[:, 0] h0: (h*b, nc+1, pn)
    Y = torch.empty(h, bc, Q, p, dtype=dtype, device=dev)
    E = torch.empty(h, bc, Q, Q, dtype=dtype, device=dev)
    Hin = torch.empty(h, bc, p, n, dtype=dtype, device=dev)          # the state entering each chunk
    final = torch.empty(h, b, p, n, dtype=dtype, device=dev)
    for lo, hi in _groups(h, b * L * n * x.element_size()):
        N, hb = (hi - lo) * bc, (hi - lo) * b
        rot = _rotation(Th[lo:hi], n)
        Kc = _build(B, B_bias[lo:hi], rot, lo, h).view(N, Q, n)
        Cc = _build(C, C_bias[lo:hi], rot, lo, h).view(N, Q, n)
        xg, wg, gg = x[lo:hi].view(N, Q, p), w[lo:hi].view(N, Q), gamma[lo:hi].view(N, Q)
        # 1. intra-chunk: Y = W (w o x) + (D + gamma o diag(C K^T)) o x with W = (C K^T) o E strictly below
        # the diagonal (E: the decay blocks). Token l's own term uses gamma_l, never w_l, which depends on
        # token l+1: the output stays exactly causal
        W = torch.bmm(Cc, Kc.transpose(1, 2))                         # (N, Q, Q)
        dv = torch.addcmul(D[lo:hi, None, None].expand(hi - lo, bc, Q).reshape(N, Q), gg,
                           W.diagonal(dim1=-2, dim2=-1))
        W.mul_(_decay_blocks(cs[lo:hi].view(N, Q), E[lo:hi].view(N, Q, Q))).diagonal(dim1=-2, dim2=-1).zero_()
        torch.baddbmm(xg * dv[..., None], W, xg * wg[..., None], out=Y[lo:hi].view(N, Q, p))
        del W
        # 2. chunk states S_c = x^T (K o exp(cs_last - cs) w)
        Sc = torch.bmm(xg.transpose(1, 2), Kc.mul_(ww[lo:hi].view(N, Q, 1))).view(hb, nc, pn)
        # 3. across chunks: Hin_c = P[c, 0] h0 + sum_{c' < c} P[c, c'+1] S_c', and the final state (row nc),
        # as matmuls
        Pg, h0g = P[lo * b:hi * b], h0P[lo * b:hi * b]
        torch.baddbmm(h0g[:, :nc], Pg[:, :nc, 1:], Sc, out=Hin[lo:hi].view(hb, nc, pn))
        torch.baddbmm(h0g[:, nc:], Pg[:, nc:, 1:], Sc, out=final[lo:hi].view(hb, 1, pn))
        # 4. state -> output: y_l += exp(cs_l) q_l Hin^T
        Y[lo:hi].view(N, Q, p).addcmul_(torch.bmm(Cc, Hin[lo:hi].view(N, p, n).transpose(1, 2)),
                                        ecs[lo:hi].view(N, Q, 1))
    return (Y.view(h, b, L, p), final.permute(1, 0, 2, 3).contiguous(),
            (x, a, w, gamma, D, B, C, B_bias, C_bias, Th, Hin, E))


def _scan_backward(saved, Q, dY, dfinal):
    x, a, w, gamma, D, B, C, B_bias, C_bias, Th, Hin, E = saved
    h, b, L, p = x.shape
    g, n, S = B.shape[2], B.shape[3], Th.shape[-1]
    r, nc = h // g, L // Q
    bc, pn = b * nc, p * n
    dtype, dev = x.dtype, x.device
    dY = torch.zeros_like(x) if dY is None else dY.to(dtype).contiguous()
    dfinal = torch.zeros(b, h, p, n, dtype=dtype, device=dev) if dfinal is None else dfinal.to(dtype)
    cs = a.view(h, bc, Q).double().cumsum(-1)
    ecs = torch.exp(cs).to(dtype)
    wdec = torch.exp(cs[..., -1:] - cs).to(dtype)                     # exp(cs_last - cs_s)
    ww = wdec * w.view(h, bc, Q)
    P = _chunk_decays(cs, h, b, nc, dtype)
    # the final state's gradient, spread over the chunks by P's last row: dS gets P[nc, c+1] dfinal, dh0
    # P[nc, 0] dfinal (the states entering the chunks add theirs below)
    dfP = P[:, nc:, :].transpose(1, 2) * dfinal.permute(1, 0, 2, 3).reshape(h * b, 1, pn)   # (h*b, nc+1, pn)
    dX = torch.empty(h, bc, Q, p, dtype=dtype, device=dev)
    da = torch.empty(h, bc, Q, dtype=dtype, device=dev)
    dw = torch.empty(h, bc, Q, dtype=dtype, device=dev)
    dgamma = torch.empty(h, bc, Q, dtype=dtype, device=dev)
    dD = torch.empty(h, dtype=dtype, device=dev)
    dB = torch.zeros(g, b, L, n, dtype=dtype, device=dev)
    dC = torch.zeros(g, b, L, n, dtype=dtype, device=dev)
    dB_bias = torch.empty(h, n, dtype=dtype, device=dev)
    dC_bias = torch.empty(h, n, dtype=dtype, device=dev)
    dTh = torch.empty(h, b, L, S, dtype=dtype, device=dev)
    dh0 = torch.empty(h, b, p, n, dtype=dtype, device=dev)
    for lo, hi in _groups(h, b * L * n * x.element_size()):
        hh = hi - lo
        N, hb = hh * bc, hh * b
        rot = _rotation(Th[lo:hi], n)
        K4, C4 = _build(B, B_bias[lo:hi], rot, lo, h), _build(C, C_bias[lo:hi], rot, lo, h)
        Kc, Cc = K4.view(N, Q, n), C4.view(N, Q, n)
        xg, dyg = x[lo:hi].view(N, Q, p), dY[lo:hi].view(N, Q, p)
        wg, gg, Hg = w[lo:hi].view(N, Q), gamma[lo:hi].view(N, Q), Hin[lo:hi].view(N, p, n)
        wwg, wdg, ecg = ww[lo:hi].view(N, Q), wdec[lo:hi].view(N, Q), ecs[lo:hi].view(N, Q)
        dXg = dX[lo:hi].view(N, Q, p)
        dys = dyg * ecg[..., None]
        # ---- 4. state -> output, y_l += ecs_l q_l Hin^T
        dHin = torch.bmm(dys.transpose(1, 2), Cc).view(hb, nc, pn)
        dCc = torch.bmm(dys, Hg)                                      # (N, Q, n)
        dcs = (dCc * Cc).sum(-1)                                      # through ecs
        # ---- 3. across chunks: Hin = P[:nc, 1:] S + P[:nc, :1] h0, final = P[nc:, 1:] S + P[nc:, :1] h0, so
        # dS = P[:nc, 1:]^T dHin + P[nc, 1:]^T dfinal and dh0 = P[:nc, 0]^T dHin + P[nc, 0] dfinal; the
        # chunk's log decay gets e_c <Hin_c, dS_c> (dS_c: the gradient of the state leaving chunk c)
        Pg, dfg = P[lo * b:hi * b], dfP[lo * b:hi * b]
        dS = torch.baddbmm(dfg[:, 1:], Pg[:, :nc, 1:].transpose(1, 2), dHin)
        torch.baddbmm(dfg[:, :1], Pg[:, :nc, :1].transpose(1, 2), dHin, out=dh0[lo:hi].view(hb, 1, pn))
        del dHin
        dcs[:, -1] += torch.bmm(Hg.view(N, 1, pn), dS.view(N, pn, 1)).view(N) * ecg[:, -1]
        # ---- 2. chunk states: S = x^T Kw, Kw = K o ww
        dS = dS.view(N, p, n)
        dKc = torch.bmm(xg, dS)                                       # d Kw (N, Q, n), scaled below
        torch.bmm(Kc * wwg[..., None], dS.transpose(1, 2), out=dXg)
        del dS
        rs = (dKc * Kc).sum(-1).mul_(wdg)                             # d w_s through the chunk states
        dKc.mul_(wwg[..., None])
        # ---- 1. intra-chunk: Y = W (w o x) + dv o x, W = CB o E strictly below the diagonal,
        # dv = D + gamma o diag(CB)
        W = torch.bmm(Cc, Kc.transpose(1, 2))
        CBd = W.diagonal(dim1=-2, dim2=-1).clone()
        Eg = E[lo:hi].view(N, Q, Q)
        W.mul_(Eg).diagonal(dim1=-2, dim2=-1).zero_()
        dv = torch.addcmul(D[lo:hi, None, None].expand(hh, bc, Q).reshape(N, Q), gg, CBd)
        t = torch.bmm(W.transpose(1, 2), dyg)                         # W^T dy (N, Q, p)
        dXg.addcmul_(t, wg[..., None]).addcmul_(dyg, dv[..., None])
        torch.add((t * xg).sum(-1), rs, out=dw[lo:hi].view(N, Q))
        del t
        dd = (dyg * xg).sum(-1)                                       # d dv
        dD[lo:hi] = dd.view(hh, -1).sum(-1)
        torch.mul(dd, CBd, out=dgamma[lo:hi].view(N, Q))
        dW = torch.bmm(dyg, (xg * wg[..., None]).transpose(1, 2))     # dy (w o x)^T (N, Q, Q)
        P1 = W.mul_(dW)                                               # dW o W: d cs through E
        dcs += P1.sum(-1) - P1.sum(-2)
        del P1, W
        dCB = dW.mul_(Eg)
        torch.mul(dd, gg, out=dCB.diagonal(dim1=-2, dim2=-1))         # the diagonal: d (q.k) = dd gamma
        dKc.baddbmm_(dCB.transpose(1, 2), Cc)
        dCc.baddbmm_(dCB, Kc)
        del dCB, dW
        # w_s also scales the chunk states
        dcs -= rs * wg
        dcs[:, -1] += (rs * wg).sum(-1)
        da[lo:hi] = dcs.flip(-1).cumsum(-1).flip(-1).view(hh, bc, Q)
        # ---- rotations and biases: dTheta = Im(conj(out) dout) per pair, then du = R^T dout
        dK4, dC4 = dKc.view(hh, b, L, n), dCc.view(hh, b, L, n)
        torch.add(_unrotate_(dK4, K4, rot), _unrotate_(dC4, C4, rot), out=dTh[lo:hi])
        for gi in range(lo // r, (hi - 1) // r + 1):                  # sum each group's heads
            i0, i1 = max(lo, gi * r) - lo, min(hi, (gi + 1) * r) - lo
            dB[gi] += dK4[i0:i1].sum(0)
            dC[gi] += dC4[i0:i1].sum(0)
        dB_bias[lo:hi] = dK4.sum((1, 2))
        dC_bias[lo:hi] = dC4.sum((1, 2))
    return (dX.view(h, b, L, p), da.view(h, b, L), dw.view(h, b, L), dgamma.view(h, b, L), dD,
            dB.permute(1, 2, 0, 3), dC.permute(1, 2, 0, 3), dB_bias, dC_bias, dTh, dh0.permute(1, 0, 2, 3))


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------

def rotate_pairs(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R(Theta) t: rotate the pairs (t_2j, t_2j+1) by Theta_j for j < S (cos, sin (..., S)); t (..., n), 2S <= n."""
    S = cos.shape[-1]
    if S == 0:
        return t
    r = t[..., :2 * S].unflatten(-1, (S, 2))
    t0, t1 = r[..., 0], r[..., 1]
    rot = torch.stack([t0 * cos - t1 * sin, t0 * sin + t1 * cos], -1).flatten(-2)
    return torch.cat([rot, t[..., 2 * S:]], -1) if 2 * S < t.shape[-1] else rot


def _check(x, B, C, theta, name):
    h, n = x.shape[-2], B.shape[-1]
    g = B.shape[-2]
    if C.shape != B.shape:
        raise ValueError(f"{name}: B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    if h % g != 0:
        raise ValueError(f"{name}: number of heads {h} must be a multiple of the number of B/C groups {g}")
    S = 0 if theta is None else theta.shape[-1]
    if 2 * S > n:
        raise ValueError(f"{name}: {S} rotation angles need d_state >= {2 * S}, got {n}")
    return h, g, n, S


def init_state(b: int, h: int, p: int, n: int, S: int, dtype=torch.float32, device=None):
    """The empty state (angle (b, h, S), ssm (b, h, p, n), k (b, h, n), x (b, h, p)), all zeros."""
    z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)      # noqa: E731
    return z(b, h, S), z(b, h, p, n), z(b, h, n), z(b, h, p)


def _per_head(Bm, bias, h):
    """B (..., g, n) + bias (h, n) -> (..., h, n): head i reads group i // (h / g)."""
    g = Bm.shape[-2]
    Bm = Bm.repeat_interleave(h // g, dim=-2) if g != h else Bm
    return Bm if bias is None else Bm + bias


def mamba3_siso(x, dt, A, B, C, lam, theta=None, D=None, B_bias=None, C_bias=None, state=None,
                chunk_size: int = 64):
    """Mamba-3 SISO over a sequence, in the chunked form (see the module docstring).

    x (b, l, h, p); dt (b, l, h) > 0 (after softplus); A (b, l, h) < 0 (data-dependent);
    lam (b, l, h) in [0, 1] (after sigmoid); B, C (b, l, g, n) (after their norms, before the biases);
    theta (b, l, h, S) angle increments in radians (the layer's pi tanh(angles) dt) or None;
    D (h,) or None; B_bias, C_bias (h, n) or None; state (angle, ssm, k, x) as returned, or None (zeros).
    Returns y (b, l, h, p) in x's dtype and the state after the sequence, in fp32 (fp64 for fp64 x).
    Any l works; chunks are evened out over l (the result does not depend on chunk_size).
    """
    b, l, h, p = x.shape
    h, g, n, S = _check(x, B, C, theta, "mamba3_siso")
    sd, dev = _sd(x), x.device
    with torch.autocast(dev.type, enabled=False):
        if state is None:
            state = init_state(b, h, p, n, S, sd, dev)
        angle0, h0, k0, x0 = (s.to(sd) for s in state)
        if l == 0:
            return x.new_zeros(b, 0, h, p), (angle0, h0, k0, x0)
        xs = x.to(sd)
        Bs, Cs = B.to(sd), C.to(sd)
        Bb = torch.zeros(h, n, dtype=sd, device=dev) if B_bias is None else B_bias.to(sd)
        Cb = torch.zeros(h, n, dtype=sd, device=dev) if C_bias is None else C_bias.to(sd)
        if S > 0:   # cumulative angles, summed in fp64 (they grow without bound), mod 2 pi, then rounded once
            Th = theta.permute(2, 0, 1, 3).cumsum(2, dtype=torch.float64) + angle0.permute(1, 0, 2).double()[:, :, None]
            Th = torch.remainder(Th, TWO_PI).to(sd)                                   # (h, b, l, S)
            angle = Th[:, :, -1].permute(1, 0, 2)
        else:
            Th = torch.zeros(h, b, l, 0, dtype=sd, device=dev)
            angle = angle0
        # the last token's k, for the state
        k_last = rotate_pairs(_per_head(Bs[:, -1], Bb, h), torch.cos(angle), torch.sin(angle))
        dth, lamh = dt.to(sd).permute(2, 0, 1), lam.to(sd).permute(2, 0, 1)           # (h, b, l)
        a = dth * A.to(sd).permute(2, 0, 1)                                          # log decays
        nxt = (1 - lamh) * dth                       # the weight token t gives its predecessor
        sg = F.pad(nxt[..., 1:], (0, 1))            # sg_t = (1 - lam_{t+1}) dt_{t+1}; 0 for the last token
        gamma = lamh * dth
        w = gamma + sg
        hs0 = h0 + nxt[:, :, 0].T[..., None, None] * x0[..., :, None] * k0[..., None, :]    # h~_0
        Dv = torch.zeros(h, dtype=sd, device=dev) if D is None else D.to(sd)
        Q = int(chunk_size)
        Q = -(-l // -(-l // Q))                       # as many chunks as chunk_size asks, evened out
        pad = (-l) % Q
        xh = xs.permute(2, 0, 1, 3)                                                 # (h, b, l, p)
        if pad:   # padded tokens: decay 1, no input (exact final state)
            xh, Th = (F.pad(t, (0, 0, 0, pad)) for t in (xh, Th))
            Bs, Cs = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (Bs, Cs))
            a, w, gamma = (F.pad(t, (0, pad)) for t in (a, w, gamma))
        Y, final = Mamba3ChunkScan.apply(xh.contiguous(), a.contiguous(), w.contiguous(), gamma.contiguous(), Dv,
                                         Bs.contiguous(), Cs.contiguous(), Bb.contiguous(), Cb.contiguous(),
                                         Th.contiguous(), hs0.contiguous(), Q)
        y = Y.permute(1, 2, 0, 3)[:, :l]
    return y.to(x.dtype), (angle, final, k_last, x[:, -1].to(sd))


def mamba3_siso_step(x, dt, A, B, C, lam, theta=None, D=None, B_bias=None, C_bias=None, state=None,
                     inplace: bool = False):
    """One token of Mamba-3 SISO (the recurrence itself), for a backbone's `step`.

    x (b, h, p); dt, A, lam (b, h); B, C (b, g, n); theta (b, h, S) or None; D (h,); B_bias, C_bias (h, n);
    state (angle, ssm, k, x) or None. Returns y (b, h, p) in x's dtype and the new state. inplace=True
    updates the given state tensors (fp32, or fp64 for fp64 x) and returns them: no temporary of the
    state's size (at d_state 128 and batch 1024 the state is over 500 MB a layer).
    """
    b, h, p = x.shape
    h, g, n, S = _check(x, B, C, theta, "mamba3_siso_step")
    sd = _sd(x)
    with torch.autocast(x.device.type, enabled=False):
        if state is None:
            state, inplace = init_state(b, h, p, n, S, sd, x.device), True
        if inplace and any(s.dtype != sd for s in state):
            raise ValueError(f"mamba3_siso_step: an in-place state must be {sd}")
        angle, H, kprev, xprev = state if inplace else (s.to(sd).clone() for s in state)
        xs, dt, A, lam = (t.to(sd) for t in (x, dt, A, lam))
        k = _per_head(B.to(sd), None if B_bias is None else B_bias.to(sd), h)             # (b, h, n)
        q = _per_head(C.to(sd), None if C_bias is None else C_bias.to(sd), h)
        if S > 0:
            angle.add_(theta.to(sd)).remainder_(TWO_PI)
            cos, sin = torch.cos(angle), torch.sin(angle)
            k, q = rotate_pairs(k, cos, sin), rotate_pairs(q, cos, sin)
        alpha = torch.exp(dt * A)[..., None, None]
        beta = (1 - lam) * dt                       # times alpha, applied with the decay below
        gamma = lam * dt
        # h <- alpha (h + beta x_prev k_prev^T) + gamma x k^T, in place
        H.addcmul_((beta[..., None] * xprev)[..., :, None], kprev[..., None, :]).mul_(alpha)
        H.addcmul_((gamma[..., None] * xs)[..., :, None], k[..., None, :])
        y = torch.matmul(H, q[..., None])[..., 0]                    # h q (b, h, p)
        if D is not None:
            y = y + D.to(sd)[:, None] * xs
        kprev.copy_(k)
        xprev.copy_(xs)
    return y.to(x.dtype), (angle, H, kprev, xprev)
