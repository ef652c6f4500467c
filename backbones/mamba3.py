"""Mamba-3 (SISO) mixer (arXiv 2603.15569), with the parameterisation and names of mamba-ssm 2.3.2's `Mamba3`.

    [z, x, B, C, dd_dt, dd_A, trap, angles] = in_proj(u)    z, x (d_inner); B, C (g N); dd_dt, dd_A, trap (H);
                                                              angles (S)
    dt      = softplus(dd_dt + dt_bias)                       (H,) per token
    A       = -max(f(dd_A), A_floor)                          f(v) = 1 + v (v >= 0), 1 / (1 - v) (v < 0)
    lambda  = sigmoid(trap)                                   trapezoid weight, per head and token
    theta   = pi tanh(angles) dt                              S angle increments, shared by the heads but for dt
    B, C    = RMSNorm_N(B), RMSNorm_N(C)                      over d_state, with weights (B_norm, C_norm)
    y       = Mamba3SISO(x, dt, A, B + B_bias, C + C_bias, lambda, theta) + D x     (backbones/ops/mamba3.py)
    out     = out_proj(y * silu(z))                           (outproj_norm=True: out_proj(RMSNorm_P(y) w * silu(z)))

The SSM (one head, state (P, N)): h_t = alpha_t h_{t-1} + beta_t x_{t-1} k_{t-1}^T + gamma_t x_t k_t^T and
y_t = h_t q_t + D x_t, with alpha_t = exp(dt_t A_t), beta_t = (1 - lambda_t) dt_t alpha_t, gamma_t = lambda_t dt_t,
k_t = R(Theta_t)(B_t + B_bias), q_t = R(Theta_t)(C_t + C_bias), Theta_t = Theta_{t-1} + theta_t (mod 2 pi): the
trapezoidal discretisation and the complex state as data-dependent rotary embeddings. No short convolution.
S = floor(d_state * rope_fraction) rounded down to even, halved: the first 2S entries of B and C rotate in pairs.

Defaults and initialisation are mamba-ssm's: expand 2, headdim 64, d_state 128, rope_fraction 0.5, dt_bias =
softplus^-1(dt), dt log-uniform in [dt_min, dt_max] = [1e-3, 0.1] floored at 1e-4; B_bias = C_bias = 1; D = 1;
norm weights 1; A_floor 1e-4; no output norm. Here headdim defaults to the largest divisor of d_inner not above
64 (64 whenever it divides d_inner), so that every d_model builds. B_bias, C_bias have the official shape
(H, 1, N) (the 1 is the MIMO rank), so state dicts of the SISO layer load.

The recurrent state is (angle (B, H, S), ssm (B, H, P, N), k (B, H, N), x (B, H, P)): mamba-ssm's
(angle_dt_state, ssm_state, k_state (there (B, 1, H, N)), v_state), in fp32. `prefill` continues from it.

On CUDA with kernel "auto"/"cuda", forward and prefill use mamba-ssm's Triton `mamba3_siso_combined` when it
imports and the sizes suit it (d_state and headdim powers of two, at least 16); that kernel computes in bf16
internally, so there the contract holds to bf16 tolerance only. `step` is always the PyTorch recurrence.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.backbones.base import ResidualBackbone, RMSNorm, check_kernel, check_positive
from wmbench.backbones.ops.cuda import want_cuda
from wmbench.backbones.ops.mamba3 import init_state as op_init_state
from wmbench.backbones.ops.mamba3 import mamba3_siso, mamba3_siso_step
from wmbench.core.registry import register_backbone
from wmbench.backbones.ops.dtypes import state_dtype as _sd

MAMBA3_CUDA_MODULE = "mamba_ssm.ops.triton.mamba3.mamba3_siso_combined"


def heavy_tail(v: torch.Tensor) -> torch.Tensor:
    """1 + v for v >= 0, 1 / (1 - v) for v < 0: positive, continuous and differentiable at 0."""
    return v.clamp_min(0) + torch.reciprocal(1 - v.clamp_max(0))


def default_headdim(d_inner: int, cap: int = 64) -> int:
    """The largest divisor of d_inner not above `cap` (mamba-ssm's headdim 64 whenever 64 divides d_inner)."""
    return max(k for k in range(1, min(cap, d_inner) + 1) if d_inner % k == 0)


class HeadRMSNorm(nn.Module):
    """y (..., H, P) -> rmsnorm over each head's P channels, times a weight per channel -> (..., H*P)."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.flatten(-2) * self.weight.to(y.dtype)


class Mamba3Mixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, expand: int = 2, headdim: int | None = None,
                 ngroups: int = 1, rope_fraction: float = 0.5, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, A_floor: float = 1e-4, outproj_norm: bool = False,
                 chunk_size: int | None = None, norm_eps: float = 1e-5, kernel: str = "auto"):
        super().__init__()
        check_positive(d_model=d_model, d_state=d_state, expand=expand, ngroups=ngroups)
        if chunk_size is not None:
            check_positive(chunk_size=chunk_size)
        d_inner = expand * d_model
        if headdim is None:
            headdim = default_headdim(d_inner)
        check_positive(headdim=headdim)
        if d_inner % headdim != 0:
            raise ValueError(f"d_inner = expand*d_model = {d_inner} must be a multiple of headdim = {headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups != 0:
            raise ValueError(f"nheads = d_inner/headdim = {nheads} must be a multiple of ngroups = {ngroups}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1.0, got {rope_fraction!r}")
        split = int(d_state * rope_fraction)
        n_angles = (split - split % 2) // 2
        if n_angles < 1:
            raise ValueError(f"d_state = {d_state} leaves no rotation angle at rope_fraction {rope_fraction}; "
                             f"need d_state >= {int(2 / rope_fraction)}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not dt_init_floor > 0:
            raise ValueError(f"dt_init_floor must be > 0, got {dt_init_floor!r}")
        if not A_floor > 0:
            raise ValueError(f"A_floor must be > 0, got {A_floor!r}")
        if not isinstance(outproj_norm, bool):
            raise ValueError(f"outproj_norm must be a bool, got {outproj_norm!r}")
        self.d_model, self.d_inner, self.d_state, self.expand = d_model, d_inner, d_state, expand
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, nheads, ngroups, chunk_size
        self.rope_fraction, self.n_angles, self.A_floor = rope_fraction, n_angles, float(A_floor)
        self.outproj_norm = outproj_norm
        self.kernel = check_kernel(kernel)
        self._sizes = [d_inner, d_inner, ngroups * d_state, ngroups * d_state, nheads, nheads, nheads, n_angles]

        # in_proj -> [z, x, B, C, dd_dt, dd_A, trap, angles] (mamba-ssm's order)
        self.in_proj = nn.Linear(d_model, sum(self._sizes), bias=False)
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.B_bias = nn.Parameter(torch.ones(nheads, 1, d_state))
        self.C_bias = nn.Parameter(torch.ones(nheads, 1, d_state))
        self.B_norm = RMSNorm(d_state, eps=norm_eps)
        self.C_norm = RMSNorm(d_state, eps=norm_eps)
        self.D = nn.Parameter(torch.ones(nheads))
        for p in (self.dt_bias, self.D):
            p._no_weight_decay = True
        # per-head RMSNorm before the gate (mamba-ssm's RMSNormGated(d_inner, group_size=P, norm_before_gate=True))
        self.norm = HeadRMSNorm(d_inner, headdim, eps=norm_eps) if outproj_norm else None
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    # ---------------------------------------------------------------------------------------------
    def _chunk(self) -> int:
        """Chunk length; it changes only the speed. Default 64: mamba-ssm's for its kernel, and the fastest
        of 32 / 64 / 128 for the PyTorch op at d_state 128 on our 2-core CPU."""
        return 64 if self.chunk_size is None else self.chunk_size

    def _project(self, u: torch.Tensor):
        """u (..., d_model) -> z, x (..., H, P) and the SSM inputs after their activations (fp32 / fp64)."""
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(self.in_proj(u), self._sizes, dim=-1)
        sd = _sd(u)
        dt = F.softplus(dd_dt.to(sd) + self.dt_bias.to(sd))
        A = -heavy_tail(dd_A.to(sd)).clamp_min(self.A_floor)
        lam = torch.sigmoid(trap.to(sd))
        theta = (math.pi * torch.tanh(ang.to(sd)))[..., None, :] * dt[..., None]      # (..., H, S)
        B = self.B_norm(B.unflatten(-1, (G, N)))
        C = self.C_norm(C.unflatten(-1, (G, N)))
        return (z.unflatten(-1, (H, P)), x.unflatten(-1, (H, P)), dt, A, B, C, lam, theta,
                (dd_dt, dd_A, trap, ang))

    def _gate(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., H, P) -> (..., d_inner): y silu(z), or RMSNorm_P(y) w silu(z) with outproj_norm."""
        sd = _sd(y)
        gate = F.silu(z.to(sd))
        if self.norm is not None:
            return (self.norm(y.to(sd)) * gate.flatten(-2)).to(z.dtype)
        # gate first: the product takes its (contiguous) layout, even where y is a head-major view
        return (gate * y.to(sd)).flatten(-2).to(z.dtype)

    def _cuda_module(self, u: torch.Tensor):
        """mamba-ssm's kernel module for u, or None for the PyTorch op (kernel='cuda' insists on it)."""
        if self.kernel == "torch":
            return None
        if u.is_cuda and not all(v >= 16 and v & (v - 1) == 0 for v in (self.d_state, self.headdim)):
            if self.kernel == "cuda":
                raise RuntimeError("kernel='cuda': mamba-ssm's Mamba-3 kernel needs d_state and headdim powers "
                                   f"of two >= 16, got d_state={self.d_state}, headdim={self.headdim}")
            return None
        return want_cuda(self.kernel, u, MAMBA3_CUDA_MODULE)

    def _run(self, u: torch.Tensor, state):
        """The mixer over u (B, L, d_model) from `state` (or zeros): (out, new state)."""
        mod = self._cuda_module(u)
        z, x, dt, A, B, C, lam, theta, raw = self._project(u)
        if mod is not None:
            return self._run_cuda(mod, u, z, x, dt, A, B, C, raw, state)
        y, new_state = mamba3_siso(x, dt, A, B, C, lam, theta, D=self.D, B_bias=self.B_bias[:, 0],
                                   C_bias=self.C_bias[:, 0], state=state, chunk_size=self._chunk())
        return self.out_proj(self._gate(y, z)), new_state

    def _run_cuda(self, mod, u, z, x, dt, A, B, C, raw, state):
        _, _, trap, ang = raw
        H = self.nheads
        heads_first = lambda t: t.transpose(1, 2).contiguous()      # noqa: E731  (B, L, H) -> (B, H, L)
        out = mod.mamba3_siso_combined(
            Q=C.contiguous(), K=B.contiguous(), V=x.contiguous(), ADT=heads_first(A * dt), DT=heads_first(dt),
            Trap=heads_first(trap), Q_bias=self.C_bias[:, 0], K_bias=self.B_bias[:, 0],
            Angles=ang.float()[:, :, None, :].expand(-1, -1, H, -1), D=self.D,
            Z=None if self.outproj_norm else z.contiguous(), chunk_size=self._chunk(),
            Input_States=None if state is None else tuple(state), return_final_states=True)
        y, angle, ssm, k, v = out[:5]
        if self.outproj_norm:
            y = self._gate(y, z)
        else:
            y = y.flatten(-2)
        return self.out_proj(y.to(u.dtype)), (angle.float(), ssm.float(), k.float(), v.float())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self._run(u, None)[0]

    # ---------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, max_len: int | None = None):
        p = self.in_proj.weight
        return op_init_state(batch_size, self.nheads, self.headdim, self.d_state, self.n_angles,
                             dtype=_sd(p), device=p.device)

    def prefill(self, u: torch.Tensor, state):
        out, new = self._run(u, state)
        return out, tuple(s.copy_(n) for s, n in zip(state, new))

    def step(self, u_t: torch.Tensor, state):
        z, x, dt, A, B, C, lam, theta, _ = self._project(u_t)
        y, state = mamba3_siso_step(x, dt, A, B, C, lam, theta, D=self.D, B_bias=self.B_bias[:, 0],
                                    C_bias=self.C_bias[:, 0], state=state, inplace=True)
        return self.out_proj(self._gate(y, z)), state


@register_backbone("mamba3")
def mamba3(d_model: int, n_layers: int, dropout: float = 0.0, d_intermediate: int = 0,
           kernel: str = "auto", **mixer_options) -> ResidualBackbone:
    """Mamba-3 (SISO) backbone: n_layers pre-norm residual blocks around a Mamba3Mixer."""
    check_kernel(kernel)
    valid = set(inspect.signature(Mamba3Mixer).parameters) - {"d_model", "kernel"}
    unknown = sorted(set(mixer_options) - valid)
    if unknown:
        raise ValueError(f"unknown mamba3 option(s) {unknown}; valid: {', '.join(sorted(valid))}")

    def make_mixer(i: int) -> Mamba3Mixer:
        return Mamba3Mixer(d_model, kernel=kernel, **mixer_options)

    return ResidualBackbone("mamba3", d_model, n_layers, make_mixer, d_intermediate=d_intermediate,
                            dropout=dropout, config=dict(mixer_options, kernel=kernel))
