"""The dtype of gates, decays, states and norms in every backbone and op: fp32 for fp32/bf16/fp16
tensors, fp64 for fp64 tensors (so the float64 reference tests are exact)."""
from __future__ import annotations

import torch


def state_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32
