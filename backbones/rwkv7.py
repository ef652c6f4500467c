"""RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution"), with the
parameterisation and names of BlinkDL's RWKV-LM `RWKV_Tmix_x070` / `RWKV_CMix_x070` (RWKV-v7/train_temp).

Each layer is two pre-norm residual branches (plus the optional generic MLP of the shared stack):

    x <- x + Dropout(TimeMix(RMSNorm(x), v_first))
    x <- x + Dropout(ChannelMix(RMSNorm(x)))

Time mix, for every token x_t (C = d_model channels, H heads of N = C / H channels; per head below):

    xx_t = x_{t-1} - x_t                                   token shift (x_0 = 0, or the state's last x)
    x*_t = x_t + xx_t * mu_*    for * in r, w, k, v, a, g   six learnt lerps (x_r ... x_g)
    r, k, v = W_r x^r, W_k x^k, W_v x^v                     receptance, key, value   (C each)
    w~ = -softplus(-(w0 + tanh(x^w W1) W2)) - 0.5          the reference's decay parameter, in (-inf, -0.5)
    decay = exp(-exp(w~)),  i.e. log decay w = -exp(w~) = -exp(-1/2) sigmoid(w0 + tanh(x^w W1) W2)
    v <- v + (v_first - v) * sigmoid(v0 + x^v V1 V2)        value residual (layers > 0; v_first = layer 0's v)
    alpha = sigmoid(a0 + x^a A1 A2)                         in-context learning rate, in (0, 1)
    g = sigmoid(x^g G1) G2                                  output gate
    kappa^ = normalize(k * k_k)                             unit norm per head
    k <- k * (1 + (alpha - 1) * k_a)
    S_t = S_{t-1} (diag(exp(w_t)) - kappa^_t (kappa^_t * alpha_t)^T) + v_t k_t^T     S (N, N) per head
    o_t = S_t r_t
    y_t = W_o [ (GroupNorm_H(o_t) + ((r_t * k_t * r_k) . 1) v_t) * g_t ]           per-head norm + bonus

The recurrence is `ops.rwkv7.rwkv7` with a = -kappa^, b = kappa^ * alpha (S (V, K) = (N, N) per head).
The log decay is computed directly as -exp(-1/2) sigmoid(.), which equals -exp(w~) exactly (-softplus(-z)
= log sigmoid(z)); it lies in (-0.607, 0), as in fla's layer.

Channel mix (token-shifted squared-ReLU FFN): k = relu(W_key(x + (x_{t-1} - x) * mu_k))^2, out = W_value k.

Sizes (all defaults; options of the factory):
  heads: H = the largest divisor of C that is <= max(1, C // 64) (head_size N = C / H: 64 for C a multiple
    of 64 as in the reference, one head of C channels below 128, never heads narrower than 64 for C >= 64);
    `head_size` may be given instead (any divisor of C).
  LoRA ranks: the reference's suggestions, max(32, round(s sqrt(C) / 32) * 32) with s = 2.5 (decay),
    2.5 (alpha), 1.7 (value residual), 5 (gate), capped at max(1, C // 4) so small models stay low-rank.
    C = 512: 64, 64, 32, 128.
  ffn_dim (channel-mix width): C / 2 rounded to a multiple of 32 (of 16 when C < 128, of 1 when C < 32;
    at least 1). RWKV's usual 3.5-4 C would double the parameter count; with C / 2 the backbone has
    about Mamba-2's: 7,200 / 57,472 / 108,672 / 3,195,904 parameters at (d_model, n_layers) = (32, 1),
    (64, 2), (128, 1), (512, 2), against Mamba-2's 7,811 (headdim 64) / 55,430 / 104,614 / 3,200,880
    (-8%, +4%, +4%, -0.2%).
  GroupNorm eps: 1e-5 * N (the reference's 64e-5 at N = 64; fla's head_dim * 1e-5 in general).

Initialisation as the reference (mu_* by layer depth, w0 / a0 / v0 / k_k / k_a / r_k and the r, k, v
uniform ranges, LoRA up-projections orthogonal * 0.1), except: the LoRA down-projections, zero in the
reference, are orthogonal * 0.1 too, so that every parameter gets a gradient at step 0; and W_o (`out_proj`)
and the channel mix's `value`, zero in the reference, get the residual stack's depth-scaled init
(base.ResidualBackbone, counting both branches of every layer). As in the reference's optimiser groups,
only the weight matrices of the Linear layers are weight-decayed (the other parameters are flagged
`_no_weight_decay`).

Layout. The token shift, the six lerps and the projections that read them (r, k, v and the LoRA
down-projections; the channel mix's key likewise) are one autograd Function, _ShiftMix, that never
keeps the lerps: each is rebuilt in a reused buffer for its projections, forward and backward. The
LoRA biases (w0, a0, v0) ride in the up-projections' matmuls (F.linear with bias; added in fp32
under autocast), and the gates are fp32.

Recurrent state per layer: (last x of the time mix (B, C), S (B, H, N, N) fp32 (fp64 for fp64 params),
last x of the channel mix (B, C)). v_first does not cross time steps: each token's layer 0 makes it.

Kernels. On CPU, and with kernel="torch", the chunked PyTorch op `ops.rwkv7.rwkv7` (`rwkv7_step` for
step). On CUDA with kernel "auto"/"cuda", fla's Triton kernels when `fla` imports: `chunk_rwkv7` for
fp16/bf16 inputs (the training pass under autocast; all inputs in that dtype, as fla's own layer),
`fused_recurrent_rwkv7` for short inference calls (no autograd, at most 64 tokens); the PyTorch op
otherwise (fp32 training). fla's state layout is (B, H, K, V): transposed on the way in and out.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from wmbench.backbones.base import Block, RMSNorm, ResidualBackbone, check_kernel, check_positive
from wmbench.backbones.ops.cuda import want_cuda
from wmbench.backbones.ops.rwkv7 import rwkv7 as rwkv7_scan
from wmbench.backbones.ops.rwkv7 import rwkv7_step
from wmbench.core.registry import register_backbone
from wmbench.backbones.ops.dtypes import state_dtype as _sd

CUDA_MODULE = "fla.ops.rwkv7"
FLA_RECURRENT_MAX_LEN = 64      # fla's layer uses the fused recurrent kernel below this length
LOG_DECAY_SCALE = math.exp(-0.5)   # log decay = -exp(-1/2) sigmoid(.), in (-0.607, 0)
OPTIONS = ("head_size", "ffn_dim", "chunk_size")


def default_head_size(d_model: int) -> int:
    """N = C / H with H the largest divisor of C that is <= max(1, C // 64) (module docstring)."""
    n_heads = max(h for h in range(1, max(1, d_model // 64) + 1) if d_model % h == 0)
    return d_model // n_heads


def lora_ranks(d_model: int) -> dict[str, int]:
    """The reference's LoRA ranks for C = d_model, capped at max(1, C // 4)."""
    cap = max(1, d_model // 4)

    def rank(s: float) -> int:
        return min(cap, max(32, int(round(s * math.sqrt(d_model) / 32)) * 32))

    return {"w": rank(2.5), "a": rank(2.5), "v": rank(1.7), "g": rank(5.0)}


def default_ffn_dim(d_model: int) -> int:
    """C / 2 rounded to a multiple of 32 (16 when C < 128, 1 when C < 32), at least 1."""
    m = 32 if d_model >= 128 else 16 if d_model >= 32 else 1
    return max(1, int(round(d_model / 2 / m)) * m)


def _ortho_(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's ortho_init: orthogonal with gain scale * sqrt(rows / cols) for tall matrices."""
    rows, cols = x.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    return nn.init.orthogonal_(x, gain=gain * scale)


def _no_decay(*params: nn.Parameter) -> None:
    for p in params:
        p._no_weight_decay = True


def _shifted(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, C) -> x_{t-1} (B, T, C): the previous token's x, `last` (B, C) (or zeros) before the first."""
    if last is None:
        return F.pad(x, (0, 0, 1, -1))
    return torch.cat([last[:, None].to(x.dtype), x[:, :-1]], 1)


class _ShiftMix(torch.autograd.Function):
    """y_j = (x + (x_{t-1} - x) * mu[which[j]]) @ W_j: token-shift lerps and the projections that read them.

    x (B, T, C); last (B, C) or None (zeros before the first token); mu (n, C); W_j (C, out_j).
    The lerps are never kept: each is rebuilt in one reused buffer for its projections, in the forward
    and again in the backward, so a layer holds x and x_{t-1} - x instead of six (B, T, C) lerps (on
    a CPU, every large fresh tensor is page-faulted). Matmuls follow the caller's autocast state.
    """

    @staticmethod
    def forward(ctx, x, last, mu, which, *Ws):
        xx = _shifted(x, last).sub_(x)                                 # x_{t-1} - x
        buf = torch.empty_like(x)
        ys = [None] * len(Ws)
        for i in sorted(set(which)):
            torch.addcmul(x, xx, mu[i].to(x.dtype), out=buf)
            for j in (j for j, m in enumerate(which) if m == i):
                ys[j] = buf @ Ws[j]
        ctx.save_for_backward(x, xx, mu, *Ws)
        ctx.which, ctx.has_last = which, last is not None
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return tuple(ys)

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        x, xx, mu, *Ws = ctx.saved_tensors
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            B, T, C = x.shape
            buf, dx, dxx, tmp = torch.empty_like(x), torch.zeros_like(x), torch.zeros_like(x), torch.empty_like(x)
            dmu = torch.zeros_like(mu)
            dWs = [None] * len(Ws)
            for i in sorted(set(ctx.which)):
                js = [j for j, m in enumerate(ctx.which) if m == i and dys[j] is not None]
                if not js:
                    continue
                torch.addcmul(x, xx, mu[i].to(x.dtype), out=buf)
                dbuf = None
                for j in js:
                    dy = dys[j].reshape(B * T, -1)
                    dWs[j] = (buf.view(B * T, C).mT @ dy).to(Ws[j].dtype)
                    if dbuf is None:
                        dbuf = dy @ Ws[j].mT
                    else:                                              # dtypes explicit: in-place ops skip autocast
                        dbuf.addmm_(dy.to(dbuf.dtype), Ws[j].mT.to(dbuf.dtype))
                dbuf = dbuf.view(B, T, C).to(x.dtype)
                dx.add_(dbuf)
                dxx.addcmul_(dbuf, mu[i].to(x.dtype))
                dmu[i] = torch.mul(dbuf, xx, out=tmp).sum((0, 1)).to(mu.dtype)
        # xx_t = x_{t-1} - x_t: x_t gets -dxx_t + dxx_{t+1}, `last` gets dxx_0
        dx.sub_(dxx)
        dx[:, :-1].add_(dxx[:, 1:])
        dlast = dxx[:, 0] if ctx.has_last else None
        return dx, dlast, dmu, None, *dWs


class _Readout(torch.autograd.Function):
    """y = (GroupNorm_H(o) + (sum_n r k r_k) v) * g: the time mix's output before W_o, by hand.

    o, r, k, v (M, H, N); g (M, H*N); weight, bias (H*N,) of the per-head GroupNorm; r_k (H, N).
    Computed in fp32 (fp64 for fp64 o); y (M, H*N) in that dtype. The hand-written backward replaces
    GroupNorm's (slow on a CPU) and keeps the number of large temporaries low.
    """

    @staticmethod
    def forward(ctx, o, r, k, v, g, weight, bias, r_k, eps):
        M, H, N = o.shape
        ctx.dtypes = tuple(t.dtype for t in (o, r, k, v, g))
        sd = torch.float64 if o.dtype == torch.float64 else torch.float32
        o, r, k, v, g = (t.to(sd) for t in (o, r, k, v, g))
        var, mean = torch.var_mean(o, -1, unbiased=False, keepdim=True)         # (M, H, 1)
        rstd = var.add_(eps).rsqrt_()
        xh = (o - mean).mul_(rstd)                                              # normalised o
        s = (r * k).mul_(r_k).sum(-1, keepdim=True)                             # the bonus weights (M, H, 1)
        y = torch.addcmul(bias.to(sd).view(H, N), xh, weight.to(sd).view(H, N)).addcmul_(s, v)
        ctx.save_for_backward(xh, rstd, r, k, v, g, s, weight, bias, r_k)
        return y.view(M, H * N).mul_(g)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xh, rstd, r, k, v, g, s, weight, bias, r_k = ctx.saved_tensors
        M, H, N = xh.shape
        sd = xh.dtype
        dy = dy.to(sd).reshape(M, H, N)
        wt, bs, rk_ = weight.to(sd).view(H, N), bias.to(sd).view(H, N), r_k.to(sd)
        g = g.reshape(M, H, N)
        # y = q * g with q = xh wt + bs + s v
        dg = torch.addcmul(bs, xh, wt).addcmul_(s, v).mul_(dy)
        dq = dy * g
        tmp = dq * xh
        dweight = tmp.sum(0).view(-1)
        dbias = dq.sum(0).view(-1)
        ds = torch.linalg.vecdot(dq, v, dim=-1).unsqueeze_(-1)                 # (M, H, 1)
        dv = dq * s
        # GroupNorm: do = rstd (dxh - mean(dxh) - xh mean(dxh xh)), dxh = dq wt
        dxh = dq.mul_(wt)
        m2 = torch.mul(dxh, xh, out=tmp).mean(-1, keepdim=True)
        do = dxh.sub_(dxh.mean(-1, keepdim=True)).addcmul_(xh, m2, value=-1).mul_(rstd)
        # bonus: s = sum_n r k r_k
        dr = (k * rk_).mul_(ds)
        dk = (r * rk_).mul_(ds)
        dr_k = torch.mul(r, k, out=tmp).mul_(ds).sum(0)
        return (do.to(ctx.dtypes[0]), dr.to(ctx.dtypes[1]), dk.to(ctx.dtypes[2]), dv.to(ctx.dtypes[3]),
                dg.view(M, H * N).to(ctx.dtypes[4]), dweight.to(weight.dtype), dbias.to(bias.dtype),
                dr_k.to(r_k.dtype), None)


def _lora_up(h: torch.Tensor, W: torch.Tensor, bias: torch.Tensor, sd: torch.dtype) -> torch.Tensor:
    """bias + h @ W, with the bias added in `sd` (fp32) also when autocast runs the matmul in bf16."""
    if torch.is_autocast_enabled(h.device.type):
        return (h @ W).to(sd) + bias.to(sd)
    return F.linear(h, W.mT, bias).to(sd)


def _mix_step(x_t: torch.Tensor, last: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One token: x_t + (last - x_t) * mu_i for the rows of mu (n, C); x_t, last (B, C)."""
    return torch.addcmul(x_t, last.to(x_t.dtype) - x_t, mu[:, None, :].to(x_t.dtype)).unbind(0)


class RWKV7TimeMix(nn.Module):
    """RWKV-7's time mix (`RWKV_Tmix_x070`). forward / prefill / step take and return v_first as well."""

    def __init__(self, d_model: int, layer_idx: int, n_layers: int, head_size: int | None = None,
                 chunk_size: int | None = None, kernel: str = "auto"):
        super().__init__()
        C = d_model
        N = default_head_size(C) if head_size is None else head_size
        H = C // N
        self.d_model, self.n_heads, self.head_size, self.layer_idx = C, H, N, layer_idx
        self.chunk_size = 64 if chunk_size is None else chunk_size
        self.kernel = check_kernel(kernel)
        ranks = lora_ranks(C)

        with torch.no_grad():
            ratio_0_to_1 = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
            ratio_1_to_almost0 = 1.0 - layer_idx / n_layers
            n = torch.arange(C, dtype=torch.float32)
            ddd = n / C
            linear = n / (C - 1) - 0.5
            zz = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros(C)
            zigzag = zz * zz.abs()
            www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3)

            def lerp_init(p: float) -> nn.Parameter:
                return nn.Parameter(1.0 - ddd ** (p * ratio_1_to_almost0))

            self.x_r, self.x_w, self.x_k = lerp_init(0.2), lerp_init(0.9), lerp_init(0.7)
            self.x_v, self.x_a, self.x_g = lerp_init(0.7), lerp_init(0.9), lerp_init(0.2)

            def lora(rank: int) -> tuple[nn.Parameter, nn.Parameter]:
                return (nn.Parameter(_ortho_(torch.empty(C, rank), 0.1)),
                        nn.Parameter(_ortho_(torch.empty(rank, C), 0.1)))

            self.w0 = nn.Parameter(www + 0.5 + zigzag * 2.5)                 # decay bias
            self.w1, self.w2 = lora(ranks["w"])
            self.a0 = nn.Parameter(-0.19 + zigzag * 0.3 + linear * 0.4)      # in-context learning rate bias
            self.a1, self.a2 = lora(ranks["a"])
            if layer_idx > 0:                                                # value residual (unused in layer 0)
                self.v0 = nn.Parameter(0.73 - linear * 0.4)
                self.v1, self.v2 = lora(ranks["v"])
            self.g1, self.g2 = lora(ranks["g"])                              # output gate
            self.k_k = nn.Parameter(0.71 - linear * 0.1)
            self.k_a = nn.Parameter(torch.full((C,), 1.02))
            self.r_k = nn.Parameter(torch.full((H, N), -0.04))

            self.receptance = nn.Linear(C, C, bias=False)
            self.key = nn.Linear(C, C, bias=False)
            self.value = nn.Linear(C, C, bias=False)
            self.out_proj = nn.Linear(C, C, bias=False)        # the reference's `output`
            self.ln_x = nn.GroupNorm(H, C, eps=1e-5 * N)       # 64e-5 at N = 64, as the reference
            self.receptance.weight.uniform_(-0.5 / C ** 0.5, 0.5 / C ** 0.5)
            self.key.weight.uniform_(-0.05 / C ** 0.5, 0.05 / C ** 0.5)
            self.value.weight.uniform_(-0.5 / C ** 0.5, 0.5 / C ** 0.5)
        _no_decay(*(p for name, p in self.named_parameters(recurse=False)))

    # ---------------------------------------------------------------------------------------------
    def _projections(self, x: torch.Tensor, last: torch.Tensor | None, step: bool):
        """r, k, v (..., C) and the LoRA down-projections of the six lerps, from x and the previous token's x
        (`last` before the first; step: x is one token (B, C) and `last` its predecessor)."""
        mu = torch.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])       # (6, C)
        # (lerp row, weight (C, out)): r, w-LoRA, k, v, [v-LoRA,] a-LoRA, g-LoRA
        pairs = [(0, self.receptance.weight.mT), (1, self.w1), (2, self.key.weight.mT), (3, self.value.weight.mT),
                 (4, self.a1), (5, self.g1)]
        if self.layer_idx > 0:
            pairs.insert(4, (3, self.v1))
        if step:
            mixed = _mix_step(x, last, mu)
            ys = [mixed[i] @ W for i, W in pairs]
        else:
            ys = _ShiftMix.apply(x, last, mu, tuple(i for i, _ in pairs), *(W for _, W in pairs))
        r, lw, k, v = ys[:4]
        lv, la, lg = ys[4:] if self.layer_idx > 0 else (None, *ys[4:])
        return r, k, v, lw, lv, la, lg

    def _inputs(self, x: torch.Tensor, last: torch.Tensor | None, v_first: torch.Tensor | None, step: bool = False):
        """x (.., C) -> the op's r, w, k, v, a, b (..., H, N), the gate g (..., C), v_first.

        r and g stay in x's (or autocast's) dtype; w, k, v, a, b are fp32 (fp64 for fp64 inputs).
        """
        H, N = self.n_heads, self.head_size
        sd = _sd(x)
        r, k, v, lw, lv, la, lg = self._projections(x, last, step)
        k, v = k.to(sd), v.to(sd)
        # log decay -exp(-1/2) sigmoid(w0 + tanh(x^w W1) W2); alpha = sigmoid(a0 + x^a A1 A2)
        w = torch.sigmoid(_lora_up(torch.tanh(lw), self.w2, self.w0, sd)) * -LOG_DECAY_SCALE
        if self.layer_idx == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first.to(sd), torch.sigmoid(_lora_up(lv, self.v2, self.v0, sd)))
        alpha = torch.sigmoid(_lora_up(la, self.a2, self.a0, sd))
        g = torch.sigmoid(lg) @ self.g2
        kk = F.normalize((k * self.k_k.to(sd)).unflatten(-1, (H, N)), dim=-1)   # kappa^ (..., H, N)
        k = k * torch.addcmul(1 - self.k_a.to(sd), alpha, self.k_a.to(sd))       # k (1 + (alpha - 1) k_a)
        heads = lambda t: t.unflatten(-1, (H, N))                                # noqa: E731
        alpha = heads(alpha)
        return heads(r), heads(w), heads(k), heads(v), -kk, kk * alpha, g, v_first

    def _output(self, o: torch.Tensor, r, k, v, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """o, r, k, v (..., H, N) -> W_o[(GroupNorm(o) + bonus) * g] (..., C) in `dtype`."""
        C, H, N = self.d_model, self.n_heads, self.head_size
        lead = o.shape[:-2]
        flat = lambda t: t.reshape(-1, H, N)                                     # noqa: E731
        y = _Readout.apply(flat(o), flat(r), flat(k), flat(v), g.reshape(-1, C), self.ln_x.weight,
                           self.ln_x.bias, self.r_k, self.ln_x.eps)
        return self.out_proj(y.view(*lead, C).to(dtype))

    def _scan(self, r, w, k, v, a, b, S: torch.Tensor | None):
        """The recurrence over a sequence: o (B, T, H, N), final state (B, H, N, N) (None when S is None
        and fla computed it)."""
        fla = want_cuda(self.kernel, v, CUDA_MODULE)
        if fla is not None:
            infer = not (torch.is_grad_enabled() and any(t.requires_grad for t in (r, w, k, v, a, b)))
            h0 = None if S is None else S.transpose(-1, -2).float()          # fla: (B, H, K, V)
            o = None
            if infer and r.shape[1] <= FLA_RECURRENT_MAX_LEN:
                o, hT = fla.fused_recurrent_rwkv7(r=r, w=w, k=k, v=v, a=a, b=b, scale=1.0, initial_state=h0,
                                                  output_final_state=S is not None)
            elif r.dtype in (torch.float16, torch.bfloat16):
                dt = r.dtype
                o, hT = fla.chunk_rwkv7(r=r, w=w.to(dt), k=k.to(dt), v=v.to(dt), a=a.to(dt), b=b.to(dt),
                                        scale=1.0, initial_state=h0, output_final_state=S is not None)
            if o is not None:
                return o, None if hT is None else hT.transpose(-1, -2)
        return rwkv7_scan(r, w, k, v, a, b, state=S, chunk_size=self.chunk_size)

    def _forward(self, x, v_first, last=None, S=None):
        r, w, k, v, a, b, g, v_first = self._inputs(x, last, v_first)
        o, S_new = self._scan(r, w, k, v, a, b, S)
        return self._output(o, r, k, v, g, x.dtype), v_first, S_new

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None = None):
        """x (B, T, C) -> (y (B, T, C), v_first (B, T, C)), from an empty state."""
        y, v_first, _ = self._forward(x, v_first)
        return y, v_first

    # ---------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, max_len: int | None = None):
        p = self.receptance.weight
        N = self.head_size
        return (torch.zeros(batch_size, self.d_model, device=p.device, dtype=p.dtype),
                torch.zeros(batch_size, self.n_heads, N, N, device=p.device, dtype=_sd(p)))

    def prefill(self, x: torch.Tensor, state, v_first: torch.Tensor | None = None):
        last, S = state
        y, v_first, S_new = self._forward(x, v_first, last, S)
        return y, (last.copy_(x[:, -1]), S.copy_(S_new)), v_first

    def step(self, x_t: torch.Tensor, state, v_first: torch.Tensor | None = None):
        last, S = state
        r, w, k, v, a, b, g, v_first = self._inputs(x_t, last, v_first, step=True)
        o, S_new = rwkv7_step(r, w, k, v, a, b, S)
        y = self._output(o, r, k, v, g, x_t.dtype)
        return y, (last.copy_(x_t), S.copy_(S_new)), v_first


class RWKV7ChannelMix(nn.Module):
    """RWKV-7's channel mix (`RWKV_CMix_x070`): value(relu(key(x + (x_{t-1} - x) * x_k))^2)."""

    def __init__(self, d_model: int, ffn_dim: int, layer_idx: int, n_layers: int):
        super().__init__()
        with torch.no_grad():
            ddd = torch.arange(d_model, dtype=torch.float32) / d_model
            self.x_k = nn.Parameter(1.0 - ddd ** ((1.0 - layer_idx / n_layers) ** 4))
            _no_decay(self.x_k)
            self.key = nn.Linear(d_model, ffn_dim, bias=False)
            self.value = nn.Linear(ffn_dim, d_model, bias=False)    # depth-scaled init by the backbone
            self.key.weight.uniform_(-0.5 / d_model ** 0.5, 0.5 / d_model ** 0.5)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); `last` (B, C): the x before the first token (None: zeros)."""
        k, = _ShiftMix.apply(x, last, self.x_k[None], (0,), self.key.weight.mT)
        return self.value(torch.relu(k).square())

    def init_state(self, batch_size: int) -> torch.Tensor:
        p = self.key.weight
        return torch.zeros(batch_size, p.shape[1], device=p.device, dtype=p.dtype)

    def prefill(self, x: torch.Tensor, last: torch.Tensor):
        return self(x, last), last.copy_(x[:, -1])

    def step(self, x_t: torch.Tensor, last: torch.Tensor):
        k = self.key(_mix_step(x_t, last, self.x_k[None])[0])
        return self.value(torch.relu(k).square()), last.copy_(x_t)


class RWKV7Block(Block):
    """x <- x + Dropout(TimeMix(RMSNorm(x), v_first)); x <- x + Dropout(ChannelMix(RMSNorm(x)));
    then the shared stack's optional MLP branch (d_intermediate > 0). State: (time mix's last x, S,
    channel mix's last x)."""

    def __init__(self, d_model: int, mixer: RWKV7TimeMix, cmix: RWKV7ChannelMix, d_intermediate: int,
                 dropout: float, eps: float):
        super().__init__(d_model, mixer, d_intermediate, dropout, eps)   # norm, mixer, drop, optional MLP
        self.cmix_norm = RMSNorm(d_model, eps=eps)
        self.cmix = cmix

    def forward(self, x, v_first):
        y, v_first = self.mixer(self.norm(x), v_first)
        x = x + self.drop(y)
        x = x + self.drop(self.cmix(self.cmix_norm(x)))
        return self._mlp(x), v_first

    def init_state(self, batch_size: int, max_len: int | None = None):
        return (*self.mixer.init_state(batch_size, max_len), self.cmix.init_state(batch_size))

    def prefill(self, x, state, v_first):
        last, S, c_last = state
        y, (last, S), v_first = self.mixer.prefill(self.norm(x), (last, S), v_first)
        x = x + self.drop(y)
        y, c_last = self.cmix.prefill(self.cmix_norm(x), c_last)
        return self._mlp(x + self.drop(y)), (last, S, c_last), v_first

    def step(self, x_t, state, v_first):
        last, S, c_last = state
        y, (last, S), v_first = self.mixer.step(self.norm(x_t), (last, S), v_first)
        x_t = x_t + self.drop(y)
        y, c_last = self.cmix.step(self.cmix_norm(x_t), c_last)
        return self._mlp(x_t + self.drop(y)), (last, S, c_last), v_first


class RWKV7Backbone(ResidualBackbone):
    """The shared residual stack with RWKV-7 blocks, threading layer 0's v (v_first) to the later layers.

    Same contract and state layout (a list with one state per layer) as base.ResidualBackbone.
    """

    def __init__(self, d_model: int, n_layers: int, make_mixer, make_cmix, d_intermediate: int = 0,
                 dropout: float = 0.0, norm_eps: float = 1e-5, config: dict | None = None):
        # the base validates and builds plain Blocks around the time mixes; they are rebuilt as RWKV7Blocks
        # (same time mixes, plus each layer's channel mix), then the residual projections re-initialised
        super().__init__("rwkv7", d_model, n_layers, make_mixer, d_intermediate=d_intermediate,
                         dropout=dropout, norm_eps=norm_eps, config=config)
        self.blocks = nn.ModuleList(
            RWKV7Block(d_model, blk.mixer, make_cmix(i), d_intermediate, float(dropout), norm_eps)
            for i, blk in enumerate(self.blocks))
        self._rescale_residual_projections(n_residuals_per_layer=2 if d_intermediate > 0 else 1)

    @torch.no_grad()
    def _rescale_residual_projections(self, n_residuals_per_layer: int) -> None:
        # the channel mix is one more residual branch per layer, and its `value` writes into the stream
        n = n_residuals_per_layer + 1
        super()._rescale_residual_projections(n)
        scale = 1.0 / math.sqrt(n * self.n_layers)
        for blk in self.blocks:
            if isinstance(blk, RWKV7Block):
                nn.init.kaiming_uniform_(blk.cmix.value.weight, a=math.sqrt(5))
                blk.cmix.value.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._check_input(x):
            return x.clone()
        v_first = None
        for blk in self.blocks:
            x, v_first = blk(x, v_first)
        return self.norm_f(x)

    def init_state(self, batch_size: int, max_len: int | None = None) -> list:
        check_positive(batch_size=batch_size)
        if max_len is not None:
            check_positive(max_len=max_len)
        return [blk.init_state(batch_size, max_len) for blk in self.blocks]

    def prefill(self, x: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        if not self._check_input(x):
            return x.clone(), state
        v_first, new_state = None, []
        for blk, s in zip(self.blocks, state):
            x, s, v_first = blk.prefill(x, s, v_first)
            new_state.append(s)
        return self.norm_f(x), new_state

    def step(self, x_t: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        v_first, new_state = None, []
        for blk, s in zip(self.blocks, state):
            x_t, s, v_first = blk.step(x_t, s, v_first)
            new_state.append(s)
        return self.norm_f(x_t), new_state


def _check_options(d_model: int, options: dict) -> tuple[int | None, int, int | None]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown rwkv7 option(s) {unknown}; valid: {', '.join(OPTIONS)}")
    head_size, ffn_dim, chunk_size = (options.get(k) for k in OPTIONS)
    if head_size is not None:
        check_positive(head_size=head_size)
        if d_model % head_size:
            raise ValueError(f"head_size {head_size} must divide d_model {d_model}")
    if ffn_dim is None:
        ffn_dim = default_ffn_dim(d_model)
    check_positive(ffn_dim=ffn_dim)
    if chunk_size is not None:
        check_positive(chunk_size=chunk_size)
        if chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    return head_size, ffn_dim, chunk_size


@register_backbone("rwkv7")
def rwkv7(d_model: int, n_layers: int, dropout: float = 0.0, d_intermediate: int = 0,
          kernel: str = "auto", **mixer_options) -> RWKV7Backbone:
    """RWKV-7 backbone: n_layers pre-norm residual (time mix, channel mix) blocks, final RMSNorm.

    Options: head_size (a divisor of d_model; default in the module docstring), ffn_dim (channel-mix
    width; default d_model / 2 rounded), chunk_size (a power of two, the PyTorch op's chunk; default 64).
    """
    check_kernel(kernel)
    check_positive(d_model=d_model, n_layers=n_layers)
    head_size, ffn_dim, chunk_size = _check_options(d_model, mixer_options)

    def make_mixer(i: int) -> RWKV7TimeMix:
        return RWKV7TimeMix(d_model, i, n_layers, head_size=head_size, chunk_size=chunk_size, kernel=kernel)

    def make_cmix(i: int) -> RWKV7ChannelMix:
        return RWKV7ChannelMix(d_model, ffn_dim, i, n_layers)

    return RWKV7Backbone(d_model, n_layers, make_mixer, make_cmix, d_intermediate=d_intermediate,
                         dropout=dropout, config=dict(mixer_options, kernel=kernel))
