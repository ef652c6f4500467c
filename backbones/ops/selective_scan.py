"""Mamba-1 selective scan (S6) in pure PyTorch: chunked, memory-lean, numerically safe.

    h_t = exp(Δ_t A) ∘ h_{t-1} + (Δ_t u_t) ⊗ B_t          h: (d, n) per sequence, A: (d, n) < 0
    y_t = C_t · h_t + D ∘ u_t                                (sum over n)

The sequence of length L is cut into c chunks of T steps (T ≈ √L), and the chunks into groups of m.
Every pass below is a loop of T steps over (m, b, n, d) slices, i.e. all chunks of a group advance
together; groups run one after the other. m is as large as GROUP_BYTES allows (usually all chunks,
i.e. about 2√L + c Python steps per pass) and never below ⌈√c⌉, so there is no per-token loop.

  forward   per group: a_t = exp(Δ_t A) for the whole group in one op (the only exp), then
            1. local pass: run each chunk from a zero state -> its end state
            2. carry (m steps): state entering chunk k+1 = P_k ∘ (state entering k) + end_k,
               with P_k = exp(A ΣΔ over chunk k) the chunk's total decay
            3. output pass: rerun each chunk from its true entering state and read y_t = C_t · h_t
  backward  per group, right to left: recompute a_t and the states h_t from the saved chunk-entry
            states, run the reverse scan g_t = C_t dy_t + a_{t+1} g_{t+1} (g_t = dLoss/dh_t) the
            same way (local pass, carry, true pass), and read off the gradients:
            dC_t = Σ_d dy_t h_t, dB_t = Σ_d g_t Δ_t u_t, w_t = Σ_n g_t B_t, q_t = a_t g_t h_{t-1},
            du_t = Δ_t w_t + D dy_t, dΔ_t = u_t w_t + Σ_n A q_t, dA = Σ_t Δ_t q_t, dh_0 = a_1 g_1.

Only decays exp(Δ A) ∈ (0, 1] and their products are ever formed, and nothing is divided, so any
Δ > 0 is safe (large Δ·|A| just underflows the decay to 0, which is exact in the limit).

Memory: the forward keeps for backward only the (b, L, ·)-sized inputs and the c chunk-entry states
(c, b, n, d); besides, one group buffer (forward) or two (backward) of at most GROUP_BYTES each live
while a group is processed. The full (b, L, d, n) state history is never materialised.

Internally states are laid out (n, d) — d innermost — so every elementwise op runs along a
contiguous d and the n-contractions are small batched matmuls in their fast orientation; the public
API uses (b, d, n) like mamba-ssm. All arithmetic is fp32 (fp64 for fp64 inputs), whatever the
input dtype, and autocast is switched off inside.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# cap on the bytes of one (T, b, m, n, d) group buffer (forward: 1 buffer, backward: 2)
GROUP_BYTES = 256 * 2**20


def default_chunk_size(L: int) -> int:
    """T ≈ √L balances the T-step passes against the c-step carry loop (about 3√L Python steps)."""
    return max(1, math.ceil(math.sqrt(L)))


def _chunks(x: torch.Tensor, c: int, T: int) -> torch.Tensor:
    """(b, L, k) -> (T, c, b, k), zero-padded to c*T steps. Time-major, then chunk: the slice of one
    step over a group of chunks, x[t, k0:k1], is contiguous."""
    b, L, k = x.shape
    if c * T != L:
        x = F.pad(x, (0, 0, 0, c * T - L))
    return x.view(b, c, T, k).permute(2, 1, 0, 3).contiguous()


def _unchunk(x: torch.Tensor, L: int) -> torch.Tensor:
    """(T, c, b, k) -> (b, L, k)."""
    T, c, b, k = x.shape
    return x.permute(2, 1, 0, 3).reshape(b, c * T, k)[:, :L]


def _group_size(c: int, T: int, b: int, n: int, d: int, itemsize: int) -> int:
    """Chunks per group: as many as fit GROUP_BYTES in one (T, m, b, n, d) buffer, but at least ⌈√c⌉
    so the loop count stays ~ T·√c even when memory is tight (never a per-token loop)."""
    per_chunk = T * b * n * d * itemsize
    return max(1, min(c, max(GROUP_BYTES // per_chunk, math.isqrt(c - 1) + 1)))


class _SelectiveScan(torch.autograd.Function):
    """y, h_last = scan(u, Δ, A, B, C, D, h0); see the module docstring. Shapes (compute dtype):
    u, Δ (b, L, d); A (d, n); B, C (b, L, n); D (d,) or None; h0 (b, d, n) or None.
    Inside: sequences (T, c, b, ·), states (·, b, n, d); per-step slices are (m, b, n, d)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, h0, T):
        b, L, d = u.shape
        n = A.shape[1]
        c = math.ceil(L / T)
        At = A.t().contiguous()                                     # (n, d)
        # padded steps have Δ = 0: decay 1 and no input, so they leave the state unchanged
        dt, du = _chunks(delta, c, T), _chunks(delta * u, c, T)     # (T, c, b, d)
        Bc, Cc = _chunks(B, c, T), _chunks(C, c, T)                 # (T, c, b, n)
        decay = torch.exp(dt.sum(0).unsqueeze(2) * At)               # P_k = Π_t a_t over chunk k (c, b, n, d)
        # states[k] enters chunk k; states[c] is the final state
        states = u.new_empty(c + 1, b, n, d)
        states[0] = 0 if h0 is None else h0.transpose(1, 2)
        y = u.new_empty(T, c, b, d)

        m = _group_size(c, T, b, n, d, u.element_size())
        a_buf = u.new_empty(T, m, b, n, d)                           # reused by every group (no re-faulting)
        for k0 in range(0, c, m):                                    # groups of chunks, left to right
            g_ = slice(k0, min(c, k0 + m))
            du_r, B_c = du[:, g_].unsqueeze(3), Bc[:, g_].unsqueeze(4)   # (T,m,b,1,d), (T,m,b,n,1)
            a = a_buf[:, :g_.stop - k0]
            torch.mul(dt[:, g_].unsqueeze(3), At, out=a).exp_()      # a_t = exp(Δ_t A)  (T, m, b, n, d)
            # 1. local pass: each chunk from a zero state -> its end state
            h = du_r[0] * B_c[0]
            for t in range(1, T):
                h.mul_(a[t]).addcmul_(du_r[t], B_c[t])
            # 2. carry over the chunks of the group
            for j in range(h.shape[0]):
                torch.addcmul(h[j], decay[k0 + j], states[k0 + j], out=states[k0 + j + 1])
            # 3. output pass from the true entering states: y_t = C_t · h_t
            h = states[g_].clone()
            C_r, y_g = Cc[:, g_].unsqueeze(3), y[:, g_].unsqueeze(3)  # (T,m,b,1,n), (T,m,b,1,d)
            for t in range(T):
                h.mul_(a[t]).addcmul_(du_r[t], B_c[t])
                torch.matmul(C_r[t], h, out=y_g[t])
        del a_buf, a, h
        y = _unchunk(y, L)
        if D is not None:
            y = y + u * D

        ctx.T = T
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(u, delta, A, B, C, D, states[:c])
        return y, states[c].transpose(1, 2)

    @staticmethod
    def backward(ctx, dy, dh_last):
        with torch.autocast(device_type=ctx.saved_tensors[0].device.type, enabled=False):
            return _SelectiveScan._backward(ctx, dy, dh_last)

    @staticmethod
    def _backward(ctx, dy, dh_last):
        u, delta, A, B, C, D, states = ctx.saved_tensors
        T = ctx.T
        b, L, d = u.shape
        n = A.shape[1]
        c = states.shape[0]
        At = A.t().contiguous()
        dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype)
        dt, uc = _chunks(delta, c, T), _chunks(u, c, T)              # (T, c, b, d)
        du = dt * uc
        Bc, Cc, dyc = _chunks(B, c, T), _chunks(C, c, T), _chunks(dy, c, T)
        decay = torch.exp(dt.sum(0).unsqueeze(2) * At)               # (c, b, n, d)

        ddt = torch.empty_like(dt)                                   # Σ_n A q_t  (T, c, b, d)
        dw = torch.empty_like(dt)                                    # w_t = dLoss/d(Δu)_t = Σ_n g_t B_t
        dBc, dCc = torch.empty_like(Bc), torch.empty_like(Cc)        # (T, c, b, n)
        dAt = torch.zeros_like(At)
        # z = dLoss/d(state leaving the current group), from everything to its right
        z = u.new_zeros(b, n, d) if dh_last is None else dh_last.to(u.dtype).transpose(1, 2).contiguous()

        m = _group_size(c, T, b, n, d, u.element_size())
        a_buf, h_buf = u.new_empty(T, m, b, n, d), u.new_empty(T, m, b, n, d)  # reused by every group
        for k0 in reversed(range(0, c, m)):                          # groups of chunks, right to left
            k1 = min(c, k0 + m)
            g_, mg = slice(k0, k1), k1 - k0
            du_r, dt_r, dy_r = du[:, g_].unsqueeze(3), dt[:, g_].unsqueeze(3), dyc[:, g_].unsqueeze(3)  # (T,m,b,1,d)
            B_c, B_r, C_c = Bc[:, g_].unsqueeze(4), Bc[:, g_].unsqueeze(3), Cc[:, g_].unsqueeze(4)
            dC_g, dB_g, w_g = dCc[:, g_].unsqueeze(3), dBc[:, g_].unsqueeze(3), dw[:, g_].unsqueeze(3)
            # recompute decays a[t] and states hs[t] of the group (T, m, b, n, d); dC_t = Σ_d dy_t h_t
            a, hs = a_buf[:, :mg], h_buf[:, :mg]
            torch.mul(dt_r, At, out=a).exp_()
            h_prev = states[g_]
            for t in range(T):
                torch.mul(a[t], h_prev, out=hs[t]).addcmul_(du_r[t], B_c[t])
                h_prev = hs[t]
                torch.matmul(dy_r[t], h_prev.transpose(-1, -2), out=dC_g[t])     # (m,b,1,d)@(m,b,d,n)

            # local reverse pass (no gradient from the right) -> r_k = dLoss_k/d(state entering chunk k)
            g = C_c[T - 1] * dy_r[T - 1]
            g.mul_(a[T - 1])
            for t in range(T - 2, -1, -1):
                g.addcmul_(C_c[t], dy_r[t]).mul_(a[t])
            # carry right to left: zs[j] = dLoss/d(state leaving chunk k0+j)
            zs = torch.empty_like(g)
            zs[mg - 1] = z
            for j in range(mg - 2, -1, -1):
                torch.addcmul(g[j + 1], decay[k0 + j + 1], zs[j + 1], out=zs[j])
            z = torch.addcmul(g[0], decay[k0], zs[0])

            # full reverse pass from the true right boundary; local gradients as we go
            g = zs
            acc = torch.zeros_like(g)                                # Σ_t Δ_t ∘ q_t  (for dA)
            for t in range(T - 1, -1, -1):
                g.addcmul_(C_c[t], dy_r[t])                                       # g_t
                torch.matmul(du_r[t], g.transpose(-1, -2), out=dB_g[t])           # Σ_d g_t Δ_t u_t
                torch.matmul(B_r[t], g, out=w_g[t])                               # Σ_n g_t B_t
                g.mul_(a[t])                                                      # a_t g_t
                q = torch.mul(g, hs[t - 1] if t > 0 else states[g_], out=a[t])  # q_t = a_t g_t h_{t-1}
                acc.addcmul_(q, dt_r[t])
            ddt[:, g_] = a.mul_(At).sum(3)                                        # Σ_n A q_t
            dAt += acc.sum((0, 1))
        del a_buf, h_buf, a, hs

        ddt.addcmul_(dw, uc)                                         # dLoss/dΔ_t = Σ_n A q_t + u_t w_t
        dw = _unchunk(dw, L)
        du_in = dw * delta
        dD = None
        if D is not None:
            du_in = du_in + dy * D
            dD = (dy * u).sum((0, 1)) if ctx.needs_input_grad[5] else None
        dh0 = z.transpose(1, 2) if ctx.has_h0 and ctx.needs_input_grad[6] else None
        return (du_in, _unchunk(ddt, L), dAt.t(), _unchunk(dBc, L), _unchunk(dCc, L), dD, dh0, None)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                   chunk_size: int | None = None, return_final_state: bool = False):
    """Selective scan with Δ already positive (softplus applied by the caller).

    u, delta (b, L, d); A (d, n) (negative real); B, C (b, L, n); D (d,) or None;
    initial_state (b, d, n) or None (zeros). Returns y (b, L, d) in u's dtype, and with
    return_final_state also h_L (b, d, n) in fp32 (fp64 for fp64 inputs).
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, length, d), got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, L, d = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d, n) with d = {d}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.shape != (b, L, n):
            raise ValueError(f"{name} must be (batch, length, n) = {(b, L, n)}, got {tuple(M.shape)}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(f"initial_state must be (batch, d, n) = {(b, d, n)}, got {tuple(initial_state.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    T = min(chunk_size or default_chunk_size(L), max(L, 1))
    cdt = torch.promote_types(u.dtype, torch.float32)
    if L == 0:
        h = torch.zeros(b, d, n, dtype=cdt, device=u.device) if initial_state is None else initial_state.to(cdt)
        y = u.new_zeros(b, 0, d)
        return (y, h) if return_final_state else y
    f = (lambda x: None if x is None else x.to(cdt).contiguous())
    with torch.autocast(device_type=u.device.type, enabled=False):  # the scan is always fp32
        y, h = _SelectiveScan.apply(f(u), f(delta), f(A), f(B), f(C), f(D), f(initial_state), T)
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y
