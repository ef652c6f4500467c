"""Lazy, failure-tolerant access to the optional CUDA kernels (the `cuda` extra).

mamba-ssm, causal-conv1d and flash-attn are only imported when a CUDA tensor asks for them. Their
import can fail in many ways on machines without a matching CUDA build (ImportError, but also
RuntimeError/OSError from Triton or the driver), so any exception means "not available": we fall
back to the PyTorch path with a one-line warning, once per package.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_MODULES: dict[str, object | None] = {}


def load(module: str):
    """Import `module` (e.g. 'mamba_ssm.ops.triton.ssd_combined') or return None, warning once."""
    if module in _MODULES:
        return _MODULES[module]
    mod = None
    if torch.cuda.is_available():
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any failure means the kernel is unusable here
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"wmbench: CUDA kernel {module} unavailable ({first}); using the PyTorch path",
                          stacklevel=3)
    _MODULES[module] = mod
    return mod


def want_cuda(kernel: str, x: torch.Tensor, module: str):
    """Return the kernel module to use for tensor `x`, or None for the PyTorch path.

    kernel="torch": never; "auto": when x is on CUDA and the module imports; "cuda": required
    (a clear error otherwise).
    """
    if kernel == "torch":
        return None
    if not x.is_cuda:
        if kernel == "cuda":
            raise RuntimeError(f"kernel='cuda' needs CUDA tensors (got {x.device}); use kernel='auto' or 'torch'")
        return None
    mod = load(module)
    if mod is None and kernel == "cuda":
        raise RuntimeError(f"kernel='cuda' requested but {module} could not be imported; "
                           "install the `cuda` extra: pip install 'wmbench[cuda]'")
    return mod
