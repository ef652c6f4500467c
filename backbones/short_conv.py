"""The short causal depthwise convolution that Gated DeltaNet, mLSTM and Mamba put before their recurrence.

    y[b, t, c] = act( bias[c] + sum_k w[c, k] x[b, t - (K-1) + k, c] )

With forward / prefill / step, so that a mixer gets the backbone contract for free: the state is the
last K-1 inputs (B, K-1, C), zeros before the first token. The training pass runs on the channels-last
kernel of `ops.causal_conv` (no transposes, a hand-written backward).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.backbones.ops.causal_conv import causal_conv1d

ACTIVATIONS = {"silu": F.silu, "identity": lambda x: x}


class ShortConv(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = True, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}")
        self.channels, self.kernel_size = channels, kernel_size
        self.act = ACTIVATIONS[activation]
        # nn.Conv1d's depthwise initialisation: U(-1/sqrt(K), 1/sqrt(K)) for the weight and the bias
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound))   # (C, K)
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound)) if bias else None

    def _w(self, x):
        return self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) from a zero history -> (B, L, C)."""
        return self.act(causal_conv1d(x, self.weight, self.bias))

    def init_state(self, batch_size: int) -> torch.Tensor:
        p = self.weight
        return torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=p.device, dtype=p.dtype)

    def prefill(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, C) after the cached inputs `state` (B, K-1, C) -> (y, the last K-1 inputs)."""
        K = self.kernel_size
        xp = torch.cat([state.to(x.dtype), x], dim=1)                     # (B, K-1+L, C)
        y = self.act(causal_conv1d(xp, self.weight, self.bias)[:, K - 1:])
        return y, state.copy_(xp[:, xp.shape[1] - (K - 1):]) if K > 1 else state

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token x_t (B, C) -> (y_t (B, C), state)."""
        K = self.kernel_size
        w, b = self._w(x_t)
        window = torch.cat([state.to(x_t.dtype), x_t[:, None]], dim=1)    # (B, K, C)
        y = torch.einsum("bkc,ck->bc", window, w)
        if b is not None:
            y = y + b
        if K > 1:
            state.copy_(window[:, 1:])
        return self.act(y), state
