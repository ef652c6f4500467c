"""A stride-1 'same' convolution with few output channels, computed on 2 x 2 pixel blocks.

The decoder's last layer (XS: a 5 x 5 transposed conv, 16 -> 3 channels at 64 x 64) is the slowest conv
of the world model per FLOP: oneDNN computes output channels in blocks of 16, so 3 of them cost as much
as 16 (measured: padding the output to 16 channels left its time unchanged). Rearranged on 2 x 2 blocks
(space-to-depth), the same sums become a 3 x 3 conv from 4 x 16 to 4 x 3 channels at 32 x 32:

    x'[n, p·C + c, P, Q] = x[n, c, 2P + di, 2Q + dj]            p = 2·di + dj (the pixel's phase)
    y[n, o, 2P + ei, 2Q + ej] = y'[n, (2·ei + ej)·O + o, P, Q]
    W'[q·O + o, p·C + c, u, v] = W[o, c, 2(u - 1) + di - ei + k//2, 2(v - 1) + dj - ej + k//2]
                                 (0 where that tap falls outside the k x k kernel)

It does 1.44x the multiply-adds (the zero taps) at several times the rate: 2,048 frames, 2-core AMD EPYC,
channels-last, forward 465 -> 269 ms in fp32 and 238 -> 140 ms in bf16, rearrangements included. The
phase-major channel order makes both rearrangements copies of contiguous runs of 2·C values.

Only the forward pass is computed this way: its gradients are those of the original conv, which the
lean stack's backward computes with the original kernels (faster there). The result equals the direct
conv up to float rounding (tests/test_space_to_depth.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_OUT_CHANNELS = 8   # below oneDNN's 16-channel output block; wider layers are served well directly
MIN_SIZE = 32          # measured at 64 x 64 only; small images keep the direct conv
ENABLED = True         # off inside lean_conv.model_flops(), which counts the model's FLOPs
CHUNK = 256            # frames per rearranged copy: at XS a whole batch's is 0.54 GB in fp32, which raised
                       # the XS update's peak memory by as much (5.7 -> 6.3 GB, measured)


def usable(conv: nn.Module, x: torch.Tensor) -> bool:
    """conv: a stride-1 'same' Conv2d / ConvTranspose2d with few output channels, on an even-sized
    channels-last input (what the rearrangements are written for)."""
    if not ENABLED or not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) or conv.groups != 1:
        return False
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0 or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1):
        return False
    if tuple(conv.padding) != (k[0] // 2, k[0] // 2) or getattr(conv, "padding_mode", "zeros") != "zeros":
        return False
    if isinstance(conv, nn.ConvTranspose2d) and tuple(conv.output_padding) != (0, 0):
        return False
    h, w = x.shape[-2:]
    return (conv.out_channels <= MAX_OUT_CHANNELS and x.dim() == 4 and h % 2 == 0 and w % 2 == 0
            and min(h, w) >= MIN_SIZE and x.is_contiguous(memory_format=torch.channels_last))


@functools.lru_cache(maxsize=16)
def _weight_index(c_out: int, c_in: int, k: int, device: torch.device) -> torch.Tensor:
    """For each entry of W' (4·c_out, 4·c_in, K, K), its index into W.flatten() with one zero appended
    (index c_out·c_in·k·k: a tap outside the kernel); built once per shape and device, not per forward."""
    p = k // 2
    lo = -((p + 1) // 2)                    # the lowest block offset a tap reaches
    K = 2 * (-lo) + 1                       # block kernel: 3 for k = 3 or 5, 5 for k = 7 or 9
    o, c, q_e, p_d, u, v = torch.meshgrid(*(torch.arange(n) for n in (c_out, c_in, 4, 4, K, K)), indexing="ij")
    ei, ej, di, dj = q_e // 2, q_e % 2, p_d // 2, p_d % 2
    a = 2 * (u + lo) + di - ei + p          # the tap of the original kernel this entry holds
    b = 2 * (v + lo) + dj - ej + p
    inside = (a >= 0) & (a < k) & (b >= 0) & (b < k)
    idx = torch.where(inside, ((o * c_in + c) * k + a.clamp(0, k - 1)) * k + b.clamp(0, k - 1), c_out * c_in * k * k)
    # (o, c, q, p, u, v) -> (q·c_out + o, p·c_in + c, u, v)
    return idx.permute(2, 0, 3, 1, 4, 5).reshape(4 * c_out, 4 * c_in, K, K).contiguous().to(device)


def _unshuffle(x: torch.Tensor) -> torch.Tensor:
    """(n, c, 2P, 2Q) channels-last -> (n, 4c, P, Q) channels-last, channel p·c + ch (phase-major)."""
    n, c, h, w = x.shape
    v = x.permute(0, 2, 3, 1).view(n, h // 2, 2, w // 2, 2 * c)               # (n, P, di, Q, dj·c + ch)
    return v.permute(0, 1, 3, 2, 4).reshape(n, h // 2, w // 2, 4 * c).permute(0, 3, 1, 2)


def _shuffle(y: torch.Tensor) -> torch.Tensor:
    """The inverse arrangement for the output: (n, 4o, P, Q) -> (n, o, 2P, 2Q), both channels-last."""
    n, c4, p, q = y.shape
    v = y.permute(0, 2, 3, 1).view(n, p, q, 2, c4 // 2)                       # (n, P, Q, ei, ej·o + o')
    return v.permute(0, 1, 3, 2, 4).reshape(n, 2 * p, 2 * q, c4 // 4).permute(0, 3, 1, 2)


def conv_forward(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv(x) with the given weight and bias (already in the compute dtype), on 2 x 2 blocks; `usable`
    must hold. A transposed conv's weight (C_in, C_out, k, k) is first turned into the equal direct conv's
    (flipped taps, channels swapped)."""
    w = weight.flip(2, 3).transpose(0, 1) if isinstance(conv, nn.ConvTranspose2d) else weight   # (O, C, k, k)
    c_out, c_in, k = w.shape[0], w.shape[1], w.shape[2]
    idx = _weight_index(c_out, c_in, k, w.device)
    w2 = torch.cat([w.reshape(-1), w.new_zeros(1)])[idx]                     # (4·O, 4·C, K, K)
    w2 = w2.contiguous(memory_format=torch.channels_last)
    b2 = bias.repeat(4) if bias is not None else None                        # phase-major: q·O + o
    n, _, h, w_ = x.shape
    out = torch.empty(n, c_out, h, w_, dtype=torch.promote_types(x.dtype, w2.dtype), device=x.device,
                      memory_format=torch.channels_last)
    for i in range(0, n, CHUNK):   # the rearranged input is a copy of x: keep it to CHUNK frames at a time
        out[i:i + CHUNK] = _shuffle(F.conv2d(_unshuffle(x[i:i + CHUNK]), w2, b2, 1, w2.shape[-1] // 2))
    return out
