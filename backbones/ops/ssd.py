"""Mamba-2's state-space duality (SSD) scan: chunked, in PyTorch, with a hand-written backward.

The SSM of one head h (scalar decay per head, state of shape (P, N)):

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T        x_t (P,), B_t, C_t (N,)
    y_t = h_t C_t + D_h * x_t

The chunked algorithm (Dao & Gu 2024, "Listing 1") splits the sequence into chunks of Q tokens:
  1. intra-chunk: a masked "attention" y = M x with M[l, s] = (C_l . B_s) exp(cs_l - cs_s) dt_s  (l >= s)
  2. chunk states: S_c = sum_s exp(cs_last - cs_s) dt_s x_s B_s^T    (what a chunk adds to the state)
  3. inter-chunk: H_{c+1} = exp(cs_last(c)) H_c + S_c, done as one small (c+1)x(c+1) matmul
  4. state -> output: y_l += exp(cs_l) H_c C_l
where cs is the cumulative sum of the log-decays a_t = dt_t A_h inside the chunk. Everything is a
batched matmul except O(L Q) elementwise work on the (Q, Q) decay blocks.

Two implementations:
- `ssd_chunked_reference`: the four steps written with einsum, differentiated by autograd. Short and
  obviously right; the tests use it as an oracle.
- `SSDChunkScan` (used by `ssd_scan(kernel="torch")`): the same math with the contractions laid out
  as per-head `bmm`s on strided views (no copies of x), D folded into the diagonal of M, and a
  hand-written backward that recomputes the (Q, Q) blocks instead of saving them. It saves only x, B,
  C, dt (which the caller keeps anyway) and the chunk-boundary states.

On CUDA, `ssd_scan` dispatches to mamba-ssm's Triton `mamba_chunk_scan_combined` when available.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wmbench.backbones.ops.cuda import want_cuda

SSD_CUDA_MODULE = "mamba_ssm.ops.triton.ssd_combined"


# --------------------------------------------------------------------------------------------------
# reference (autograd) implementation
# --------------------------------------------------------------------------------------------------

def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: a (..., T) -> (..., T, T) with out[..., i, j] = sum_{k=j+1..i} a_k (i >= j)
    and -inf above the diagonal (so exp() gives an exact causal mask with zero gradient).

    Built as a masked cumulative sum of the repeated input rather than cumsum_i - cumsum_j, which
    cancels catastrophically when the cumulative sums are large.
    """
    T = a.size(-1)
    a = a[..., None].expand(*a.shape, T)                                   # (..., T, T): a[..., i, j] = a_i
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # i > j
    out = a.masked_fill(~strict, 0).cumsum(dim=-2)                         # sum_{j < k <= i} a_k
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~causal, -math.inf)


