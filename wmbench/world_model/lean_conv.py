"""Memory-lean training forward for the conv encoder and decoder: BatchNorm -> SiLU -> Conv as one
autograd node that keeps only its input.

Plain autograd keeps three full-resolution tensors per layer for the backward pass: the conv output
(for BatchNorm), the normalised one (for SiLU) and the activation (for the next conv's weight gradient).
At XS the world-model batch is 16 x 128 = 2,048 frames, so the 16 x 64 x 64 layers alone hold 1.6 GB in
the encoder and as much in the decoder (6.37 GB saved in all, measured; 2.58 GB with this module, and
the XS agent's peak with a full replay buffer 5.9 GB).

`bn_silu_conv` keeps only the conv output c (and BatchNorm's per-channel mean and 1/std). The backward
pass recomputes BN(c) (BatchNorm's inference kernel, from the forward's batch statistics) and SiLU from
it (two element-wise passes, no matmul) and then calls the very
kernels autograd would have called: `convolution_backward`, `silu_backward`,
`native_batch_norm_backward`. The forward pass is the same ATen calls as the nn.Modules', so losses,
parameters and running statistics are bit-identical to the plain stack, and the gradients are equal
up to float rounding (tests/test_lean_conv.py). Used for training, in fp32 and under bf16 autocast;
eval mode and no-grad calls take the ordinary modules.

Under autocast the stack does autocast's casts itself, once: the input and the conv weights and biases
go to the autocast dtype (their gradients flow back through the casts to the fp32 parameters), and
BatchNorm keeps fp32 parameters and statistics on a bf16 input, as autocast leaves it. The kernels and
dtypes are then those of the plain stack under autocast, and each layer keeps one bf16 tensor.

A transposed conv's bias gradient is the sum of the output gradient over (N, H, W), taken here with
`sum` instead of oneDNN's deconvolution backward: asking that kernel for the bias doubles its time (the
decoder's 32->16 layer at XS: 407 against 178 ms in bf16, 462 against 280 ms in fp32; 2-core AMD EPYC),
while the sum takes 25 ms. Regular convs compute it as cheaply as `sum` and keep theirs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from wmbench.world_model import space_to_depth

aten = torch.ops.aten


def _bn_train(bn: nn.BatchNorm2d, c: torch.Tensor):
    """BatchNorm2d's training forward (ATen's kernel), running statistics updated as the module does."""
    momentum = bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if momentum is None:   # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(bn.num_batches_tracked)
    return aten.native_batch_norm(c, bn.weight, bn.bias, bn.running_mean, bn.running_var, True,
                                  momentum if momentum is not None else 0.0, bn.eps)


def _no_autocast(fn):
    """Run an autograd Function's backward with autocast off: its inputs already carry the forward's
    dtypes, and autocast must not cast them again (CPU backward runs in the caller's autocast state)."""
    def wrapper(ctx, g_out):
        with torch.autocast(g_out.device.type, enabled=False):
            return fn(ctx, g_out)
    return wrapper


class _BNSiLUConv(torch.autograd.Function):
    """out = conv(SiLU(BN(c))) (conv may be None: out = SiLU(BN(c))). Saves c, not the two activations."""

    @staticmethod
    def forward(ctx, c, gamma, beta, weight, bias, bn, conv):
        a, mean, invstd = _bn_train(bn, c)
        y = aten.silu_(a)                      # in place: BN's output is not kept
        ctx.bn, ctx.conv = bn, conv
        ctx.save_for_backward(c, gamma, beta, mean, invstd, weight)
        if conv is None:
            return y
        return _conv_forward(conv, y, weight, bias)

    @staticmethod
    @_no_autocast
    def backward(ctx, g_out):
        c, gamma, beta, mean, invstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_c, g_gamma, g_beta, g_w, g_b = _backward(g_out, c, gamma, beta, mean, invstd, weight, ctx.bn, ctx.conv,
                                                   need[3], need[4])
        return g_c, g_gamma, g_beta, g_w, g_b, None, None


class _ConvBNSiLUConv(torch.autograd.Function):
    """out = conv2(SiLU(BN(conv1(x)))) for the encoder's first layer. Saves x, not conv1(x): at XS the
    frames are 3 channels and conv1's output 16, so this keeps 5x less (0.1 GB instead of 0.54 GB per
    2,048 frames) for one more conv1 forward in backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, gamma, beta, w2, b2, conv1, bn, conv2):
        c = aten.convolution(x, w1, b1, *_conv_args(conv1))
        a, mean, invstd = _bn_train(bn, c)
        del c                                  # not kept: backward recomputes it from x
        y = aten.silu_(a)
        ctx.bn, ctx.conv, ctx.conv1 = bn, conv2, conv1
        ctx.save_for_backward(x, w1, b1, gamma, beta, mean, invstd, w2)
        return _conv_forward(conv2, y, w2, b2)

    @staticmethod
    @_no_autocast
    def backward(ctx, g_out):
        x, w1, b1, gamma, beta, mean, invstd, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        c = aten.convolution(x, w1, b1, *_conv_args(ctx.conv1))     # the forward's conv1(x), recomputed
        g_c, g_gamma, g_beta, g_w2, g_b2 = _backward(g_out, c, gamma, beta, mean, invstd, w2, ctx.bn, ctx.conv,
                                                     need[5], need[6])
        del c
        g_x, g_w1, g_b1 = aten.convolution_backward(
            g_c, x, w1, _bias_sizes(ctx.conv1), *_conv_args(ctx.conv1),
            [need[0], need[1], need[2] and ctx.conv1.bias is not None])
        return g_x, g_w1, g_b1, g_gamma, g_beta, g_w2, g_b2, None, None, None


def _backward(g_out, c, gamma, beta, mean, invstd, weight, bn, conv, need_w: bool, need_b: bool):
    """Gradients of conv(SiLU(BN(c))) from its saved input c: (g_c, g_gamma, g_beta, g_weight, g_bias)."""
    # recompute BN(c) from the forward's batch statistics: the inference kernel is one pass over c, where
    # the training kernel first recomputes the statistics (16 x 64 x 64 at XS: 32 vs 74-173 ms in fp32,
    # 16 vs 51 ms in bf16; 2-core AMD EPYC); var from invstd agrees to float rounding
    var = invstd.double().pow(-2).sub(bn.eps).to(invstd.dtype)
    a = aten.native_batch_norm(c, gamma, beta, mean, var, False, 0.0, bn.eps)[0]
    g_w = g_b = None
    if conv is None:
        g_y = g_out
    else:   # weight gradient first, so that SiLU's output is freed before the input gradient exists
        need_b = need_b and conv.bias is not None
        if need_b and isinstance(conv, nn.ConvTranspose2d):
            # oneDNN's deconvolution bias gradient costs as much as its weight gradient (module doc)
            g_b, need_b = g_out.sum((0, 2, 3)), False
        if need_w or need_b:
            y = aten.silu(a)
            _, g_w, g_b_conv = aten.convolution_backward(
                g_out, y, weight, _bias_sizes(conv), *_conv_args(conv), [False, need_w, need_b])
            g_b = g_b_conv if need_b else g_b
            del y
        g_y = aten.convolution_backward(g_out, a, weight, None, *_conv_args(conv), [True, False, False])[0]
    own = conv is not None                  # g_y is our buffer (not autograd's g_out): overwrite it
    g_a = aten.silu_backward.grad_input(g_y, a, grad_input=g_y) if own else aten.silu_backward(g_y, a)
    del a, g_y
    # functional, not `.out` over g_a: that variant is the functional kernel plus a copy (40 ms per
    # 16 x 64 x 64 layer at XS in fp32, 2-core AMD EPYC) and allocates the same temporary
    g_c, g_gamma, g_beta = aten.native_batch_norm_backward(
        g_a, c, gamma, None, None, mean, invstd, True, bn.eps, [True, gamma is not None, beta is not None])
    return g_c, g_gamma, g_beta, g_w, g_b


def _conv_forward(conv: nn.Module, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """conv(y): the decoder's 3-channel last layer on 2 x 2 blocks (space_to_depth.py), else the direct
    kernel. Backward always takes the direct kernels: the same linear map, their gradients are its own."""
    if space_to_depth.usable(conv, y):
        return space_to_depth.conv_forward(conv, y, weight, bias)
    return aten.convolution(y, weight, bias, *_conv_args(conv))


def _bias_sizes(conv: nn.Module):
    if conv.bias is None:
        return None
    return [conv.bias.shape[0]]


def _conv_args(conv: nn.Module) -> tuple:
    """(stride, padding, dilation, transposed, output_padding, groups) of a Conv2d / ConvTranspose2d."""
    transposed = isinstance(conv, nn.ConvTranspose2d)
    out_pad = list(conv.output_padding) if transposed else [0, 0]
    return (list(conv.stride), list(conv.padding), list(conv.dilation), transposed, out_pad, conv.groups)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes convs in here, or None when autocast is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def usable(x: torch.Tensor, module: nn.Module) -> bool:
    """The lean path serves training with autograd, in fp32 or under bf16 autocast; anything else
    (eval, no grad, fp16 autocast, fp64) takes the plain modules."""
    if not (module.training and torch.is_grad_enabled()):
        return False
    amp = _autocast_dtype(x.device.type)
    if amp is None:
        return x.dtype == torch.float32
    return amp == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def bn_silu_conv(c: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Module | None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """conv(SiLU(bn(c))) in training mode, keeping only c for the backward pass; dtype: the conv's
    compute dtype under autocast (run_stack passes it, with autocast off around the call)."""
    if isinstance(conv, nn.Conv2d) and conv.padding_mode != "zeros":
        raise ValueError("bn_silu_conv supports zero padding only")
    w = _cast(conv.weight, dtype) if conv is not None else None
    b = _cast(conv.bias, dtype) if conv is not None else None
    return _BNSiLUConv.apply(c, bn.weight, bn.bias, w, b, bn, conv)


RECOMPUTE_FIRST = True     # the encoder's first conv output is recomputed in backward (_ConvBNSiLUConv)


@contextlib.contextmanager
def model_flops():
    """Inside the block, compute what the model's FLOPs are, for counting them: keep the first conv's output
    instead of recomputing it, and run the decoder's last layer directly instead of on 2 x 2 blocks (which
    multiplies zero taps). The bound must credit neither as work done."""
    global RECOMPUTE_FIRST
    saved = RECOMPUTE_FIRST, space_to_depth.ENABLED
    RECOMPUTE_FIRST, space_to_depth.ENABLED = False, False
    try:
        yield
    finally:
        RECOMPUTE_FIRST, space_to_depth.ENABLED = saved


def run_stack(x: torch.Tensor, first: nn.Module | None, blocks: list) -> torch.Tensor:
    """x -> first(x) -> for (bn, conv) in blocks: conv(SiLU(bn(.))) with conv None for a last BN-SiLU.
    Under autocast, in its dtype (see the module docstring)."""
    dtype = _autocast_dtype(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        x = _cast(x, dtype)
        if first is not None and RECOMPUTE_FIRST and isinstance(first, nn.Conv2d) and blocks \
                and blocks[0][1] is not None and first.padding_mode == "zeros":
            (bn, conv), blocks = blocks[0], blocks[1:]
            c = _ConvBNSiLUConv.apply(x, _cast(first.weight, dtype), _cast(first.bias, dtype), bn.weight,
                                      bn.bias, _cast(conv.weight, dtype), _cast(conv.bias, dtype), first, bn, conv)
        elif first is None:
            c = x
        else:
            c = first(x) if dtype is None else _plain_conv(first, x, _cast(first.weight, dtype),
                                                           _cast(first.bias, dtype))
        for bn, conv in blocks:
            c = bn_silu_conv(c, bn, conv, dtype)
    return c


def _plain_conv(conv: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """conv(x) with the given (cast) weight and bias, through autograd's ordinary convolution."""
    return torch.convolution(x, w, b, *_conv_args(conv))
