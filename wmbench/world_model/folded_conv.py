"""Inference forward for the conv encoder and decoder: BatchNorm folded into the conv before it, SiLU in
place.

In eval mode BatchNorm is a per-channel affine map with its running statistics,

    BN(c) = (c - mu) * s + beta,   s = gamma / sqrt(var + eps),

so Conv -> BN is one conv with weight W * s (per output channel) and bias (b - mu) * s + beta. Without
autograd the SiLU can then overwrite the conv's fresh output. Each layer is one conv and one in-place
element-wise pass instead of a conv, a BatchNorm pass and a SiLU into a new tensor: imagination encodes
b_img x (l_img - 1) = 7,168 context frames per update at XS, whose 16 x 64 x 64 and 32 x 32 x 32 layers
are hundreds of MB each.

The result equals the unfolded modules up to float rounding (the products are grouped differently);
tests/test_folded_conv.py checks it against them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def usable(x: torch.Tensor, module: nn.Module) -> bool:
    """Folding needs BatchNorm's running statistics (eval mode) and no autograd (SiLU in place)."""
    return not module.training and not torch.is_grad_enabled()


def folded_params(conv: nn.Module, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `conv` with the eval-mode `bn` after it folded in."""
    s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)                    # (C_out,)
    # Conv2d weights are (C_out, C_in, k, k); ConvTranspose2d weights are (C_in, C_out, k, k)
    shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
    w = conv.weight * s.view(shape)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return w, (b - bn.running_mean) * s + bn.bias


def _conv(conv: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(conv, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, w, b, conv.stride, conv.padding, conv.output_padding, conv.groups,
                                  conv.dilation)
    if conv.padding_mode != "zeros":
        raise ValueError("folded convs support zero padding only")
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def run_folded(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`net(x)` for a Sequential of Conv2d / ConvTranspose2d, BatchNorm2d and SiLU modules in eval mode
    without autograd: each conv absorbs the BatchNorm right after it, each SiLU runs in place. A
    BatchNorm with no conv before it runs as usual."""
    mods = list(net)
    i, own = 0, False   # own: x is a tensor made here, which SiLU may overwrite (never the caller's input)
    while i < len(mods):
        m = mods[i]
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
                x = _conv(m, x, *folded_params(m, mods[i + 1]))
                i, own = i + 2, True
                continue
            x = _conv(m, x, m.weight, m.bias)
        elif isinstance(m, nn.SiLU):
            x = F.silu(x, inplace=own)
        else:
            x = m(x)
        own = True
        i += 1
    return x
