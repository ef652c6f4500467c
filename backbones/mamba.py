"""Mamba (v1, S6) backbone: the official Mamba block (Gu & Dao, 2023) as a wmbench mixer.

    x, z = in_proj(u).split(d_inner)                  (B, L, d_inner) each
    x    = SiLU(causal depthwise conv1d(x))           kernel d_conv, with bias
    Δ, B, C = x_proj(x).split(dt_rank, d_state, d_state)
    Δ    = softplus(dt_proj(Δ))                       (B, L, d_inner), fp32
    y    = SelectiveScan(x, Δ, A = -exp(A_log), B, C) + D ∘ x
    out  = out_proj(y ∘ SiLU(z))

Names, shapes and initialisation follow mamba_ssm/modules/mamba_simple.py, so state dicts carry over.
The parallel pass uses the chunked pure-PyTorch scan (ops/selective_scan.py); on CUDA tensors it can
use mamba-ssm's fused `selective_scan_fn` instead (kernel="auto"/"cuda", imported lazily).
Recurrent state per layer: (conv_state (B, d_inner, d_conv) = the last d_conv pre-conv inputs,
ssm_state (B, d_inner, d_state) fp32), as in the official cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.backbones.base import ResidualBackbone, check_kernel, check_positive
from wmbench.backbones.ops.causal_conv import causal_conv1d
from wmbench.backbones.ops.cuda import want_cuda
from wmbench.backbones.ops.selective_scan import selective_scan
from wmbench.core.registry import register_backbone

CUDA_MODULE = "mamba_ssm.ops.selective_scan_interface"


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int | float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, chunk_size: int | None = None,
                 kernel: str = "auto"):
        super().__init__()
        check_positive(d_model=d_model, d_state=d_state, d_conv=d_conv)
        if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand <= 0 \
                or int(expand * d_model) < 1:
            raise ValueError(f"expand must be a positive number with expand*d_model >= 1, got {expand!r}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank <= 0:
            raise ValueError(f"dt_rank must be 'auto' or a positive integer, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if chunk_size is not None:
            check_positive(chunk_size=chunk_size)
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank
        self.chunk_size = chunk_size
        self.kernel = check_kernel(kernel)
        di, n, r = self.d_inner, d_state, dt_rank

        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        self.conv1d = nn.Conv1d(di, di, kernel_size=d_conv, groups=di, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.out_proj = nn.Linear(di, d_model, bias=bias)

        with torch.no_grad():
            # dt_proj: keeps Δ = softplus(W dt + b) in [dt_min, dt_max] at init
            s = dt_rank ** -0.5 * dt_scale
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, s)
            else:
                nn.init.uniform_(self.dt_proj.weight, -s, s)
            dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True
        # S4D-real: A[d, n] = -(n + 1); stored as log(-A), fp32
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(di))
        self.D._no_weight_decay = True

    # ---- pieces shared by the parallel and the recurrent paths ----

    def _ssm_inputs(self, x):
        """x (..., d_inner) post-conv -> dt_proj(dt) without bias (..., d_inner), B, C (..., n)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dt @ self.dt_proj.weight.t(), B, C

    @property
    def state_dtype(self) -> torch.dtype:
        """fp32 (fp64 for a double model): the SSM state and its math never run in bf16/fp16."""
        return torch.promote_types(self.A_log.dtype, torch.float32)

    def _delta(self, dt):
        """Δ = softplus(dt + bias) in the state dtype, whatever the autocast dtype (as the official kernel)."""
        sd = self.state_dtype
        return F.softplus(dt.to(sd) + self.dt_proj.bias.to(sd))

    def _A(self):
        return -torch.exp(self.A_log.to(self.state_dtype))  # (d_inner, n)

    # ---- the contract ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._parallel(x, None, None)[0]

    def init_state(self, batch_size: int, max_len: int | None = None):
        w = self.in_proj.weight
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=w.device, dtype=w.dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=w.device, dtype=self.state_dtype)
        return conv_state, ssm_state

    def prefill(self, x: torch.Tensor, state):
        conv_state, ssm_state = state
        return self._parallel(x, conv_state, ssm_state)

    def _parallel(self, x, conv_state, ssm_state):
        """x (B, L, d_model); conv_state/ssm_state None for a fresh start without returning a state."""
        Bsz, L, _ = x.shape
        if L == 0:
            return x.new_zeros(Bsz, 0, self.d_model), (None if ssm_state is None else (conv_state, ssm_state))
        xs, z = self.in_proj(x).chunk(2, dim=-1)                      # (B, L, d_inner) each
        w, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias      # (d_inner, d_conv), (d_inner,)
        if conv_state is None:
            xc = causal_conv1d(xs, w, bias)                          # zero history = empty state
        else:
            # prepend the cached last d_conv-1 inputs instead of zeros
            ctx = torch.cat([conv_state[..., 1:].transpose(1, 2).to(xs.dtype), xs], dim=1)  # (B, K-1+L, d_inner)
            xc = causal_conv1d(ctx, w, bias)[:, self.d_conv - 1:]
            conv_state = ctx[:, -self.d_conv:].transpose(1, 2).to(conv_state.dtype)  # the last d_conv inputs
        u = F.silu(xc)                                               # (B, L, d_inner)
        dt, B, C = self._ssm_inputs(u)
        A = self._A()

        fresh = ssm_state is None
        mod = want_cuda(self.kernel, x, CUDA_MODULE)
        if mod is not None and (fresh or not bool(ssm_state.any())):
            # mamba-ssm's fused kernel has no initial-state argument: only used from an empty state.
            # Δ goes in pre-activation; the kernel adds the bias and applies softplus in fp32.
            tr = (lambda t: t.transpose(1, 2).contiguous())
            out = mod.selective_scan_fn(tr(u), tr(dt), A, tr(B), tr(C), self.D.float(), z=tr(z),
                                        delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                                        return_last_state=not fresh)
            y, h = (out, None) if fresh else out
            y = y.transpose(1, 2)
        else:
            y, h = selective_scan(u, self._delta(dt), A, B, C, self.D.to(A.dtype), ssm_state,
                                  chunk_size=self.chunk_size, return_final_state=True)
            y = y * F.silu(z)
        out = self.out_proj(y)
        return out, (None if fresh else (conv_state, h.to(self.state_dtype)))

    def step(self, x_t: torch.Tensor, state):
        """One token x_t (B, d_model): O(1) work, no dependence on how long the context was."""
        conv_state, ssm_state = state
        xs, z = self.in_proj(x_t).chunk(2, dim=-1)                   # (B, d_inner)
        conv_state = torch.cat([conv_state[..., 1:], xs.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
        xc = (conv_state * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        u = F.silu(xc).to(xs.dtype)                                  # (B, d_inner)
        dt, B, C = self._ssm_inputs(u)
        sd = self.state_dtype
        delta = self._delta(dt)                                      # (B, d_inner) fp32
        # elementwise only (no matmul), so autocast cannot lower the state math below fp32
        dA = torch.exp(delta.unsqueeze(-1) * self._A())              # (B, d_inner, n)
        h = torch.addcmul(ssm_state.to(sd) * dA, (delta * u.to(sd)).unsqueeze(-1), B.to(sd).unsqueeze(1))
        y = (h * C.to(sd).unsqueeze(1)).sum(-1) + self.D.to(sd) * u.to(sd)
        y = y.to(xs.dtype) * F.silu(z)
        return self.out_proj(y), (conv_state, h)


MIXER_OPTIONS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                 "dt_init_floor", "conv_bias", "bias", "chunk_size")


@register_backbone("mamba")
def mamba(d_model: int, n_layers: int, dropout: float = 0.0, d_intermediate: int = 0, kernel: str = "auto",
          **mixer_options) -> ResidualBackbone:
    """Mamba-1 residual stack: n_layers x [x + Mixer(RMSNorm(x))] (+ optional MLP), final RMSNorm."""
    check_kernel(kernel)
    unknown = sorted(set(mixer_options) - set(MIXER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown mamba option(s) {', '.join(unknown)}; valid choices: "
                         f"{', '.join(MIXER_OPTIONS)}, dropout, d_intermediate, kernel")
    check_positive(d_model=d_model, n_layers=n_layers)
    MambaMixer(d_model, kernel=kernel, **mixer_options)  # validate the sizes once, before building
    return ResidualBackbone(
        "mamba", d_model, n_layers, lambda i: MambaMixer(d_model, kernel=kernel, **mixer_options),
        d_intermediate=d_intermediate, dropout=dropout,
        config=dict(mixer_options, kernel=kernel))
