"""GRU backbone: a single-layer fused nn.GRU as the mixer of the shared pre-norm residual stack.

A 2-layer "gru" backbone is two blocks  x <- x + Dropout(GRU(RMSNorm(x)))  followed by a final RMSNorm
(see backbones/base.py). Each mixer is one nn.GRU layer (Cho et al. 2014, torch's gate convention):

    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}          y_t = h_t

The parallel pass (forward / prefill) calls the fused nn.GRU (cuDNN on CUDA, the fused CPU kernel
otherwise); the single-token step applies the same cell math with the *same* parameters through
`torch.gru_cell`, which is the fused cell kernel behind nn.GRUCell. Measured on the 2-core CPU
(d_model 512, one layer, B 16..1024) the cell call was 1.1-1.5x faster than running nn.GRU on a
length-1 sequence (which must also add and remove the time axis), and it is never slower; see the
report in the repository history for the numbers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from wmbench.backbones.base import ResidualBackbone, check_kernel, check_positive
from wmbench.registry import register_backbone


class GRUMixer(nn.Module):
    """One fused GRU layer, d_model -> d_model. State: h (1, B, D) as nn.GRU expects."""

    def __init__(self, d_model: int, kernel: str = "auto"):
        super().__init__()
        check_positive(d_model=d_model)
        self.d_model = d_model
        self.kernel = check_kernel(kernel)  # cuDNN is picked by torch itself for CUDA tensors
        self.rnn = nn.GRU(d_model, d_model, num_layers=1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)  # (B, L, D), h_0 = 0
        return y

    def init_state(self, batch_size: int, max_len: int | None = None) -> torch.Tensor:
        # max_len is irrelevant for a recurrent state; accepted for the uniform contract
        w = self.rnn.weight_hh_l0
        return torch.zeros(1, batch_size, self.d_model, device=w.device, dtype=w.dtype)

    def _h0(self, state: torch.Tensor) -> torch.Tensor:
        # accept (B, D) as well as nn.GRU's (1, B, D)
        return state.unsqueeze(0) if state.dim() == 2 else state

    def prefill(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = self._h0(state).to(x.dtype)  # under autocast nn.GRU runs in x's dtype
        y, h = self.rnn(x, h0)            # y (B, L, D), h (1, B, D)
        return y, h

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rnn = self.rnn
        h = self._h0(state)[0]            # (B, D)
        w_ih = rnn.weight_ih_l0
        x_t = x_t.to(w_ih.dtype)
        h = torch.gru_cell(x_t, h.to(w_ih.dtype), w_ih, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        return h, h.unsqueeze(0)          # y_t = h_t (B, D); state (1, B, D)


@register_backbone("gru")
def gru(d_model: int, n_layers: int, dropout: float = 0.0, d_intermediate: int = 0,
        kernel: str = "auto") -> ResidualBackbone:
    """n_layers pre-norm residual blocks, each mixing with one fused GRU layer."""
    check_kernel(kernel)
    check_positive(d_model=d_model, n_layers=n_layers)
    return ResidualBackbone("gru", d_model, n_layers, lambda i: GRUMixer(d_model, kernel=kernel),
                            d_intermediate=d_intermediate, dropout=dropout,
                            config={"kernel": kernel})