def ssd_chunked_reference(x, dt, A, B, C, chunk_size, D=None, initial_states=None):
    """The chunked SSD as four einsums (autograd-differentiable oracle).

    x (b, l, h, p); dt (b, l, h) already positive (after softplus); A (h,) negative;
    B, C (b, l, g, n) with h % g == 0 (head i uses group i // (h // g)); D (h,) or None;
    initial_states (b, h, p, n) or None.  Returns y (b, l, h, p) and final_states (b, h, p, n),
    both computed in fp32 (fp64 if the inputs are fp64).
    """
    b, l, h, p = x.shape
    g = B.shape[2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    # heads share their group's B, C
    B = B.repeat_interleave(h // g, dim=2)                                 # (b, l, h, n)
    C = C.repeat_interleave(h // g, dim=2)
    Q = chunk_size
    pad = (-l) % Q
    X = x * dt[..., None]                                                  # discretised input
    a = dt * A                                                             # (b, l, h) log-decays
    # pad the *discretised* sequences: a = 0 (decay 1) and X = 0 leave the final state exact
    X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
    a = F.pad(a, (0, 0, 0, pad))
    c = (l + pad) // Q
    X, B, C = (t.reshape(b, c, Q, h, -1) for t in (X, B, C))
    a = a.reshape(b, c, Q, h).permute(0, 3, 1, 2)                          # (b, h, c, Q)
    a_cs = a.cumsum(-1)

    # 1. intra-chunk (diagonal blocks)
    Lmat = torch.exp(segsum(a))                                            # (b, h, c, Q, Q)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmat, X)
    # 2. state of each chunk from its own inputs
    decay_states = torch.exp(a_cs[..., -1:] - a_cs)                        # (b, h, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    # 3. states entering each chunk (plus the final state)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states.to(dtype)[:, None]
    states = torch.cat([initial_states, states], dim=1)                    # (b, c+1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(a_cs[..., -1], (1, 0))))         # (b, h, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_states = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cs))
    y = (Y_diag + Y_off).reshape(b, c * Q, h, p)[:, :l]
    if D is not None:
        y = y + x * D.to(dtype)[:, None]
    return y, final_states


# --------------------------------------------------------------------------------------------------
# fast implementation: bmm on strided views + hand-written backward
# --------------------------------------------------------------------------------------------------

def _head_view(t: torch.Tensor, i: int, Q: int) -> torch.Tensor:
    """(b, L, h, k) tensor -> head i as (b*L/Q, Q, k) without copying (needs stride(0) = L*stride(1))."""
    b, L = t.shape[:2]
    return t[:, :, i].reshape(b * (L // Q), Q, t.shape[-1])


def _decay_blocks(cs: torch.Tensor) -> torch.Tensor:
    """cs (..., Q) inclusive cumsums -> E (..., Q, Q) = exp(cs_l - cs_s) for l >= s, else 0.

    The differences are computed in fp64 and rounded once into E, so large cumulative sums do not
    cancel catastrophically (as accurate as a masked cumsum, with no (Q, Q) fp64 temporary).
    """
    Q = cs.shape[-1]
    cs64 = cs.double()
    E = torch.empty(*cs.shape, Q, dtype=cs.dtype, device=cs.device)
    torch.sub(cs64[..., :, None], cs64[..., None, :], out=E)
    E.masked_fill_(~torch.ones(Q, Q, dtype=torch.bool, device=cs.device).tril(), -math.inf)
    return E.exp_()


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class SSDChunkScan(torch.autograd.Function):
    """y, final = SSD(x, dt, A, B, C, D, h0) with the chunked algorithm; see the module docstring.

    Shapes (L a multiple of Q): x (b, L, h, p) [last dim contiguous, stride(0) == L*stride(1)],
    dt (b, L, h) fp32 > 0, A (h,) fp32, B, C (b, L, g, n), D (h,) fp32, h0 (b, h, p, n) fp32.
    Returns y (b, L, h, p) as a permuted view of a (h, b, L, p) buffer, and final (b, h, p, n) fp32.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, Q):
        with torch.autocast(x.device.type, enabled=False):   # dtypes are managed explicitly inside
            Y, final, saved = ssd_chunk_forward(x, dt, A, B, C, D, h0, Q)
        ctx.save_for_backward(*saved)
        ctx.Q = Q
        b, L, h, p = x.shape
        return Y.view(h, b, L, p).permute(1, 2, 0, 3), final

    @staticmethod
    def backward(ctx, dy, dfinal):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return (*ssd_chunk_backward(ctx.saved_tensors, ctx.Q, dy, dfinal), None)


def ssd_chunk_forward(x, dt, A, B, C, D, h0, Q):
    """Forward of SSDChunkScan without autograd: returns (Y (h, b*L/Q, Q, p) buffer, final, saved)."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, nc = h // g, L // Q
    bc = b * nc
    f32 = _state_dtype(x)                                            # fp32 (fp64 for fp64 inputs)
    # per-group C, B as (g, bc, Q, n); a view when g == 1
    Bg = B.reshape(b, nc, Q, g, n).permute(3, 0, 1, 2, 4).reshape(g, bc, Q, n)
    Cg = C.reshape(b, nc, Q, g, n).permute(3, 0, 1, 2, 4).reshape(g, bc, Q, n)
    cdt = x.dtype                                                     # matmul dtype
    # log-decays and their in-chunk cumulative sums, fp32: (h, bc, Q)
    dth = dt.permute(2, 0, 1).reshape(h, bc, Q)
    cs = (dth * A[:, None, None]).cumsum(-1)
    CB = torch.matmul(Cg, Bg.transpose(-1, -2)).to(f32)                 # (g, bc, Q, Q), shared by r heads
    # M = (C.B) o exp(segsum) o dt_s  (+ D on the diagonal, which adds D*x for free), built head
    # by head so only one (bc, Q, Q) block is alive at a time
    Y = torch.empty(h, bc, Q, p, dtype=cdt, device=x.device)
    for i in range(h):
        M = _decay_blocks(cs[i])                                      # (bc, Q, Q)
        M.mul_(CB[i // r]).mul_(dth[i][:, None, :])
        M.diagonal(dim1=-2, dim2=-1).add_(D[i])
        torch.bmm(M.to(cdt), _head_view(x, i, Q), out=Y[i])
    del M
    # chunk states S_c = x^T (B o exp(cs_last - cs) dt): (h, bc, p, n)
    w = torch.exp(cs[..., -1:] - cs) * dth                            # (h, bc, Q)
    Bw = (Bg[:, None] * w.view(g, r, bc, Q, 1)).reshape(h, bc, Q, n).to(cdt)
    Z = torch.empty(h, b, nc + 1, p, n, dtype=f32, device=x.device)
    Z[:, :, 0] = h0.permute(1, 0, 2, 3)
    S = Z[:, :, 1:]                                                   # (h, b, nc, p, n) view
    for i in range(h):
        S[i].copy_(torch.bmm(_head_view(x, i, Q).transpose(1, 2), Bw[i]).view(b, nc, p, n))
    # inter-chunk recurrence as one (nc+1)x(nc+1) matmul per (head, batch)
    ac = cs[..., -1].view(h, b, nc)                                   # chunk log-decays
    Dm = torch.exp(segsum(F.pad(ac, (1, 0))))                         # (h, b, nc+1, nc+1)
    Hs = torch.matmul(Dm, Z.view(h, b, nc + 1, p * n)).view(h, b, nc + 1, p, n)
    final = Hs[:, :, nc].permute(1, 0, 2, 3).contiguous()             # (b, h, p, n)
    Hin = Hs[:, :, :nc].reshape(h, bc, p, n)                          # state entering each chunk
    # state -> output: y_l += exp(cs_l) C_l H^T
    Ce = (Cg[:, None] * torch.exp(cs).view(g, r, bc, Q, 1)).reshape(h, bc, Q, n)
    for i in range(h):
        Y[i].baddbmm_(Ce[i].to(cdt), Hin[i].transpose(1, 2).to(cdt))
    return Y, final, (x, dt, A, B, C, D, Z, Hin, Dm)


def ssd_chunk_backward(saved, Q, dy, dfinal):
    """Backward of SSDChunkScan: (dx, ddt, dA, dB, dC, dD, dh0); dx is a (b, L, h, p) view."""
    x, dt, A, B, C, D, Z, Hin, Dm = saved
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, nc = h // g, L // Q
    bc = b * nc
    f32, cdt, dev = _state_dtype(x), x.dtype, x.device
    if dy is None:
        dy = torch.zeros(b, L, h, p, dtype=cdt, device=dev)
    if dfinal is None:
        dfinal = torch.zeros(b, h, p, n, dtype=f32, device=dev)
    if dy.stride(0) != L * dy.stride(1) or dy.stride(-1) != 1:
        dy = dy.contiguous()
    dy = dy.to(cdt)
    Bg = B.reshape(b, nc, Q, g, n).permute(3, 0, 1, 2, 4).reshape(g, bc, Q, n)
    Cg = C.reshape(b, nc, Q, g, n).permute(3, 0, 1, 2, 4).reshape(g, bc, Q, n)
    dth = dt.permute(2, 0, 1).reshape(h, bc, Q)
    cs = (dth * A[:, None, None]).cumsum(-1)
    ecs = torch.exp(cs)                                               # (h, bc, Q)
    w = torch.exp(cs[..., -1:] - cs)                                  # exp(cs_last - cs_s)

    # ---- 4. state -> output:  y_l += ecs_l C_l Hin^T
    Ce = (Cg[:, None] * ecs.view(g, r, bc, Q, 1)).reshape(h, bc, Q, n)
    dHin = torch.empty(h, bc, p, n, dtype=f32, device=dev)            # dL/dHin from y_off
    dCe = torch.empty(h, bc, Q, n, dtype=f32, device=dev)
    for i in range(h):
        dyi = _head_view(dy, i, Q)                                    # (bc, Q, p)
        torch.bmm(dyi.transpose(1, 2).to(f32), Ce[i], out=dHin[i])
        torch.bmm(dyi.to(f32), Hin[i], out=dCe[i])
    # ---- 3. inter-chunk: Hs = Dm @ Z, with dHs = [dHin per chunk, dfinal]
    dHs = torch.cat([dHin.view(h, b, nc, p * n), dfinal.permute(1, 0, 2, 3).reshape(h, b, 1, p * n)], 2)
    Zf = Z.view(h, b, nc + 1, p * n)
    dZ = torch.matmul(Dm.transpose(-1, -2), dHs)                      # (h, b, nc+1, pn)
    dDm = torch.matmul(dHs, Zf.transpose(-1, -2))                     # (h, b, nc+1, nc+1)
    dseg = (dDm * Dm)                                                 # d segsum (0 above diag)
    dcs_c = dseg.sum(-1) - dseg.sum(-2)                               # d cumsum of padded chunk decays
    dac = dcs_c.flip(-1).cumsum(-1).flip(-1)[..., 1:]                 # (h, b, nc) d chunk log-decay
    dh0 = dZ[:, :, 0].view(h, b, p, n).permute(1, 0, 2, 3)
    dS = dZ[:, :, 1:].reshape(h, bc, p, n)                            # dL/dS_c
    # ---- 2. chunk states: S = x^T Bw, Bw = B o w o dt
    Bw = (Bg[:, None] * (w * dth).view(g, r, bc, Q, 1)).reshape(h, bc, Q, n)
    dBw = torch.empty(h, bc, Q, n, dtype=f32, device=dev)
    dX = torch.empty(h, bc, Q, p, dtype=cdt, device=dev)
    for i in range(h):
        xi = _head_view(x, i, Q)
        torch.bmm(xi.to(f32), dS[i], out=dBw[i])                      # (bc, Q, n)
        torch.bmm(Bw[i].to(cdt), dS[i].transpose(1, 2).to(cdt), out=dX[i])   # dX from states
    # ---- 1. intra-chunk: Y = M x, M = CB o E o dt_s + diag(D); head by head so that the (Q, Q)
    # temporaries stay small (one head's worth) instead of (h, bc, Q, Q)
    CB = torch.matmul(Cg, Bg.transpose(-1, -2)).to(f32)                 # (g, bc, Q, Q)
    dCB = torch.zeros(g, bc, Q, Q, dtype=f32, device=dev)
    dD = torch.empty(h, dtype=f32, device=dev)
    colP1 = torch.empty(h, bc, Q, dtype=f32, device=dev)             # sum_l P1[l, s]
    rowP1dt = torch.empty(h, bc, Q, dtype=f32, device=dev)           # sum_s P1[l, s] dt_s
    for i in range(h):
        gi = i // r
        dyi, xi, dti = _head_view(dy, i, Q), _head_view(x, i, Q), dth[i][:, None, :]
        E = _decay_blocks(cs[i])                                      # (bc, Q, Q), 0 above the diagonal
        W = E * CB[gi]
        M = W * dti
        M.diagonal(dim1=-2, dim2=-1).add_(D[i])
        dX[i].baddbmm_(M.to(cdt).transpose(1, 2), dyi)               # += M^T dy
        dM = torch.bmm(dyi, xi.transpose(1, 2)).to(f32)              # dy x^T
        dD[i] = dM.diagonal(dim1=-2, dim2=-1).sum()
        P1 = W.mul_(dM)                                               # dM o W
        colP1[i] = P1.sum(-2)
        rowP1dt[i] = torch.bmm(P1, dth[i][..., None])[..., 0]
        dCB[gi].addcmul_(dM.mul_(E), dti)                          # sum over the group's heads of dM o E o dt
    del E, W, M, dM, P1
    # gradients w.r.t. the decays: dcs (h, bc, Q), then da = reverse cumsum
    ddt = colP1.clone()
    dcs = rowP1dt - dth * colP1
    # from Ce = C o ecs
    dCe_C = (dCe * Ce).sum(-1)                                        # (h, bc, Q)
    dcs += dCe_C
    # from Bw = B o w o dt: r_s = sum_n dBw B w
    rs = (dBw.view(g, r, bc, Q, n) * Bg[:, None]).sum(-1).view(h, bc, Q) * w
    ddt += rs
    dcs -= rs * dth
    dcs[..., -1] += (rs * dth).sum(-1) + dac.reshape(h, bc)
    da = dcs.flip(-1).cumsum(-1).flip(-1)                             # (h, bc, Q)
    ddt += da * A[:, None, None]
    dA = (da * dth).sum((1, 2))
    # dB, dC per group
    dCg = torch.matmul(dCB, Bg.to(f32))                               # (g, bc, Q, n)
    dCg += (dCe * ecs[..., None]).view(g, r, bc, Q, n).sum(1)
    dBg = torch.matmul(dCB.transpose(-1, -2), Cg.to(f32))
    dBg += (dBw * (w * dth)[..., None]).view(g, r, bc, Q, n).sum(1)
    dB = dBg.view(g, b, nc, Q, n).permute(1, 2, 3, 0, 4).reshape(b, L, g, n).to(B.dtype)
    dC = dCg.view(g, b, nc, Q, n).permute(1, 2, 3, 0, 4).reshape(b, L, g, n).to(C.dtype)
    ddt = ddt.view(h, b, L).permute(1, 2, 0)
    dx = dX.view(h, b, L, p).permute(1, 2, 0, 3)
    return dx, ddt, dA, dB, dC, dD, dh0



# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------

def ssd_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), initial_states=None, kernel="auto"):
    """Mamba-2 SSD over a sequence; same argument conventions as mamba-ssm's mamba_chunk_scan_combined.

    x (b, l, h, p); dt (b, l, h) *raw*: dt_bias is added and softplus / dt_limit applied here (and
    inside the CUDA kernel, never twice); A (h,); B, C (b, l, g, n), h % g == 0; D (h,) or None;
    initial_states (b, h, p, n) or None.  Returns (y (b, l, h, p) in x's dtype, final_states
    (b, h, p, n) fp32).  The decay and state math is fp32 whatever the input dtype; the torch path
    handles any l (the discretised inputs are zero-padded to a multiple of chunk_size).
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    if h % g != 0:
        raise ValueError(f"number of heads {h} must be a multiple of ngroups {g}")
    mod = want_cuda(kernel, x, SSD_CUDA_MODULE)
    if mod is not None:
        y, final = mod.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=True)
        return y, final
    sd = _state_dtype(x)
    dt = dt.to(sd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(sd)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit[0] > 0.0 or dt_limit[1] < float("inf"):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    A = A.to(sd)
    D = torch.zeros(h, dtype=sd, device=x.device) if D is None else D.to(sd)
    h0 = (torch.zeros(b, h, p, n, dtype=sd, device=x.device) if initial_states is None
          else initial_states.to(sd))
    # as many chunks as chunk_size asks for, evened out over l: a 7-step prefill is one chunk of 7, not
    # 7 steps padded to 32 (the result does not depend on the chunk length, only the work does)
    Q = int(chunk_size)
    Q = -(-l // -(-l // Q)) if l > 0 else Q
    pad = (-l) % Q
    if pad:   # zero discretised input (dt = 0: decay 1, no input) keeps the final state exact
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    if x.stride(-1) != 1 or x.stride(0) != x.shape[1] * x.stride(1):
        x = x.contiguous()
    y, final = SSDChunkScan.apply(x, dt, A, B, C, D, h0, Q)
    if pad:
        y = y[:, :l]
    return y, final
