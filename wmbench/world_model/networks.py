"""Networks of the world model and the actor-critic: RMSNorm MLPs (Tables 7-8), the convolutional
encoder and decoder (Table 5), and the official code's fan-average initialisation."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from wmbench.backbones.base import RMSNorm
from wmbench.world_model import folded_conv, lean_conv
from wmbench.world_model.config import DramaConfig


def rms_mlp(d_in: int, d_hidden: int, d_out: int, n_layers: int) -> nn.Sequential:
    """n_layers x [Linear, RMSNorm, SiLU] then a Linear head (Tables 7-8)."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(d_in if i == 0 else d_hidden, d_hidden), RMSNorm(d_hidden, eps=1e-5), nn.SiLU()]
    layers.append(nn.Linear(d_hidden if n_layers else d_in, d_out))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Conv(k, stride s_i, 'same' padding) -> BatchNorm -> SiLU per layer (Table 5), then flatten.

    XS: 3x64x64 -> 16x64x64 -> 32x32x32 -> 48x16x16 -> 64x8x8 -> 64x4x4 = 1024 features.
    """

    def __init__(self, cfg: DramaConfig):
        super().__init__()
        layers, c_in = [], cfg.image_channels
        for c, s in zip(cfg.enc_filters, cfg.enc_strides):
            layers += [nn.Conv2d(c_in, c, cfg.kernel, s, cfg.kernel // 2), nn.BatchNorm2d(c), nn.SiLU()]
            c_in = c
        self.net = nn.Sequential(*layers)
        res = cfg.image_size // cfg.obs_pool // math.prod(cfg.enc_strides)
        self.out_shape = (cfg.enc_filters[-1], res, res)
        self.out_dim = math.prod(self.out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (N, C, H, W) float -> (N, out_dim)
        if lean_conv.usable(x, self):   # training: keep one tensor per layer for backward, not three
            m = list(self.net)
            blocks = [(m[i + 1], m[i + 3] if i + 3 < len(m) else None) for i in range(0, len(m), 3)]
            return lean_conv.run_stack(x, m[0], blocks).flatten(1)
        if folded_conv.usable(x, self):   # inference: BatchNorm folded into the convs, SiLU in place
            return folded_conv.run_folded(self.net, x).flatten(1)
        return self.net(x).flatten(1)


class Decoder(nn.Module):
    """Mirror of the encoder (official code section 6.5): Linear -> (C, s, s) -> BN -> SiLU, then
    ConvTranspose layers walking the encoder backwards, the last one to image channels with the first
    encoder stride, then a sigmoid (pixels in [0, 1])."""

    def __init__(self, cfg: DramaConfig, out_shape: tuple):
        super().__init__()
        self.out_shape = out_shape
        self.fc = nn.Linear(cfg.latent_dim, math.prod(out_shape))
        self.fc_norm = nn.Sequential(nn.BatchNorm2d(out_shape[0]), nn.SiLU())
        f, s, k = cfg.enc_filters, cfg.enc_strides, cfg.kernel
        layers = []
        for i in range(len(f) - 1, 0, -1):   # f[i] -> f[i-1], undoing encoder layer i's stride
            layers += [self._up(f[i], f[i - 1], k, s[i]), nn.BatchNorm2d(f[i - 1]), nn.SiLU()]
        layers.append(self._up(f[0], cfg.image_channels, k, s[0]))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def _up(c_in, c_out, k, stride):
        # stride 2 doubles the resolution exactly (output_padding 1); stride 1 keeps it
        return nn.ConvTranspose2d(c_in, c_out, k, stride, k // 2, output_padding=stride - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:   # (N, latent_dim) -> (N, C, H, W) in [0, 1]
        # channels-last, as the encoder's input already is: the conv kernels then need no layout
        # conversions (1.15x on the XS world-model update, measured on a 2-core AMD EPYC)
        c = self.fc(z).view(-1, *self.out_shape).contiguous(memory_format=torch.channels_last)
        if lean_conv.usable(c, self):   # training: see Encoder.forward
            m = list(self.net)
            blocks = [(self.fc_norm[0], m[0])] + [(m[i], m[i + 2]) for i in range(1, len(m) - 1, 3)]
            return torch.sigmoid(lean_conv.run_stack(c, None, blocks))
        if folded_conv.usable(c, self):   # inference: see Encoder.forward
            return torch.sigmoid_(folded_conv.run_folded(self.net, folded_conv.run_folded(self.fc_norm, c)))
        return torch.sigmoid(self.net(self.fc_norm(c)))


def trunc_normal_init(m: nn.Module) -> None:
    """DreamerV3's fan-average initialisation, as the official code applies it (`weight_init`): weights
    ~ N(0, std^2) truncated at ±2 std, std = sqrt(1 / fan_avg) / 0.8796 (the truncation's std factor),
    fan_avg = (fan_in + fan_out) / 2 with the kernel area counted; zero biases. Linear and (transposed)
    convolutions only; use with `module.apply`."""
    if isinstance(m, nn.Linear):
        fan_avg = (m.in_features + m.out_features) / 2
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        area = m.kernel_size[0] * m.kernel_size[1]
        fan_avg = area * (m.in_channels + m.out_channels) / 2
    else:
        return
    std = math.sqrt(1.0 / fan_avg) / 0.87962566103423978
    nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
