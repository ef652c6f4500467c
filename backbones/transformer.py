"""Transformer backbone: causal multi-head self-attention in the shared pre-norm residual stack.

Each block is  x <- x + Dropout(Attn(RMSNorm(x)));  x <- x + Dropout(MLP(RMSNorm(x)))  (MLP width
4*d_model by default), then a final RMSNorm (backbones/base.py). The attention mixer:

    q, k, v = split(W_qkv x)                 (B, L, 3D) -> 3 x (B, H, L, d_h),  d_h = D / H
    q, k    = RoPE(q, pos), RoPE(k, pos)     rotary positions (default), or none (pos="learned")
    y       = W_o softmax(q k^T / sqrt(d_h) + causal mask) v

Positions:
  pos="rope"     rotary embeddings (Su et al. 2021) applied to q and k inside every layer; works for
                 any context length (the KV-cache length bounds it at inference).
  pos="learned"  STORM / IRIS / GPT-2 style learned absolute table added ONCE to the backbone input,
                 before the first block. It lives in the `Transformer` subclass of ResidualBackbone
                 below (not in a mixer, so it is not added again in every layer) and reads the current
                 position from layer 0's KV cache, so the state needs no extra counter.

KV cache: `init_state(B, max_len)` pre-allocates per layer k, v (B, H, max_len, d_h) holding the
*projected* keys and values (RoPE already applied to k) and an integer position. `step` projects one
token, writes its k/v at index `pos` (O(1): an index write, no torch.cat, old tokens are never
re-projected) and attends over [0, pos] (O(context)). `prefill` writes a whole chunk at [pos, pos+L)
and attends causally over everything cached, so it may follow earlier prefills or steps. The cache is
updated in place: it is an inference structure (do not backpropagate through several prefill/step
calls; train with forward()).

On CUDA, kernel="auto"/"cuda" routes the training pass (forward) in fp16/bf16 to flash-attn when the
`cuda` extra is installed; everything else uses torch's scaled_dot_product_attention, which already
picks a fused kernel on GPU and runs on CPU.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.backbones.base import ResidualBackbone, check_kernel, check_positive
from wmbench.backbones.ops.cuda import want_cuda
from wmbench.core.registry import register_backbone

POS_CHOICES = ("rope", "learned")
DEFAULT_MAX_LEN = 2048


# ---------------------------------------------------------------------------------------------
# rotary position embedding
# ---------------------------------------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """positions (L,) -> cos, sin (L, d_h/2) in fp32: angle_{p,i} = p * base^(-2i/d_h)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i+d_h/2}) of x (..., L, d_h) by angle_{p,i} ("rotate-half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------

class KVCache:
    """One layer's pre-allocated cache: k, v (B, H, max_len, d_h) and the number of filled slots."""

    __slots__ = ("k", "v", "pos")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: int = 0):
        self.k, self.v, self.pos = k, v, pos

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def check_room(self, n: int) -> None:
        if self.pos + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} cached + {n} new tokens > max_len={self.max_len}; "
                             "pass a larger max_len to init_state")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, n, d_h) at [pos, pos+n) in place; return views of the filled part."""
        n = k.shape[2]
        self.check_room(n)
        self.k[:, :, self.pos:self.pos + n] = k
        self.v[:, :, self.pos:self.pos + n] = v
        self.pos += n
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]

    def __repr__(self) -> str:
        return f"KVCache(shape={tuple(self.k.shape)}, pos={self.pos})"


# ---------------------------------------------------------------------------------------------
# the mixer
# ---------------------------------------------------------------------------------------------

class TransformerMixer(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection (no biases)."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0, pos: str = "rope",
                 rope_base: float = 10000.0, max_len: int = DEFAULT_MAX_LEN, kernel: str = "auto"):
        super().__init__()
        check_positive(d_model=d_model, n_heads=n_heads, max_len=max_len)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if pos not in POS_CHOICES:
            raise ValueError(f"unknown pos {pos!r}; valid choices: {', '.join(POS_CHOICES)}")
        if pos == "rope" and (d_model // n_heads) % 2 != 0:
            raise ValueError(f"pos='rope' needs an even head dim, got d_model/n_heads = {d_model // n_heads}")
        if not 0.0 <= float(attn_dropout) < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {attn_dropout!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.attn_dropout = float(attn_dropout)
        self.pos, self.rope_base, self.max_len = pos, float(rope_base), max_len
        self.kernel = check_kernel(kernel)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    # --- helpers -------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, start: int):
        """x (B, L, D) at absolute positions [start, start+L) -> q, k, v (B, H, L, d_h), RoPE applied."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.pos == "rope":
            cos, sin = rope_cos_sin(torch.arange(start, start + L, device=x.device), self.head_dim, self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, H, L, d_h) -> out_proj(concat heads) (B, L, D)."""
        B, H, L, Dh = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, L, H * Dh))

    # --- contract ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training pass: x (B, L, D) -> (B, L, D), causal attention from an empty context."""
        q, k, v = self._project(x, 0)
        p = self.attn_dropout if self.training else 0.0
        # flash-attn only pays off for the half-precision training pass on GPU; want_cuda also raises
        # the uniform error for kernel="cuda" with CPU tensors
        half = q.dtype in (torch.float16, torch.bfloat16) and self.head_dim % 8 == 0 and self.head_dim <= 256
        flash = want_cuda(self.kernel, x, "flash_attn") if (half or not x.is_cuda) else None
        if flash is not None:
            # flash-attn takes (B, L, H, d_h)
            y = flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      dropout_p=p, causal=True)  # (B, L, H, d_h)
            return self.out_proj(y.reshape(x.shape[0], x.shape[1], self.d_model))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self._merge(y)

    def init_state(self, batch_size: int, max_len: int | None = None) -> KVCache:
        check_positive(batch_size=batch_size)
        n = self.max_len if max_len is None else max_len
        check_positive(max_len=n)
        w = self.qkv.weight
        shape = (batch_size, self.n_heads, n, self.head_dim)
        nbytes = 2 * batch_size * n * self.d_model * w.element_size()
        if max_len is None and nbytes > 2**30:
            warnings.warn(f"pre-allocating a {nbytes / 2**30:.1f} GiB KV cache per layer for the default "
                          f"max_len={n}; pass max_len=<context length> to init_state", stacklevel=3)
        return KVCache(torch.zeros(shape, device=w.device, dtype=w.dtype),
                       torch.zeros(shape, device=w.device, dtype=w.dtype))

    def prefill(self, x: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """x (B, L, D) after `state.pos` cached tokens -> (y (B, L, D), state with L more)."""
        L, start = x.shape[1], state.pos
        state.check_room(L)
        q, k, v = self._project(x, start)
        k_all, v_all = state.append(k, v)  # (B, H, start+L, d_h)
        q = q.to(k_all.dtype)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
        else:
            # query i sits at absolute position start+i and sees keys 0..start+i
            key_pos = torch.arange(start + L, device=x.device)
            qry_pos = torch.arange(start, start + L, device=x.device)
            mask = key_pos[None, :] <= qry_pos[:, None]  # (L, start+L), True = attend
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self._merge(y.to(x.dtype)), state

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """x_t (B, D) -> (y_t (B, D), state with one more token): O(1) append, O(context) attention."""
        state.check_room(1)
        q, k, v = self._project(x_t[:, None, :], state.pos)  # (B, H, 1, d_h)
        k_all, v_all = state.append(k, v)                     # views of [0, pos]
        y = F.scaled_dot_product_attention(q.to(k_all.dtype), k_all, v_all)  # one query sees all cached keys
        return self._merge(y.to(x_t.dtype))[:, 0], state


# ---------------------------------------------------------------------------------------------
# the backbone
# ---------------------------------------------------------------------------------------------

class Transformer(ResidualBackbone):
    """ResidualBackbone plus, for pos="learned", one learned absolute position table added to the input."""

    def __init__(self, d_model: int, n_layers: int, make_mixer, pos: str, max_len: int, **kw):
        super().__init__("transformer", d_model, n_layers, make_mixer, **kw)
        self.max_len = max_len
        if pos == "learned":
            self.pos_emb = nn.Embedding(max_len, d_model)
            nn.init.normal_(self.pos_emb.weight, std=0.02)
        else:
            self.pos_emb = None

    def _add_pos(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, L, D) at absolute positions [start, start+L) -> x + E[start:start+L] (learned only)."""
        if self.pos_emb is None:
            return x
        L = x.shape[1]
        if start + L > self.max_len:
            raise ValueError(f"position {start + L - 1} is beyond the learned position table "
                             f"(max_len={self.max_len}); build the backbone with a larger max_len")
        return x + self.pos_emb.weight[start:start + L].to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self._add_pos(x, 0))

    def prefill(self, x: torch.Tensor, state: list):
        return super().prefill(self._add_pos(x, state[0].pos), state)

    def step(self, x_t: torch.Tensor, state: list):
        return super().step(self._add_pos(x_t[:, None, :], state[0].pos)[:, 0], state)


def default_n_heads(d_model: int, pos: str) -> int:
    """Heads of width ~64: the largest n <= max(1, d_model // 64) that divides d_model (even width for RoPE)."""
    for n in range(max(1, d_model // 64), 0, -1):
        if d_model % n == 0 and (pos != "rope" or (d_model // n) % 2 == 0):
            return n
    raise ValueError(f"pos='rope' needs an even head dim, impossible with odd d_model={d_model}; "
                     "use an even d_model or pos='learned'")


@register_backbone("transformer")
def transformer(d_model: int, n_layers: int, dropout: float = 0.0, d_intermediate: int | None = None,
                n_heads: int | None = None, attn_dropout: float = 0.0, pos: str = "rope",
                max_len: int | None = None, rope_base: float = 10000.0, kernel: str = "auto") -> Transformer:
    """Causal pre-norm decoder: n_layers x (attention + MLP of width d_intermediate, default 4*d_model).

    max_len: default KV-cache length of init_state (default 2048) and, for pos="learned", the size of
    the position table (required there).
    """
    check_positive(d_model=d_model, n_layers=n_layers)
    check_kernel(kernel)
    if pos not in POS_CHOICES:
        raise ValueError(f"unknown pos {pos!r}; valid choices: {', '.join(POS_CHOICES)}")
    if pos == "learned" and max_len is None:
        raise ValueError("pos='learned' needs max_len (the size of the learned position table)")
    max_len = DEFAULT_MAX_LEN if max_len is None else max_len
    check_positive(max_len=max_len)
    if n_heads is None:
        n_heads = default_n_heads(d_model, pos)
    check_positive(n_heads=n_heads)
    if d_intermediate is None:
        d_intermediate = 4 * d_model

    def make_mixer(i: int) -> TransformerMixer:
        return TransformerMixer(d_model, n_heads, attn_dropout=attn_dropout, pos=pos, rope_base=rope_base,
                                max_len=max_len, kernel=kernel)

    config = {"n_heads": n_heads, "attn_dropout": float(attn_dropout), "pos": pos, "max_len": max_len,
              "rope_base": float(rope_base), "kernel": kernel}
    return Transformer(d_model, n_layers, make_mixer, pos=pos, max_len=max_len, d_intermediate=d_intermediate,
                       dropout=dropout, config=config)
