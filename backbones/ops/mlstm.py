"""xLSTM's mLSTM cell (Beck et al. 2024): the stabilised matrix-memory recurrence, chunkwise, in PyTorch.

The recurrence of one head (C (K, V) memory, n (K,) normaliser, m a scalar stabiliser), per token t:

    log f_t = logsigmoid(f_pre_t)                          sigmoid forget gate, in log space
    m_t     = max(log f_t + m_{t-1}, i_pre_t)              m_0 = -inf when there is no state
    f'_t    = exp(log f_t + m_{t-1} - m_t)                 stabilised forget gate, <= 1
    i'_t    = exp(i_pre_t - m_t)                           stabilised exponential input gate, <= 1
    C_t     = f'_t C_{t-1} + i'_t k_t v_t^T
    n_t     = f'_t n_{t-1} + i'_t k_t
    h_t     = C_t^T q~_t / max(|n_t^T q~_t|, exp(-m_t))    with q~_t = scale * q_t, scale = K^-1/2 by default

(C, n, m) stands for the unstabilised memory C* = exp(m) C, n* = exp(m) n, and h_t = C*^T q~ /
max(|n*^T q~|, 1) does not depend on m: m only keeps exp() in range (i_pre = 30 is fine).

Where the scale goes: on q, as in mlstm_kernels 2.0.6 (`mlstm_recurrent_step__native_fw`, which
`mlstm_recurrent_sequence__native_fw` loops over, and `mlstm_chunkwise__native_autograd`): the memory
holds sum_s k_s v_s^T unscaled, so states can be exchanged with those kernels. Scaling k instead gives
the same h and a state scaled by `scale`. Unlike those kernels (which add eps = 1e-6 to the
denominator and start from m_0 = 0), there is no eps here and m_0 = -inf, as in the definition above;
with eps = 0 the two agree (h does not depend on m_0 when the memory starts empty).

The chunkwise form (the training path) splits the sequence into NC chunks of Q tokens. Inside a chunk
(tokens l, s = 0..Q-1) let b_l = sum_{r<=l} log f_r, w_s = i_pre_s - b_s and g = b_{Q-1}, the chunk's
log decay. Unrolled, the recurrence gives token s <= l the weight exp(b_l + w_s) in h_l, and the memory
C*_c entering the chunk the weight exp(b_l). So:
  1. stabilisers at the chunk boundaries (a scalar loop over chunks): mC_0 = m_0 and
     mC_{c+1} = max(g_c + mC_c, g_c + max_s w_s), which is the recurrent m at the boundaries;
  2. inter-chunk (a loop over chunks, one (K, Q) x (Q, V) matmul each):
     C_{c+1} = exp(g_c + mC_c - mC_{c+1}) C_c + sum_s exp(g_c + w_s - mC_{c+1}) k_s v_s^T, n likewise;
  3. intra-chunk and output (batched over all chunks): with mu_l = max(mC_c, max_{s<=l} w_s), so that
     m_l = b_l + mu_l is the recurrent m_t,
        num_l = exp(mC_c - mu_l) C_c^T q~_l + sum_{s<=l} exp(w_s - mu_l) (q~_l . k_s) v_s
        h_l   = num_l / max(|den_l|, exp(-m_l))
     where den_l is num_l with n_c in place of C_c and 1 in place of v_s.
Every exponent is <= 0. The gate vectors (b, w, m) are computed in fp64, so the (Q, Q) weights
exp(w_s - mu_l) do not lose digits to cancellation when log f is strongly negative. m_l carries no
gradient (h does not depend on it); the boundary m's do, as the returned state depends on them.
The cost is batched matmuls plus O(T Q) elementwise work on the (Q, Q) blocks; autograd differentiates it.

Shapes: q, k (B, T, H, K); v (B, T, H, V); i_pre, f_pre (B, T, H); state = (C (B, H, K, V), n (B, H, K),
m (B, H)); h (B, T, H, V). The math runs in fp32 for fp32/bf16 inputs and in fp64 for fp64 inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from wmbench.backbones.ops.dtypes import state_dtype as _compute_dtype


def _initial_state(state, B, H, K, V, dtype, device):
    """(C, n, m) in `dtype`; the empty memory (zeros, m = -inf) when state is None."""
    if state is None:
        return (torch.zeros(B, H, K, V, dtype=dtype, device=device),
                torch.zeros(B, H, K, dtype=dtype, device=device),
                torch.full((B, H), -math.inf, dtype=dtype, device=device))
    C, n, m = state
    return C.to(dtype), n.to(dtype), m.to(dtype)


def mlstm(q, k, v, i_pre, f_pre, scale=None, state=None, chunk_size=64):
    """The mLSTM over a sequence, chunkwise (see the module docstring).

    q, k (B, T, H, K); v (B, T, H, V); i_pre, f_pre (B, T, H) gate pre-activations; state (C (B, H, K, V),
    n (B, H, K), m (B, H)) or None for the empty memory; scale multiplies q (default K^-1/2).
    Returns h (B, T, H, V) in v's dtype and the final state in fp32 (fp64 for fp64 inputs).
    Any T works (the chunk length is evened out over T and the tail padded with no-op tokens).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype, dev = _compute_dtype(v), v.dtype, v.device
    scale = K ** -0.5 if scale is None else scale
    with torch.autocast(dev.type, enabled=False):          # fp32 math whatever the autocast context
        C0, n0, m0 = _initial_state(state, B, H, K, V, dtype, dev)
        if T == 0:
            return v.new_empty(B, 0, H, V), (C0, n0, m0)
        # as many chunks as chunk_size asks for, evened out over T (7 tokens: one chunk of 7, not 64)
        NC = -(-T // chunk_size)
        Q = -(-T // NC)
        pad = NC * Q - T

        def chunks(x, value=0.0):   # (B, T, H, *) -> (B, H, NC, Q, *), the tail padded with `value`
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad), value=value) if pad else x
            return x.reshape(B, NC, Q, H, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

        q, k, v = (chunks(x.to(dtype)).contiguous() for x in (q, k, v))    # (B, H, NC, Q, K|V)
        # gate math on (B, H, NC, Q) vectors in fp64 (cheap; long cumulative sums do not cancel). Padded
        # tokens have no input (i = -inf) and no decay (log f = 0), so the final state is exact.
        b = chunks(F.logsigmoid(f_pre.double())).cumsum(-1)               # in-chunk sum_{r<=l} log f_r
        w = chunks(i_pre.double(), -math.inf) - b                           # s enters h_l with exp(b_l + w_s)

        # 1. stabilisers at the chunk boundaries: mC_{c+1} = max(g_c + mC_c, alpha_c), where alpha_c is the
        # largest log weight with which a token of chunk c enters the memory
        g = b[..., -1]                                                      # (B, H, NC) chunk log decays
        alpha = g + w.amax(-1)
        mC = [m0.double()]
        for c in range(NC):
            mC.append(torch.maximum(g[..., c] + mC[-1], alpha[..., c]))
        mC = torch.stack(mC, -1)                                            # (B, H, NC+1)
        # 2. the memory entering each chunk, chunk by chunk
        decay = torch.exp(g + mC[..., :-1] - mC[..., 1:]).to(dtype)         # (B, H, NC), 0 from m = -inf
        kw = k * torch.exp(g[..., None] + w - mC[..., 1:, None]).to(dtype)[..., None]  # weights <= 1
        C, n = [C0], [n0]
        for f_c, k_c, v_c in zip(decay.unbind(2), kw.unbind(2), v.unbind(2)):
            C.append(f_c[..., None, None] * C[-1] + k_c.transpose(-1, -2) @ v_c)  # (B, H, K, V)
            n.append(f_c[..., None] * n[-1] + k_c.sum(-2))                  # (B, H, K)
        C_in, n_in = torch.stack(C[:-1], 2), torch.stack(n[:-1], 2)         # (B, H, NC, K, V|)

        # 3. outputs, all chunks at once, under the row stabiliser m_l = b_l + mu_l (= the recurrent m_t);
        # h does not depend on it, so it carries no gradient. Token weights exp(w_s - mu_l) <= 1.
        mu = torch.maximum(mC[..., :-1, None], w.cummax(-1).values).detach()  # (B, H, NC, Q)
        causal = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
        E = torch.exp((w[..., None, :] - mu[..., None]).to(dtype).masked_fill_(~causal, -math.inf))
        P = (q @ k.transpose(-1, -2)) * E                                   # (B, H, NC, Q, Q)
        inter = torch.exp(mC[..., :-1, None] - mu).to(dtype)                # weight of the entering memory
        den = inter * (q * n_in[..., None, :]).sum(-1) + P.sum(-1)          # n_l . q_l / scale
        r = scale / torch.maximum(scale * den.abs(), torch.exp(-(b + mu)).to(dtype))
        h = (q * (inter * r)[..., None]) @ C_in + (P * r[..., None]) @ v    # (B, H, NC, Q, V)
        if h.requires_grad:   # dh arrives in (B, T, H, V) order: one copy here, not one per matmul backward
            h.register_hook(lambda grad: grad.contiguous())
        h = h.transpose(2, 3).transpose(1, 3).reshape(B, NC * Q, H, V)[:, :T]
        return h.to(out_dtype), (C[-1], n[-1], mC[..., -1].to(dtype))


def mlstm_step(q, k, v, i_pre, f_pre, state, scale=None):
    """One token of the mLSTM recurrence (the module docstring's definition), for a backbone's step.

    q, k (B, H, K); v (B, H, V); i_pre, f_pre (B, H); state (C, n, m) as in `mlstm`, or None for the
    empty memory. Returns h (B, H, V) in v's dtype and the new state (fp32, fp64 for fp64 inputs).
    """
    B, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = _compute_dtype(v), v.dtype
    scale = K ** -0.5 if scale is None else scale
    with torch.autocast(v.device.type, enabled=False):
        C, n, m = _initial_state(state, B, H, K, V, dtype, v.device)
        q, k, v, i_pre = q.to(dtype) * scale, k.to(dtype), v.to(dtype), i_pre.to(dtype)
        logf = F.logsigmoid(f_pre.to(dtype))
        m_new = torch.maximum(logf + m, i_pre)                               # (B, H)
        f_act = torch.exp(logf + m - m_new)[..., None]                       # 0 when m = -inf
        i_act = torch.exp(i_pre - m_new)[..., None]
        C = f_act[..., None] * C + (i_act * k)[..., None] * v[..., None, :]  # (B, H, K, V)
        n = f_act * n + i_act * k                                            # (B, H, K)
        num = (q[..., None, :] @ C)[..., 0, :]                               # (B, H, V)
        den = (q * n).sum(-1)                                                # (B, H)
        h = num / torch.maximum(den.abs(), torch.exp(-m_new))[..., None]
        return h.to(out_dtype), (C, n, m_new)
