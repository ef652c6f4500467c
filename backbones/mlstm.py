"""mLSTM backbone: xLSTM's mLSTM layer (Beck et al., NeurIPS 2024) as the mixer of the shared residual stack.

The layer of the reference code (`xlstm` 2.0.6, `mLSTMLayer` with its defaults: up-projection factor 2
rounded up to a multiple of 64, 4 heads, a causal conv of width 4, block-diagonal q/k/v projections of
4x4 blocks, learnable skip, output gate):

    [x~, z]   = W_up u                                   x~, z (d_inner)
    c         = SiLU(causal conv1d(x~))                  the short conv feeds q and k, not v
    q, k      = blockdiag(W_q) c, blockdiag(W_k) c       (H, d_head) each, 4x4 blocks
    v         = blockdiag(W_v) x~
    i~, f~    = W_i [q, k, v] + b_i, W_f [q, k, v] + b_f  one pre-activation per head
    h~        = mLSTM(q, k, v, i~, f~)                   ops/mlstm.py: exponential input gate, sigmoid
                                                         forget gate, normaliser max(|n^T q|, exp(-m))
    h         = (GroupNorm_heads(h~) + s * c) * SiLU(z)  per-head layer norm (no bias), learnable skip s
    out       = W_out h                                  (`proj_down` in xlstm)

Initialisation as in the reference: zero gate weights, forget-gate biases linspace(3, 6) over heads,
input-gate biases N(0, 0.1), small-init (std sqrt(2 / 5 d_model)) for W_up and the q/k/v blocks.
W_out is initialised by the residual stack (backbones/base.py), like every backbone's out_proj.
Where this differs from the reference: the cell has no eps in its denominator (xlstm adds 1e-6), and
the memory starts from m_0 = -inf; neither changes h for an empty memory beyond 1e-6 (ops/mlstm.py).

State per layer: (conv_state (B, K-1, d_inner), (C (B, H, d_head, d_head), n (B, H, d_head), m (B, H))).
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from wmbench.backbones.base import ResidualBackbone, check_kernel, check_positive
from wmbench.backbones.ops.cuda import want_cuda
from wmbench.backbones.ops.mlstm import mlstm, mlstm_step
from wmbench.backbones.short_conv import ShortConv
from wmbench.core.registry import register_backbone
from wmbench.backbones.ops.dtypes import state_dtype as _sd


class _BlockDiagonalFn(torch.autograd.Function):
    """y[m, b, o] = sum_d W[b, o, d] x[m, b, d] over nb blocks; x (M, nb, din), W (nb, dout, din).

    Blocks of 4x4 (xlstm's) are far too small for a matmul kernel, and einsum's batched form first
    copies x into (nb, M, din). Here G neighbouring blocks form one dense (G din, G dout) block-diagonal
    matrix, and one batched matmul runs over the nb / G groups straight on strided views of x and dy:
    G times the (tiny) arithmetic, in a few large kernels. The backward is the same two products
    (dx = dy W_g, dW_g = x^T dy), from which the diagonal blocks of dW_g are kept.
    G = 4 measured fastest (forward 0.10 s against einsum's 0.18 s; M = 26,624, 1,024 channels, 2 threads,
    AMD EPYC, with the copy back to (M, nb, dout)).
    """
    GROUP = 4

    @staticmethod
    def _dense(w, G):
        """(nb, dout, din) -> (nb / G, G din, G dout): the groups' block-diagonal matrices, transposed."""
        nb, dout, din = w.shape
        Wg = w.new_zeros(nb // G, G * din, G * dout)
        wv = w.view(nb // G, G, dout, din)
        for i in range(G):
            Wg[:, i * din:(i + 1) * din, i * dout:(i + 1) * dout] = wv[:, i].transpose(1, 2)
        return Wg

    @staticmethod
    def forward(ctx, x, w):
        M, nb, din = x.shape
        dout = w.shape[1]
        G = _BlockDiagonalFn.GROUP if nb % _BlockDiagonalFn.GROUP == 0 else 1
        xg = x.reshape(M, nb // G, G * din).transpose(0, 1)            # (ng, M, G din) strided view
        y = torch.bmm(xg, _BlockDiagonalFn._dense(w, G))                # (ng, M, G dout)
        ctx.save_for_backward(x, w)
        ctx.G = G
        return y.transpose(0, 1).reshape(M, nb, dout)                   # one copy back to (M, nb, dout)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        G = ctx.G
        M, nb, din = x.shape
        dout = w.shape[1]
        ng = nb // G
        dyg = dy.reshape(M, ng, G * dout).transpose(0, 1)               # (ng, M, G dout)
        dx = torch.bmm(dyg, _BlockDiagonalFn._dense(w, G).transpose(1, 2))   # (ng, M, G din)
        xg = x.reshape(M, ng, G * din).transpose(0, 1)
        dWg = torch.bmm(xg.transpose(1, 2), dyg)                        # (ng, G din, G dout)
        dw = torch.stack([dWg[:, i * din:(i + 1) * din, i * dout:(i + 1) * dout].transpose(1, 2)
                          for i in range(G)], 1).reshape(nb, dout, din)
        return dx.transpose(0, 1).reshape(M, nb, din), dw.to(w.dtype)


class BlockDiagonal(nn.Module):
    """xLSTM's `LinearHeadwiseExpand` with square blocks: y = blockdiag(W_1, ..., W_nb) x, blocks of `block`
    input channels, `n_out` stacked outputs per block (q and k share their input: one pass, outputs
    [q_block, k_block] side by side). Returns (..., nb, n_out * block)."""

    def __init__(self, channels: int, block: int, std: float, n_out: int = 1):
        super().__init__()
        self.block = block
        self.weight = nn.Parameter(torch.randn(channels // block, n_out * block, block) * std)  # (nb, out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape(-1, x.shape[-1] // self.block, self.block)           # (M, nb, in)
        y = _BlockDiagonalFn.apply(xb, self.weight.to(x.dtype))
        return y.view(*lead, *y.shape[1:])


class MLSTMMixer(nn.Module):
    def __init__(self, d_model: int, num_heads: int = 4, proj_factor: float = 2.0, round_to: int = 64,
                 conv_size: int = 4, qkv_blocksize: int = 4, chunk_size: int = 64, norm_eps: float = 1e-5,
                 kernel: str = "auto"):
        super().__init__()
        check_positive(d_model=d_model, num_heads=num_heads, round_to=round_to, conv_size=conv_size,
                       qkv_blocksize=qkv_blocksize, chunk_size=chunk_size)
        if not (isinstance(proj_factor, (int, float)) and 0 < proj_factor < 64):
            raise ValueError(f"proj_factor must be a number in (0, 64), got {proj_factor!r}")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps!r}")
        d_inner = math.ceil(proj_factor * d_model / round_to) * round_to
        if d_inner % num_heads or (d_inner // num_heads) % qkv_blocksize:
            raise ValueError(f"d_inner = {d_inner} (proj_factor x d_model rounded up to a multiple of {round_to}) "
                             f"must split into num_heads = {num_heads} heads of a multiple of "
                             f"qkv_blocksize = {qkv_blocksize}")
        self.d_model, self.d_inner, self.num_heads = d_model, d_inner, num_heads
        self.d_head, self.chunk_size, self.norm_eps = d_inner // num_heads, chunk_size, norm_eps
        self.kernel = check_kernel(kernel)
        small = math.sqrt(2 / (5 * d_model))                              # xlstm's small_init
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)        # [x~, z]
        nn.init.normal_(self.in_proj.weight, std=small)
        self.conv = ShortConv(d_inner, conv_size, bias=True)
        self.qk_proj = BlockDiagonal(d_inner, qkv_blocksize, small, n_out=2)   # [q, k] blocks, one pass
        self.v_proj = BlockDiagonal(d_inner, qkv_blocksize, small)
        # input and forget gates from [q, k, v]: rows [i; f], columns over (the qk blocks' layout, v)
        self.gate_weight = nn.Parameter(torch.zeros(2 * num_heads, 3 * d_inner))
        self.igate_bias = nn.Parameter(torch.randn(num_heads) * 0.1)
        self.fgate_bias = nn.Parameter(torch.linspace(3.0, 6.0, num_heads))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))              # per-head layer norm, no bias
        self.skip = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    # ---------------------------------------------------------------------------------------------
    def _qkv_gates(self, x_in, c):
        """q, k, v (..., H, d_head) and the gate pre-activations i~, f~ (..., H) in fp32."""
        qk = self.qk_proj(c)                                              # (..., nb, 2 block)
        v = self.v_proj(x_in).flatten(-2)                                 # (..., d_inner)
        Wqk, Wv = self.gate_weight.to(v.dtype).split([2 * self.d_inner, self.d_inner], dim=1)
        gates = (F.linear(qk.flatten(-2), Wqk) + F.linear(v, Wv)).to(_sd(v))   # no (…, 3 d_inner) concat
        i_pre, f_pre = gates.split(self.num_heads, dim=-1)
        heads = lambda t: t.flatten(-2).unflatten(-1, (self.num_heads, self.d_head))
        q, k = qk.chunk(2, dim=-1)                                        # strided views (..., nb, block)
        return heads(q), heads(k), v.unflatten(-1, (self.num_heads, self.d_head)), \
            i_pre + self.igate_bias, f_pre + self.fgate_bias

    def _output(self, h, c, z):
        """(GroupNorm_heads(h) + s * c) * SiLU(z) -> out_proj.   h (..., H, d_head)."""
        hn = F.layer_norm(h.to(_sd(h)), (self.d_head,), eps=self.norm_eps).flatten(-2) * self.norm_weight
        y = (hn.to(c.dtype) + self.skip.to(c.dtype) * c) * F.silu(z)
        return self.out_proj(y)

    def _cell(self, q, k, v, i_pre, f_pre, state):
        mod = want_cuda(self.kernel, q, "mlstm_kernels.torch")
        if mod is not None:
            return _mlstm_cuda(mod, q, k, v, i_pre, f_pre, state, self.chunk_size)
        return mlstm(q, k, v, i_pre, f_pre, state=state, chunk_size=self.chunk_size)

    def _sequence(self, u, conv_state=None, cell_state=None):
        x_in, z = self.in_proj(u).split(self.d_inner, dim=-1)
        if conv_state is None:
            c = self.conv(x_in)
        else:
            c, conv_state = self.conv.prefill(x_in, conv_state)
        q, k, v, i_pre, f_pre = self._qkv_gates(x_in, c)
        h, cell_state = self._cell(q, k, v, i_pre, f_pre, cell_state)
        return self._output(h, c, z), (conv_state, cell_state)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self._sequence(u)[0]

    def init_state(self, batch_size: int, max_len: int | None = None):
        p = self.in_proj.weight
        sd = torch.float64 if p.dtype == torch.float64 else torch.float32
        H, K = self.num_heads, self.d_head
        cell = (torch.zeros(batch_size, H, K, K, dtype=sd, device=p.device),
                torch.zeros(batch_size, H, K, dtype=sd, device=p.device),
                torch.full((batch_size, H), -math.inf, dtype=sd, device=p.device))
        return self.conv.init_state(batch_size), cell

    def prefill(self, u: torch.Tensor, state):
        conv_state, cell_state = state
        return self._sequence(u, conv_state, cell_state)

    def step(self, u_t: torch.Tensor, state):
        conv_state, cell_state = state
        x_in, z = self.in_proj(u_t).split(self.d_inner, dim=-1)
        c, conv_state = self.conv.step(x_in, conv_state)
        q, k, v, i_pre, f_pre = self._qkv_gates(x_in, c)
        h, cell_state = mlstm_step(q, k, v, i_pre, f_pre, cell_state)
        return self._output(h, c, z), (conv_state, cell_state)


def _mlstm_cuda(mod, q, k, v, i_pre, f_pre, state, chunk_size):
    """mlstm_kernels' Triton chunkwise kernel (the `cuda` extra). It takes (B, H, T, d) tensors and lengths
    that are a multiple of its chunk: the tail is padded with no-op tokens (input gate -1e4, forget gate
    +1e4: nothing written, nothing forgotten), so the final state is exact. Its m_0 = 0 and eps = 1e-6
    differ from ours only in h's last digits (ops/mlstm.py)."""
    B, T, H, K = q.shape
    chunk = 64
    pad = (-T) % chunk
    t = lambda x, val=0.0: F.pad(x.transpose(1, 2), (0, 0, 0, pad), value=val) if x.dim() == 4 else \
        F.pad(x.transpose(1, 2), (0, pad), value=val)
    c0 = n0 = m0 = None
    if state is not None:
        C, n, m = state
        c0, n0, m0 = C.float(), n.float(), torch.nan_to_num(m.float(), neginf=0.0)[..., None]
    kern = mod.get_mlstm_kernel("chunkwise--triton_xl_chunk")
    h, (C, n, m) = kern(t(q), t(k), t(v), t(i_pre, -1e4), t(f_pre, 1e4), c_initial=c0, n_initial=n0,
                        m_initial=m0, return_last_states=True, chunk_size=chunk)
    return h[:, :, :T].transpose(1, 2).to(v.dtype), (C, n, m[..., 0])


@register_backbone("mlstm")
def mlstm_backbone(d_model: int, n_layers: int, dropout: float = 0.0, d_intermediate: int = 0,
                   kernel: str = "auto", **mixer_options) -> ResidualBackbone:
    """mLSTM backbone: n_layers pre-norm residual blocks around xLSTM's mLSTM layer."""
    check_kernel(kernel)
    valid = set(inspect.signature(MLSTMMixer).parameters) - {"d_model", "kernel"}
    unknown = sorted(set(mixer_options) - valid)
    if unknown:
        raise ValueError(f"unknown mlstm option(s) {unknown}; valid: {', '.join(sorted(valid))}")

    def make_mixer(i: int) -> MLSTMMixer:
        return MLSTMMixer(d_model, kernel=kernel, **mixer_options)

    return ResidualBackbone("mlstm", d_model, n_layers, make_mixer, d_intermediate=d_intermediate,
                            dropout=dropout, config=dict(mixer_options, kernel=kernel))
