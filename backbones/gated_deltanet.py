"""Gated DeltaNet mixer (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", ICLR 2025), with the defaults of flash-linear-attention's `fla.layers.GatedDeltaNet`.

For every token x_t (d_model,) and every head h (the index h is dropped below):

    q_t, k_t, v_t = SiLU(causal depthwise conv_4(W_q x, W_k x, W_v x))_t     d_k, d_k, d_v per head
    q_t <- q_t / |q_t|,  k_t <- k_t / |k_t|                                   (L2 norm, eps 1e-6)
    beta_t  = sigmoid(w_beta . x_t)                                            writing strength in (0, 1)
    alpha_t = exp(g_t),  g_t = -exp(A_log) softplus(w_alpha . x_t + dt_bias)   decay in (0, 1]
    S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T          S (d_v, d_k), the paper's form
    o_t = S_t q_t / sqrt(d_k)
    y_t = W_o [ RMSNorm(o_t) * w_norm * SiLU(W_gate x_t) ]                    gated RMSNorm per head

(the op `ops.delta_rule` stores S transposed, (d_k, d_v), as flash-linear-attention does.)

Sizes (fla's, which keep the paper's ratios): num_heads H = 6, key width H d_k = 0.75 d_model, value
width H d_v = expand_v H d_k with expand_v = 2. Then q, k take 0.75 d_model^2 parameters each and v,
gate, out_proj 1.5 d_model^2 each: about 6 d_model^2 per layer, as Mamba-2 with expand 2.
When 0.75 d_model / H is not an integer, d_k = max(1, round(0.75 d_model / H)) (halves round up),
and for d_model < 8 the default head count drops to max(1, floor(0.75 d_model)), so that tiny models
still build with at least one key channel per head.

Initialisation as fla: A ~ U(0, 16) stored as A_log = log A; dt_bias = softplus^-1(dt) with dt
log-uniform in [1e-3, 0.1] (floored at 1e-4), as Mamba's; convolutions without bias; linear layers and
convolutions with PyTorch's defaults.

Layout. One in_proj computes [q | k | v | gate | b (beta logits) | a (decay logits)], split after; the
q, k, v convolutions are one ShortConv over the contiguous [q | k | v] slice (fla's q_conv1d, k_conv1d
and v_conv1d stacked: a depthwise convolution is per channel). The output projection is `out_proj`,
so the residual stack's depth rescaling applies to it.

Recurrent state: (conv_state (B, conv_size-1, 2 H d_k + H d_v): the last pre-conv inputs,
S (B, H, d_k, d_v) fp32 (fp64 for fp64 parameters)).

Kernels. On CPU, and with kernel="torch", the chunked PyTorch op `ops.delta_rule.gated_delta_rule`.
On CUDA with kernel "auto"/"cuda", fla's Triton kernels when `fla` imports: `chunk_gated_delta_rule`
for fp16/bf16 inputs (the training pass under autocast), `fused_recurrent_gated_delta_rule` for steps
and short inference calls (no autograd, at most 64 tokens, fp32 too); the PyTorch op otherwise (fp32
training, fp64). q, k are normalised and the gates computed here, not in fla's kernels. fla comes with
the `cuda` extra (flash-linear-attention >= 0.6: the time-first layout (B, T, H, .), states (B, H, d_k, d_v)).
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.backbones.base import ResidualBackbone, check_kernel, check_positive
from wmbench.backbones.ops.cuda import want_cuda
from wmbench.backbones.ops.delta_rule import gated_delta_rule, gated_delta_rule_step
from wmbench.backbones.short_conv import ShortConv
from wmbench.core.registry import register_backbone
from wmbench.backbones.ops.dtypes import state_dtype as _sd

CUDA_MODULE = "fla.ops.gated_delta_rule"
L2NORM_EPS = 1e-6          # fla's l2norm: x / sqrt(sum x^2 + eps)
FLA_RECURRENT_MAX_LEN = 64  # fla's layer switches to the fused recurrent kernel up to this length


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in fp32 (fp64), returned in x's dtype."""
    xs = x.to(_sd(x))
    return (xs * torch.rsqrt(torch.linalg.vector_norm(xs, dim=-1, keepdim=True).square() + eps)).to(x.dtype)


