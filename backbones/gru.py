"""GRU backbone: a single-layer fused nn.GRU as the mixer of the shared pre-norm residual stack.

A 2-layer "gru" backbone is two blocks  x <- x + Dropout(GRU(RMSNorm(x)))  followed by a final RMSNorm
(see backbones/base.py). Each mixer is one nn.GRU layer (Cho et al. 2014, torch's gate convention):

    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}          y_t = h_t

The parallel pass (forward / prefill) calls the fused nn.GRU (cuDNN on CUDA, the fused CPU kernel
otherwise); the single-token step applies the same cell math with the *same* parameters through
`torch.gru_cell`, which is the fused cell kernel behind nn.GRUCell. On the 2-core CPU (d_model 512,
one layer, B = 16, 64, 256, 1024) the cell call took 1.3-1.4x less time than running nn.GRU on a
length-1 sequence (which also adds and removes the time axis) and matched it exactly.

kernel: "auto" (cuDNN on CUDA, chosen by torch), "torch" (torch's own GRU even on CUDA, cuDNN off),
"cuda" (CUDA tensors required, for a uniform API with the other backbones).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from wmbench.backbones.base import ResidualBackbone, check_kernel, check_positive
from wmbench.core.registry import register_backbone


class GRUMixer(nn.Module):
    """One fused GRU layer, d_model -> d_model. State: h (1, B, D) as nn.GRU expects."""

    def __init__(self, d_model: int, kernel: str = "auto"):
        super().__init__()
        check_positive(d_model=d_model)
        self.d_model = d_model
        self.kernel = check_kernel(kernel)
        self.rnn = nn.GRU(d_model, d_model, num_layers=1, batch_first=True)

    def _run(self, x: torch.Tensor, h0: torch.Tensor | None):
        # kernel: "auto" lets torch pick cuDNN on CUDA; "torch" forces torch's own (non-cuDNN) GRU;
        # "cuda" insists on a CUDA tensor, like the other backbones
        if self.kernel == "cuda" and not x.is_cuda:
            raise RuntimeError(f"kernel='cuda' needs CUDA tensors (got {x.device}); use kernel='auto' or 'torch'")
        if self.kernel == "torch" and x.is_cuda:
            with torch.backends.cudnn.flags(enabled=False):
                return self.rnn(x, h0)
        return self.rnn(x, h0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self._run(x, None)  # (B, L, D), h_0 = 0
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
        y, h = self._run(x, h0)           # y (B, L, D), h (1, B, D)
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
