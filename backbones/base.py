"""The residual stack shared by every backbone, and the mixer contract.

All four backbones are the same pre-norm residual network and differ only in the sequence mixer:

    x <- x + Dropout(Mixer(RMSNorm(x)))          for each of n_layers blocks
    x <- x + Dropout(MLP(RMSNorm(x)))            only if d_intermediate > 0 (the transformer's default)
    y  = RMSNorm_f(x)

A mixer is an nn.Module with
    forward(x)               x (B, L, D) -> (B, L, D), the parallel training pass, zero initial state
    init_state(B, max_len)   its empty recurrent state (or KV cache), on the mixer's device/dtype
    prefill(x, state)        parallel pass continuing from `state` -> (y, new_state)
    step(x_t, state)         one token, x_t (B, D) -> (y_t, new_state)
States may be updated in place; callers must use the returned state.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = ("auto", "torch", "cuda")


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid choices: {', '.join(KERNELS)}")
    return kernel


def check_positive(**sizes: Any) -> None:
    for k, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")



class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that stays on the fused kernel under autocast. There a bf16 input meets the fp32 weight,
    and torch falls back to its composite with a warning; that composite upcasts to fp32, scales by the
    fp32 weight and casts back, which is what this does explicitly (bit-identical, tests/test_world_model.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and x.dtype != self.weight.dtype:
            return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)
        return super().forward(x)


class MLP(nn.Module):
    """Position-wise feed-forward branch (GELU), used by the transformer and optional elsewhere."""

    def __init__(self, d_model: int, d_intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_intermediate, bias=False)
        self.fc2 = nn.Linear(d_intermediate, d_model, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, d_intermediate: int, dropout: float, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=eps)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)
        if d_intermediate > 0:
            self.norm2 = RMSNorm(d_model, eps=eps)
            self.mlp = MLP(d_model, d_intermediate)
        else:
            self.norm2 = self.mlp = None

    def _mlp(self, x):
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.norm2(x)))
        return x

    def forward(self, x):
        return self._mlp(x + self.drop(self.mixer(self.norm(x))))

    def prefill(self, x, state):
        y, state = self.mixer.prefill(self.norm(x), state)
        return self._mlp(x + self.drop(y)), state

    def step(self, x_t, state):
        y_t, state = self.mixer.step(self.norm(x_t), state)
        return self._mlp(x_t + self.drop(y_t)), state


class ResidualBackbone(nn.Module):
    """n_layers pre-norm blocks around `make_mixer(layer_idx)`, then a final RMSNorm.

    Implements the wmbench backbone contract (forward / init_state / prefill / step / n_params).
    """

    def __init__(self, name: str, d_model: int, n_layers: int, make_mixer: Callable[[int], nn.Module],
                 d_intermediate: int = 0, dropout: float = 0.0, norm_eps: float = 1e-5,
                 config: dict | None = None):
        super().__init__()
        check_positive(d_model=d_model, n_layers=n_layers)
        if not isinstance(d_intermediate, int) or d_intermediate < 0:
            raise ValueError(f"d_intermediate must be an integer >= 0, got {d_intermediate!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.name = name
        self.d_model = d_model
        self.n_layers = n_layers
        self.config = dict(config or {}, d_model=d_model, n_layers=n_layers,
                           d_intermediate=d_intermediate, dropout=float(dropout))
        self.blocks = nn.ModuleList(
            Block(d_model, make_mixer(i), d_intermediate, float(dropout), norm_eps) for i in range(n_layers))
        self.norm_f = RMSNorm(d_model, eps=norm_eps)
        self._rescale_residual_projections(n_residuals_per_layer=2 if d_intermediate > 0 else 1)

    @torch.no_grad()
    def _rescale_residual_projections(self, n_residuals_per_layer: int) -> None:
        # GPT-2 / mamba-ssm: projections that write into the residual stream are scaled by
        # 1/sqrt(#residual branches) so the stream's variance does not grow with depth.
        scale = 1.0 / math.sqrt(n_residuals_per_layer * self.n_layers)
        for blk in self.blocks:
            for mod in (getattr(blk.mixer, "out_proj", None), blk.mlp.fc2 if blk.mlp is not None else None):
                if isinstance(mod, nn.Linear):
                    nn.init.kaiming_uniform_(mod.weight, a=math.sqrt(5))
                    mod.weight.mul_(scale)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_input(self, x: torch.Tensor) -> bool:
        """x must be (B, L, d_model); returns False for an empty sequence (L = 0: nothing to compute)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: expected input (batch, length, {self.d_model}), got {shape}")
        return x.shape[1] > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> y (B, L, D), parallel over the sequence from an empty state (L = 0: empty y)."""
        if not self._check_input(x):
            return x.clone()
        for blk in self.blocks:
            x = blk(x)
        return self.norm_f(x)

    def init_state(self, batch_size: int, max_len: int | None = None) -> list:
        check_positive(batch_size=batch_size)
        if max_len is not None:
            check_positive(max_len=max_len)
        return [blk.mixer.init_state(batch_size, max_len) for blk in self.blocks]

    def prefill(self, x: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """Parallel pass over x (B, L, D) continuing from `state`; returns (y, state after x)."""
        if not self._check_input(x):
            return x.clone(), state
        new_state = []
        for blk, s in zip(self.blocks, state):
            x, s = blk.prefill(x, s)
            new_state.append(s)
        return self.norm_f(x), new_state

    def step(self, x_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One token x_t (B, D) -> (y_t (B, D), state)."""
        new_state = []
        for blk, s in zip(self.blocks, state):
            x_t, s = blk.step(x_t, s)
            new_state.append(s)
        return self.norm_f(x_t), new_state

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_params={self.n_params:,}"