def default_sizes(d_model: int, num_heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """(num_heads, head_dim) with the paper's key width H d_k ~ 0.75 d_model (module docstring)."""
    if num_heads is None:
        num_heads = 6 if 3 * d_model >= 4 * 6 else max(1, 3 * d_model // 4)
    if head_dim is None:
        # round(0.75 d_model / H), halves up, at least 1
        head_dim = max(1, (3 * d_model + 2 * num_heads) // (4 * num_heads))
    return num_heads, head_dim


class GatedRMSNorm(nn.Module):
    """RMSNorm(o) * weight * SiLU(gate) per head (fla's FusedRMSNormGated, norm before gate).

    o, gate (..., H, d_v); weight (d_v,) shared by the heads. Computed in fp32 (fp64), returned in
    gate's dtype.
    """

    def __init__(self, head_v_dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_v_dim))
        self.eps = eps

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        sd = _sd(gate)
        o32 = o.to(sd)
        n = o32 * torch.rsqrt(o32.square().mean(-1, keepdim=True) + self.eps)
        return (n * self.weight.to(sd) * F.silu(gate.to(sd))).to(gate.dtype)


class GatedDeltaNetMixer(nn.Module):
    def __init__(self, d_model: int, num_heads: int | None = None, head_dim: int | None = None,
                 expand_v: float = 2, conv_size: int = 4, chunk_size: int | None = None,
                 norm_eps: float = 1e-5, kernel: str = "auto"):
        super().__init__()
        check_positive(d_model=d_model)
        if num_heads is not None:
            check_positive(num_heads=num_heads)
        if head_dim is not None:
            check_positive(head_dim=head_dim)
        check_positive(conv_size=conv_size)
        if chunk_size is not None:
            check_positive(chunk_size=chunk_size)
        if isinstance(expand_v, bool) or not isinstance(expand_v, (int, float)) or not expand_v > 0:
            raise ValueError(f"expand_v must be a positive number, got {expand_v!r}")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        H, dk = default_sizes(d_model, num_heads, head_dim)
        dv = round(dk * expand_v)
        if dv < 1 or not math.isclose(dk * expand_v, dv, rel_tol=1e-6):
            raise ValueError(f"head_dim * expand_v = {dk} * {expand_v!r} must be a positive integer")
        self.d_model, self.num_heads, self.head_k_dim, self.head_v_dim = d_model, H, dk, dv
        self.expand_v, self.conv_size, self.chunk_size = expand_v, conv_size, chunk_size
        self.kernel = check_kernel(kernel)
        self.key_dim, self.value_dim = H * dk, H * dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        # in_proj -> [q (H dk), k (H dk), v (H dv) | gate (H dv) | b (H) | a (H)]
        self.split_sizes = [self.conv_dim, self.value_dim, H, H]
        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=False)
        self.conv1d = ShortConv(self.conv_dim, conv_size, bias=False, activation="silu")
        A = torch.empty(H).uniform_(0, 16)
        self.A_log = nn.Parameter(torch.log(A))
        dt_min, dt_max, dt_floor = 1e-3, 0.1, 1e-4
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))           # softplus^-1(dt)
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(dv, eps=norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)

    # ---------------------------------------------------------------------------------------------
    def _chunk(self) -> int:
        """Chunk length of the PyTorch op; only speed depends on it (64, fla's, by default)."""
        return 64 if self.chunk_size is None else self.chunk_size

    def _gates(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias); (..., H) each, fp32 (fp64)."""
        sd = _sd(a)
        beta = torch.sigmoid(b.to(sd))
        g = F.softplus(a.to(sd) + self.dt_bias.to(sd)) * -torch.exp(self.A_log.to(sd))
        return g, beta

    def _qkv(self, qkv: torch.Tensor):
        """Post-conv [q | k | v] (..., conv_dim) -> q, k (..., H, dk) L2-normalised, v (..., H, dv)."""
        H = self.num_heads
        q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return l2norm(q.unflatten(-1, (H, -1))), l2norm(k.unflatten(-1, (H, -1))), v.unflatten(-1, (H, -1))

    def _rule(self, q, k, v, g, beta, state):
        """The gated delta rule over a sequence: o (B, T, H, dv), final state (B, H, dk, dv) or None."""
        fla = want_cuda(self.kernel, v, CUDA_MODULE)
        if fla is not None and v.dtype != torch.float64:                    # fp64 (exact tests): PyTorch
            s0 = None if state is None else state.float()
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
            if not needs_grad and q.shape[1] <= FLA_RECURRENT_MAX_LEN:       # no backward in this kernel
                return fla.fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta.to(v.dtype),
                                                            initial_state=s0, output_final_state=s0 is not None)
            if v.dtype in (torch.float16, torch.bfloat16):                  # fla's chunk kernel wants half
                return fla.chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta.to(v.dtype),
                                                  initial_state=s0, output_final_state=s0 is not None)
        return gated_delta_rule(q, k, v, g, beta, state=state, chunk_size=self._chunk())

    def _forward(self, x, conv_state=None, state=None):
        """x (B, L, D) -> (y (B, L, D), conv_state, final state); from zeros when the states are None."""
        qkv, gate, b, a = torch.split(self.in_proj(x), self.split_sizes, dim=-1)
        if conv_state is None:
            qkv = self.conv1d(qkv)
        else:
            qkv, conv_state = self.conv1d.prefill(qkv, conv_state)
        q, k, v = self._qkv(qkv)                                     # (B, L, H, dk|dv)
        g, beta = self._gates(b, a)                                  # (B, L, H)
        o, final = self._rule(q, k, v, g, beta, state)               # (B, L, H, dv)
        o = self.norm(o, gate.unflatten(-1, (self.num_heads, -1)))
        return self.out_proj(o.flatten(-2)), conv_state, final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

    # ---------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, max_len: int | None = None):
        p = self.in_proj.weight
        S = torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=p.device,
                        dtype=_sd(p))
        return self.conv1d.init_state(batch_size), S

    def prefill(self, x: torch.Tensor, state):
        conv_state, S = state
        y, conv_state, S_new = self._forward(x, conv_state, S)
        return y, (conv_state, S.copy_(S_new))

    def step(self, x_t: torch.Tensor, state):
        conv_state, S = state
        qkv, gate, b, a = torch.split(self.in_proj(x_t), self.split_sizes, dim=-1)    # (B, .)
        qkv, conv_state = self.conv1d.step(qkv, conv_state)
        q, k, v = self._qkv(qkv)                                                      # (B, H, dk|dv)
        g, beta = self._gates(b, a)                                                   # (B, H)
        if want_cuda(self.kernel, v, CUDA_MODULE) is not None:
            o, S_new = self._rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], S)
            o = o[:, 0]
        else:
            o, S_new = gated_delta_rule_step(q, k, v, g, beta, S)
        o = self.norm(o, gate.unflatten(-1, (self.num_heads, -1)))
        return self.out_proj(o.flatten(-2)), (conv_state, S.copy_(S_new))


@register_backbone("gated_deltanet")
def gated_deltanet(d_model: int, n_layers: int, dropout: float = 0.0, d_intermediate: int = 0,
                   kernel: str = "auto", **mixer_options) -> ResidualBackbone:
    """Gated DeltaNet backbone: n_layers pre-norm residual blocks around a GatedDeltaNetMixer."""
    check_kernel(kernel)
    valid = set(inspect.signature(GatedDeltaNetMixer).parameters) - {"d_model", "kernel"}
    unknown = sorted(set(mixer_options) - valid)
    if unknown:
        raise ValueError(f"unknown gated_deltanet option(s) {unknown}; valid: {', '.join(sorted(valid))}")

    def make_mixer(i: int) -> GatedDeltaNetMixer:
        return GatedDeltaNetMixer(d_model, kernel=kernel, **mixer_options)

    return ResidualBackbone("gated_deltanet", d_model, n_layers, make_mixer, d_intermediate=d_intermediate,
                            dropout=dropout, config=dict(mixer_options, kernel=kernel))
