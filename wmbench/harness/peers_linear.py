"""The linear-recurrence pairs of `wmbench bench --peers` (peers.py dispatches here): Gated DeltaNet,
RWKV-7, the mLSTM and Mamba-3, each of our backbones against what an installed package runs on a CPU.

    fla-gdn      flash-linear-attention's Gated DeltaNet, recurrence by fla's own PyTorch reference
                 `naive_chunk_gated_delta_rule` (fla/ops/gated_delta_rule/naive.py)     vs our gated_deltanet
    hf-gdn       transformers' Qwen3NextGatedDeltaNet layers, their PyTorch path
                 (`torch_chunk_gated_delta_rule`, `causal_conv1d` fallback)             vs our gated_deltanet
    fla-rwkv7    flash-linear-attention's RWKV-7, recurrence by fla's PyTorch reference `dplr_chunkwise`
                 (fla/ops/generalized_delta_rule/dplr/naive.py)                        vs our rwkv7
    xlstm        xlstm's xLSTMBlockStack of mLSTM blocks, as shipped: its cell is
                 `parallel_stabilized_simple` (quadratic in L)                         vs our mlstm
    xlstm-large  xLSTM-Large's mLSTMLayer (xlstm.xlstm_large) with mlstm_kernels'
                 `chunkwise--native_autograd` kernel                                    vs our mlstm
    mamba3       no installed CPU peer (mamba-ssm's Mamba-3 and fla's Mamba3 layer, which calls it, are
                 GPU-only; transformers has none; the PyTorch references are in mamba-ssm's tests, not installed)

Why fla's layers are not run as they are: fla 0.6.0 imports Triton at `import fla.layers` (its [cpu] extra
pulls Triton in), and its kernels need a GPU driver; under TRITON_INTERPRET=1 its autotuned kernels still
look for one ("0 active drivers"). So the fla pairs are fla's layer math written out in PyTorch (the same
projections, short convolutions, gates, norms and initial sizes as `fla.layers.GatedDeltaNet` /
`fla.layers.RWKV7Attention`, with fla's documented torch reference functions for the parts it runs in
Triton) around fla's naive recurrence, loaded by path (`load_fla_naive`) so that neither `fla/__init__.py`
nor Triton is imported. The layer code is ours (the same math); the recurrence is fla's.

Stacks: every peer that is a layer (all but `xlstm`, whose package has the stack) runs in the same
pre-norm residual stack as our backbones: n_layers blocks x <- x + layer(RMSNorm(x)), then a final
RMSNorm (RWKV-7: plus the channel-mix branch, as ours). Sizes follow our defaults (heads, head dims,
expansion; the module constants below); both parameter counts are recorded.

Agreement: the recurrence alone is the same function as ours in each pair, so every peer also reports
max |ours - peer| of the recurrence on a small input (fp32), as the SSD pair does.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FLA_NAIVE = {"fla-gdn": "ops/gated_delta_rule/naive.py", "fla-rwkv7": "ops/generalized_delta_rule/dplr/naive.py"}
FLA_NAIVE_FN = {"fla-gdn": "naive_chunk_gated_delta_rule", "fla-rwkv7": "dplr_chunkwise"}
GDN_CHUNK, DPLR_CHUNK, MLSTM_CHUNK = 64, 32, 64       # fla's chunk defaults (dplr_chunkwise: 32), xLSTM-Large's 64
MLSTM_HEADS = 4                                        # our mlstm (and xlstm's mLSTMLayer) default

# pair -> (ours, peer, package, batch, length, what): peers.py makes them `Pair`s. Default shapes are
# B 16, L 1664 (ours is always measured at the pair's shape), except where the peer would not fit in 24 GB:
# - fla-rwkv7: dplr_chunkwise keeps ~0.7 MB per token and layer for its backward (a Python loop over the 32
#   positions of a chunk, each step saving full (B, H, L, K) tensors): B 16 would need ~40 GB; B 4 ~10 GB
# - xlstm: its parallel cell holds ~8 fp32 (L, L) matrices per head and layer (11 GB at B 16, L 1664) on
#   top of ~7 GB of activations; B 8 needs ~10 GB
SPECS: dict[str, tuple] = {
    "fla-gdn": ("ours:gated_deltanet", "fla-gdn", "flash-linear-attention", 16, 1664,
                "Gated DeltaNet stack, fwd+bwd: fla.layers.GatedDeltaNet's layer math (fla's layers need Triton, "
                "no CPU path) around fla's PyTorch reference naive_chunk_gated_delta_rule vs our gated_deltanet"),
    "hf-gdn": ("ours:gated_deltanet", "hf-gdn", "transformers", 16, 1664,
               "Gated DeltaNet stack, fwd+bwd: transformers Qwen3NextGatedDeltaNet layers (PyTorch path: "
               "torch_chunk_gated_delta_rule) vs our gated_deltanet"),
    "fla-rwkv7": ("ours:rwkv7", "fla-rwkv7", "flash-linear-attention", 4, 1664,
                  "RWKV-7 stack, fwd+bwd: fla.layers.RWKV7Attention's layer math (fla's layers need Triton, no "
                  "CPU path) around fla's PyTorch reference dplr_chunkwise, channel mix as ours, vs our rwkv7"),
    "xlstm": ("ours:mlstm", "xlstm", "xlstm", 8, 1664,
              "mLSTM stack, fwd+bwd: xlstm xLSTMBlockStack of mLSTM blocks as shipped (cell "
              "parallel_stabilized_simple, quadratic in L) vs our mlstm"),
    "xlstm-large": ("ours:mlstm", "xlstm-large", "xlstm", 16, 1664,
                    "mLSTM stack, fwd+bwd: xLSTM-Large mLSTMLayer (xlstm.xlstm_large) with mlstm_kernels "
                    "chunkwise--native_autograd vs our mlstm"),
    "mamba3": ("ours:mamba3", "mamba3-peer", "mamba-ssm", 16, 1664,
               "Mamba-3 SISO stack: no installed CPU peer (mamba-ssm's Mamba-3 kernels are GPU-only)"),
}
IMPLS = frozenset(s[1] for s in SPECS.values()) - {"mamba3-peer"}
OURS = frozenset(s[0] for s in SPECS.values())
NO_CPU_PEER = ("no installed CPU peer: mamba-ssm's Mamba-3 runs only its Triton/TileLang GPU kernels, "
               "fla.layers.Mamba3 calls them ('Mamba-3 currently requires a CUDA device'), transformers has no "
               "Mamba-3, and the PyTorch references (mamba3_siso_fwd_ref in mamba-ssm's "
               "tests/ops/triton/test_mamba3_siso.py) are not installed with the package")

# peak bytes per (token x layer) of the cells at d_model 512, 2 layers, fp32 on CPU (the cell's RSS above its
# start), in units of d_model*4 bytes, rounded up; measured at B 2, L 416 / B 4, L 832 (in the comments)
_TOKEN_LAYER_UNITS = {
    "ours:gated_deltanet": 60, "fla-gdn": 80, "hf-gdn": 72,     # 55 / 52, 76 / 67, 64 / 64
    "ours:rwkv7": 100, "fla-rwkv7": 400,                         # 90 / 89, 359 / 359
    "ours:mlstm": 100, "xlstm-large": 120,                       # 88 / 87, 108 / 95
    "xlstm": 72,                                                 # 62 (fit with B 8, L 416 and B 1, L 3328)
    "ours:mamba3": 100,                                          # not measured here: our largest, as a guess
}
_XLSTM_SQUARE = 8      # xlstm's parallel cell: fp32 (L, L) matrices per head and layer at its peak (fit: 6.3)


def memory_need(impl: str, cfg, B: int, L: int) -> int:
    """The pre-run memory estimate of a cell (bytes): linear in B*L, plus xlstm's (L, L) matrices."""
    need = B * L * cfg.n_layers * _TOKEN_LAYER_UNITS[impl] * cfg.d_model * 4
    if impl == "xlstm":
        need += B * MLSTM_HEADS * L * L * cfg.n_layers * _XLSTM_SQUARE * 4
    return int(need)


# --------------------------------------------------------------------------------------------------
# finding the peers (cheap: nothing is imported)
# --------------------------------------------------------------------------------------------------

def _core():
    from wmbench.harness import peers
    return peers


def fla_naive_path(pair: str) -> Path:
    """fla's naive.py for `pair` in the installed fla-core, found without importing fla."""
    core = _core()
    spec = core._find("fla")
    for loc in spec.submodule_search_locations or []:
        path = Path(loc) / FLA_NAIVE[pair]
        if path.is_file():
            return path
    where = ", ".join(spec.submodule_search_locations or []) or str(spec.origin)
    raise core.PeerUnavailable(f"fla at {where} has no {FLA_NAIVE[pair]}")


def load_fla_naive(pair: str, path: str | Path | None = None):
    """fla's PyTorch reference function for `pair` (naive_chunk_gated_delta_rule / dplr_chunkwise), from
    `path` (default: the installed fla's file), executed alone: fla/__init__.py and Triton are never
    imported (the files need only torch and einops). PeerUnavailable (one line) if it cannot be had."""
    core = _core()
    path = Path(path) if path is not None else fla_naive_path(pair)
    if not path.is_file():
        raise core.PeerUnavailable(f"{path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_wmbench_peer_fla_{pair.replace('-', '_')}", path)
    if spec is None or spec.loader is None:
        raise core.PeerUnavailable(f"{path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a missing einops, a foreign file: its error, in one line
        raise core.PeerUnavailable(f"{path} could not be loaded ({type(e).__name__}: {core._first_line(e)})") from None
    fn = getattr(module, FLA_NAIVE_FN[pair], None)
    if not callable(fn):
        raise core.PeerUnavailable(f"{path} defines no {FLA_NAIVE_FN[pair]} function")
    return fn


class OursMissing(Exception):
    """Our side of a pair is not registered here; str() is the one-line reason."""


def ours_available(impl: str) -> str:
    """Our backbone name of `impl` ("ours:rwkv7" -> "rwkv7"); OursMissing if it is not registered."""
    from wmbench.core.registry import list_backbones
    name = impl.split(":", 1)[1]
    if name not in list_backbones():
        raise OursMissing(f"our backbone {name!r} is not registered in this wmbench")
    return name


def probe(pair: str) -> dict:
    """peers.probe_peer for these pairs: {"name", "version", ...}, or PeerUnavailable (the peer) /
    OursMissing (our side) with the reason."""
    core = _core()
    ours, _, package = SPECS[pair][:3]
    if pair == "mamba3":
        raise core.PeerUnavailable(NO_CPU_PEER)
    out = {"name": package, "version": core._version(package)}
    if pair in FLA_NAIVE:
        out["file"] = str(fla_naive_path(pair))
        out["fla_core"] = core._version("fla-core")
        core._find("einops")                      # the naive files' one dependency besides torch
    elif pair == "hf-gdn":
        spec = core._find("transformers")
        locs = spec.submodule_search_locations or []
        if not any((Path(p) / "models" / "qwen3_next" / "modeling_qwen3_next.py").is_file() for p in locs):
            raise core.PeerUnavailable(f"transformers {out['version']} has no Qwen3-Next model (needs >= 4.57)")
    else:
        core._find("xlstm")
        if pair == "xlstm-large":
            core._find("mlstm_kernels")
            out["mlstm_kernels"] = core._version("mlstm_kernels")
    ours_available(ours)
    return out


# --------------------------------------------------------------------------------------------------
# sizes: our defaults
# --------------------------------------------------------------------------------------------------

def gdn_sizes(d: int) -> tuple[int, int]:
    """Our gated_deltanet's (num_heads, head_k_dim): fla's 6 heads with H*d_k ~ 0.75 d_model (d_v = 2 d_k)."""
    H = 6 if 3 * d >= 24 else max(1, 3 * d // 4)
    return H, max(1, (3 * d + 2 * H) // (4 * H))


def rwkv7_sizes(d: int) -> dict:
    """Our rwkv7's sizes: heads of 64 (the largest divisor of d <= d // 64), LoRA ranks
    max(32, round(s sqrt(d) / 32) * 32) capped at d // 4, channel mix d / 2 rounded to 32 (16, 1)."""
    H = max(h for h in range(1, max(1, d // 64) + 1) if d % h == 0)
    cap = max(1, d // 4)
    rank = {k: min(cap, max(32, int(round(s * math.sqrt(d) / 32)) * 32))
            for k, s in (("decay", 2.5), ("a", 2.5), ("v", 1.7), ("gate", 5.0))}
    mult = 32 if d >= 128 else 16 if d >= 32 else 1
    return {"heads": H, "head_dim": d // H, "ranks": rank, "ffn_dim": max(1, int(round(d / 2 / mult)) * mult)}


def mlstm_inner(d: int) -> int:
    """Our mlstm's (and xlstm mLSTMLayer's) up-projection: 2 d_model rounded up to a multiple of 64."""
    return math.ceil(2 * d / 64) * 64


# --------------------------------------------------------------------------------------------------
# the stack and the layers written out for fla
# --------------------------------------------------------------------------------------------------

class Stack(nn.Module):
    """Our backbones' stack around peer layers: x <- x + mixer(RMSNorm(x)) [+ ffn(RMSNorm(x))] per layer,
    then RMSNorm. A mixer is called as mixer(h, ctx) with one dict per forward shared by the layers
    (RWKV-7's v_first)."""

    def __init__(self, d: int, mixers: list[nn.Module], ffns: list[nn.Module] | None = None, eps: float = 1e-5):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)
        self.norms = nn.ModuleList(nn.RMSNorm(d, eps=eps) for _ in mixers)
        self.ffns = nn.ModuleList(ffns or [])
        self.ffn_norms = nn.ModuleList(nn.RMSNorm(d, eps=eps) for _ in self.ffns)
        self.norm_f = nn.RMSNorm(d, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx: dict = {}
        for i, (mixer, norm) in enumerate(zip(self.mixers, self.norms)):
            x = x + mixer(norm(x), ctx)
            if self.ffns:
                x = x + self.ffns[i](self.ffn_norms[i](x))
        return self.norm_f(x)


class Call(nn.Module):
    """A package's layer with its own calling convention, as a Stack mixer."""

    def __init__(self, layer: nn.Module, call):
        super().__init__()
        self.layer, self.call = layer, call

    def forward(self, x, ctx):
        return self.call(self.layer, x)


def _depthwise_conv(channels: int, size: int) -> nn.Conv1d:
    # fla's ShortConvolution is an nn.Conv1d(groups=channels, padding=size-1): the same initialisation
    return nn.Conv1d(channels, channels, size, groups=channels, padding=size - 1, bias=False)


def _causal(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> SiLU(causal depthwise conv) (B, L, C): fla's ShortConvolution(activation='silu')."""
    return F.silu(conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2))


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # fla's l2norm (fla/modules/l2norm.py reference): x / sqrt(sum x^2 + eps)
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


class FlaGatedDeltaNet(nn.Module):
    """fla.layers.GatedDeltaNet (use_gate, short convs, no conv bias, allow_neg_eigval False), training
    path, with the chunked recurrence replaced by fla's naive_chunk_gated_delta_rule. fla's kernel flags
    use_qk_l2norm / use_gate / use_beta_sigmoid are applied here in PyTorch, as its reference does."""

    def __init__(self, d: int, num_heads: int, head_dim: int, naive, expand_v: float = 2, conv_size: int = 4,
                 norm_eps: float = 1e-5, chunk_size: int = GDN_CHUNK):
        super().__init__()
        self.naive, self.chunk_size, self.norm_eps = naive, chunk_size, norm_eps
        self.H, self.dk, self.dv = num_heads, head_dim, int(head_dim * expand_v)
        kd, vd = self.H * self.dk, self.H * self.dv
        self.q_proj, self.k_proj = nn.Linear(d, kd, bias=False), nn.Linear(d, kd, bias=False)
        self.v_proj, self.g_proj = nn.Linear(d, vd, bias=False), nn.Linear(d, vd, bias=False)
        self.a_proj, self.b_proj = nn.Linear(d, self.H, bias=False), nn.Linear(d, self.H, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.H).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(self.H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.q_conv1d, self.k_conv1d = _depthwise_conv(kd, conv_size), _depthwise_conv(kd, conv_size)
        self.v_conv1d = _depthwise_conv(vd, conv_size)
        self.o_norm_weight = nn.Parameter(torch.ones(self.dv))     # FusedRMSNormGated's weight
        self.o_proj = nn.Linear(vd, d, bias=False)

    def forward(self, x, ctx=None):
        B, L, _ = x.shape
        q = _l2norm(_causal(self.q_conv1d, self.q_proj(x)).unflatten(-1, (self.H, self.dk)))
        k = _l2norm(_causal(self.k_conv1d, self.k_proj(x)).unflatten(-1, (self.H, self.dk)))
        v = _causal(self.v_conv1d, self.v_proj(x)).unflatten(-1, (self.H, self.dv))
        beta = self.b_proj(x).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)
        o, _ = self.naive(q, k, v, g, beta, chunk_size=self.chunk_size)             # (B, L, H, dv)
        gate = self.g_proj(x).unflatten(-1, (self.H, self.dv))
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.norm_eps) * self.o_norm_weight * F.silu(gate)
        return self.o_proj(o.flatten(-2))


def _lora(d: int, out: int, rank: int, act: nn.Module | None, bias: bool = True) -> nn.Sequential:
    # fla.layers.rwkv6.LoRA: Linear(d, r, no bias) -> activation -> Linear(r, out)
    return nn.Sequential(nn.Linear(d, rank, bias=False), act or nn.Identity(), nn.Linear(rank, out, bias=bias))


def _token_shift(x: torch.Tensor) -> torch.Tensor:
    """fla's token_shift: x_{t-1} - x_t with x_0 = 0."""
    return F.pad(x, (0, 0, 1, -1)) - x


class FlaRWKV7Attention(nn.Module):
    """fla.layers.RWKV7Attention (fuse_norm False, its initialisation of the lerps, k_k, k_a, r_k and LoRA
    biases), training path, with chunk_rwkv7 (= chunk_dplr_delta_rule, scale 1) replaced by fla's naive
    dplr_chunkwise. dplr_chunkwise always scales q by K^-1/2, so r goes in times K^1/2 (scale 1, as the
    layer asks); its sequence is zero-padded to a chunk multiple (w = 0 there: causal, exact)."""

    def __init__(self, d: int, layer_idx: int, n_layers: int, sizes: dict, naive, chunk_size: int = DPLR_CHUNK):
        super().__init__()
        self.naive, self.chunk_size, self.layer_idx = naive, chunk_size, layer_idx
        H, N, r = sizes["heads"], sizes["head_dim"], sizes["ranks"]
        self.H, self.N = H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, d)))
        self.k_k, self.k_a = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.r_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.w_lora = _lora(d, d, r["decay"], nn.Tanh())
        self.v_lora = _lora(d, d, r["v"], None) if layer_idx != 0 else None
        self.a_lora = _lora(d, d, r["a"], None)
        self.g_lora = _lora(d, d, r["gate"], nn.Sigmoid(), bias=False)
        self.g_norm = nn.GroupNorm(H, d, eps=N * 1e-5)
        self._init(d, n_layers)

    @torch.no_grad()
    def _init(self, d: int, n_layers: int) -> None:
        """fla's _initialize_weights (the parts that set values; the orthogonal inits are left at
        PyTorch's defaults, which changes no shape or cost)."""
        r01 = self.layer_idx / max(1, n_layers - 1)
        r10 = 1.0 - self.layer_idx / n_layers
        n = torch.arange(d, dtype=torch.float32)
        ddd = (n / d).view(1, 1, d)
        linear = n / max(1, d - 1) - 0.5
        zig = ((n % self.N) - (self.N - 1) / 2) / max(0.5, (self.N - 1) / 2)
        zig = zig * zig.abs()
        www = -6 + 6 * (n / max(1, d - 1)) ** (1 + r01 ** 0.3)
        for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_(1.0 - ddd ** (p * r10))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.w_lora[2].bias.copy_(www + 0.5 + zig * 2.5)
        self.a_lora[2].bias.copy_(-0.19 + zig * 0.3 + linear * 0.4)
        if self.v_lora is not None:
            self.v_lora[2].bias.copy_(0.73 - linear * 0.4)
        self.g_norm.weight.fill_(((self.layer_idx + 1) / n_layers) ** 0.7)

    def forward(self, x, ctx):
        B, L, d = x.shape
        delta = _token_shift(x)
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, delta, getattr(self, n))
                                  for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        r = self.r_proj(xr)
        w = -0.6065306597126334 * self.w_lora(xw).sigmoid()
        k, v = self.k_proj(xk), self.v_proj(xv)
        if self.v_lora is None:
            ctx["v_first"] = v
        else:
            v = torch.lerp(v, ctx["v_first"], self.v_lora(xv).sigmoid())
        a = self.a_lora(xa).sigmoid()
        g = self.g_lora(xg)
        heads = lambda t: t.unflatten(-1, (self.H, self.N))                 # noqa: E731
        kk = F.normalize(heads(k * self.k_k), dim=-1, p=2.0)
        k = k.addcmul(k * (a - 1), self.k_a)                                # fla's k_update_ref
        r, w, k, a, v = map(heads, (r, w, k, a, v))
        pad = (-L) % self.chunk_size
        bhld = lambda t: F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(1, 2)      # noqa: E731  (B, H, L', N)
        o, _ = self.naive(bhld(r * self.N ** 0.5), bhld(k), bhld(v), bhld(-kk), bhld(kk * a), bhld(w),
                          chunk_size=self.chunk_size)
        o = o.transpose(1, 2)[:, :L]                                         # (B, L, H, N)
        o = self.g_norm(o.reshape(B * L, d)).view(B, L, d)
        o = (o + ((r * k * self.r_k).sum(-1, keepdim=True) * v).view(B, L, d)) * g   # gate_output_correction_ref
        return self.o_proj(o)


class ChannelMix(nn.Module):
    """RWKV-7's channel mix (fla's RWKV7FeedForward, RWKV-LM's RWKV_CMix_x070) at our width:
    value(relu(key(x + (x_{t-1} - x) * x_k))^2)."""

    def __init__(self, d: int, ffn_dim: int, layer_idx: int, n_layers: int):
        super().__init__()
        r10 = 1.0 - layer_idx / n_layers
        self.x_k = nn.Parameter(1.0 - (torch.arange(d, dtype=torch.float32) / d).view(1, 1, d) ** (r10 ** 4))
        self.key, self.value = nn.Linear(d, ffn_dim, bias=False), nn.Linear(ffn_dim, d, bias=False)

    def forward(self, x):
        return self.value(F.relu(self.key(torch.addcmul(x, _token_shift(x), self.x_k))).square())


# --------------------------------------------------------------------------------------------------
# building a cell
# --------------------------------------------------------------------------------------------------

def _catch_transformers_warnings():
    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Catch(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    return messages, lambda: logging.getLogger("transformers").removeHandler(handler)


def _agreement(ours, theirs) -> dict:
    from wmbench.core.measure import metric
    return metric(float((ours - theirs).abs().max()), "abs",
                  f"max abs(ours - peer) of the recurrence alone on a (B, T, H) = {tuple(ours.shape[:3])} input, fp32",
                  scale=float(ours.abs().max()))


def _gdn_inputs(H=2, K=16, V=32, B=2, T=100):
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    gate = -F.softplus(torch.randn(B, T, H, generator=g))
    beta = torch.rand(B, T, H, generator=g)
    return q, k, v, gate, beta


def gdn_agreement(peer_fn) -> dict:
    """Our gated_delta_rule vs `peer_fn(q, k, v, g, beta) -> o` (B, T, H, V) on the same input."""
    from wmbench.backbones.ops.delta_rule import gated_delta_rule
    with torch.no_grad():
        ins = _gdn_inputs()
        return _agreement(gated_delta_rule(*ins)[0], peer_fn(*ins))


def rwkv7_agreement(naive) -> dict:
    """Our rwkv7 op vs fla's dplr_chunkwise (as FlaRWKV7Attention calls it) on RWKV-7-like inputs."""
    from wmbench.backbones.ops.rwkv7 import rwkv7
    g = torch.Generator().manual_seed(2)
    B, T, H, N = 2, 100, 2, 16
    with torch.no_grad():
        r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
        kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
        a = torch.rand(B, T, H, N, generator=g)
        w = -0.6065306597126334 * torch.rand(B, T, H, N, generator=g)
        ours = rwkv7(r, w, k, v, -kk, kk * a)[0]
        pad = (-T) % DPLR_CHUNK
        bhld = lambda t: F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(1, 2)      # noqa: E731
        theirs = naive(bhld(r * N ** 0.5), bhld(k), bhld(v), bhld(-kk), bhld(kk * a), bhld(w),
                       chunk_size=DPLR_CHUNK)[0].transpose(1, 2)[:, :T]
        return _agreement(ours, theirs)


def mlstm_agreement(peer_fn) -> dict:
    """Our mlstm op vs `peer_fn(q, k, v, i, f)` in (B, H, T, D) / (B, H, T) layout -> h (B, H, T, V)."""
    from wmbench.backbones.ops.mlstm import mlstm
    g = torch.Generator().manual_seed(3)
    B, T, H, K = 2, 128, 2, 16
    with torch.no_grad():
        q, k, v = (torch.randn(B, T, H, K, generator=g) for _ in range(3))
        i_pre, f_pre = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g) + 3
        ours = mlstm(q, k, v, i_pre, f_pre)[0]
        t = lambda x: x.transpose(1, 2).contiguous()                         # noqa: E731
        return _agreement(ours, peer_fn(t(q), t(k), t(v), t(i_pre), t(f_pre)).transpose(1, 2))


def build(impl: str, cfg, B: int, L: int, dev):
    """peers._build for these implementations: (module, inputs needing grads, forward() -> output,
    finish() -> info dict). PeerUnavailable when the peer's import fails in the cell."""
    core = _core()
    d, n = cfg.d_model, cfg.n_layers
    x = torch.randn(B, L, d, device=dev)
    if impl in OURS:
        from wmbench.core.registry import create_backbone
        try:
            name = ours_available(impl)
        except OursMissing as e:      # the probe saw it: a cell error, not a missing peer
            raise RuntimeError(str(e)) from None
        model = create_backbone(name, d, n).to(dev)
        return model, [], lambda: model(x), dict

    if impl in ("fla-gdn", "fla-rwkv7"):
        naive = load_fla_naive(impl)
        if impl == "fla-gdn":
            H, dk = gdn_sizes(d)
            model = Stack(d, [FlaGatedDeltaNet(d, H, dk, naive) for _ in range(n)]).to(dev)
            info = {"path": "torch", "scan": f"fla naive_chunk_gated_delta_rule, chunk {GDN_CHUNK}",
                    "peer_config": {"num_heads": H, "head_k_dim": dk, "head_v_dim": 2 * dk, "conv_size": 4}}
            agree = lambda: gdn_agreement(lambda *a: naive(*a, chunk_size=GDN_CHUNK)[0])   # noqa: E731
        else:
            s = rwkv7_sizes(d)
            model = Stack(d, [FlaRWKV7Attention(d, i, n, s, naive) for i in range(n)],
                          [ChannelMix(d, s["ffn_dim"], i, n) for i in range(n)]).to(dev)
            info = {"path": "torch", "scan": f"fla dplr_chunkwise, chunk {DPLR_CHUNK}",
                    "peer_config": {"num_heads": s["heads"], "head_dim": s["head_dim"], "lora_ranks": s["ranks"],
                                    "ffn_dim": s["ffn_dim"]}}
            agree = lambda: rwkv7_agreement(naive)                  # noqa: E731
        return model, [], lambda: model(x), lambda: {**info, "agreement": agree()}

    if impl == "hf-gdn":
        messages, release = _catch_transformers_warnings()
        try:
            import transformers
            from transformers.models.qwen3_next import modeling_qwen3_next as M
        except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
            release()
            raise core.PeerUnavailable(f"import transformers' qwen3_next failed ({type(e).__name__}: "
                                       f"{core._first_line(e)})") from None
        H, dk = gdn_sizes(d)
        hf_cfg = transformers.Qwen3NextConfig(
            hidden_size=d, num_hidden_layers=n, linear_num_key_heads=H, linear_num_value_heads=H,
            linear_key_head_dim=dk, linear_value_head_dim=2 * dk, linear_conv_kernel_dim=4, hidden_act="silu",
            rms_norm_eps=1e-5, layer_types=["linear_attention"] * n, vocab_size=1, use_cache=False)
        model = Stack(d, [Call(M.Qwen3NextGatedDeltaNet(hf_cfg, i), lambda m, h: m(h)) for i in range(n)]).to(dev)

        def finish():
            release()
            fallbacks = sorted({m.split("`")[1] for m in messages if "falling back" in m.lower() and "`" in m})
            return {"path": "torch" if "chunk_gated_delta_rule" in fallbacks else "unknown",
                    "scan": "torch_chunk_gated_delta_rule, chunk 64", "fallback_warnings": fallbacks,
                    "peer_config": {k: getattr(hf_cfg, k) for k in (
                        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                        "linear_value_head_dim", "linear_conv_kernel_dim", "rms_norm_eps")},
                    "agreement": gdn_agreement(lambda *a: M.torch_chunk_gated_delta_rule(
                        a[0], a[1], a[2], g=a[3], beta=a[4])[0])}
        return model, [], lambda: model(x), finish

    if impl == "xlstm":
        try:
            from xlstm import mLSTMBlockConfig, mLSTMLayerConfig, xLSTMBlockStack, xLSTMBlockStackConfig
            from xlstm.blocks.mlstm.backends import parallel_stabilized_simple
        except Exception as e:  # noqa: BLE001
            raise core.PeerUnavailable(f"import xlstm failed ({type(e).__name__}: {core._first_line(e)})") from None
        xcfg = xLSTMBlockStackConfig(
            mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4,
                                                                num_heads=MLSTM_HEADS, proj_factor=2.0)),
            context_length=L, num_blocks=n, embedding_dim=d, slstm_at=[])
        model = xLSTMBlockStack(xcfg).to(dev)

        def parallel(q, k, v, i, f):
            return parallel_stabilized_simple(q, k, v, i[..., None], f[..., None])

        return model, [], lambda: model(x), lambda: {
            "path": "torch", "scan": "parallel_stabilized_simple (quadratic in L)",
            "peer_config": {"num_heads": MLSTM_HEADS, "inner_dim": xcfg.mlstm_block.mlstm._inner_embedding_dim,
                            "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4},
            "agreement": mlstm_agreement(parallel)}

    if impl == "xlstm-large":
        try:
            from mlstm_kernels.torch import get_mlstm_kernel
            from mlstm_kernels.torch.backend_module import mLSTMBackendConfig
            from xlstm.xlstm_large.model import mLSTMLayer, mLSTMLayerConfig
        except Exception as e:  # noqa: BLE001
            raise core.PeerUnavailable(f"import xlstm.xlstm_large / mlstm_kernels failed ({type(e).__name__}: "
                                       f"{core._first_line(e)})") from None
        di = mlstm_inner(d)
        # mode "train" needs L to be a chunk multiple (and return_last_states, or the layer's `h, state =`
        # unpacking fails): the input is zero-padded at the end to a multiple of the chunk (causal: exact)
        pad = (-L) % MLSTM_CHUNK
        backend = mLSTMBackendConfig(chunkwise_kernel="chunkwise--native_autograd", mode="train",
                                     sequence_kernel="native_sequence__native", step_kernel="native",
                                     chunk_size=MLSTM_CHUNK, return_last_states=True, autocast_kernel_dtype="float32")
        f = (di + 0.5) / d          # the layer takes int(d * factor): exactly di, whatever the float rounding
        lcfg = mLSTMLayerConfig(embedding_dim=d, num_heads=MLSTM_HEADS, qk_dim_factor=f, v_dim_factor=f,
                                mlstm_backend=backend)
        model = Stack(d, [Call(mLSTMLayer(lcfg), lambda m, h: m(h)[0]) for _ in range(n)]).to(dev)
        xp = F.pad(x, (0, 0, 0, pad)) if pad else x
        kernel = get_mlstm_kernel("chunkwise--native_autograd")

        def chunkwise(q, k, v, i, f):
            T = q.shape[2]
            p = (-T) % 16
            padded = [F.pad(t, (0, 0, 0, p)) for t in (q, k, v)] + [F.pad(i, (0, p)), F.pad(f, (0, p))]
            return kernel(*padded, chunk_size=16, return_last_states=False)[:, :, :T]

        return model, [], (lambda: model(xp)[:, :L]), lambda: {
            "path": "torch", "scan": f"mlstm_kernels chunkwise--native_autograd, chunk {MLSTM_CHUNK}"
                                     + (f" (input zero-padded to {L + pad})" if pad else ""),
            "peer_config": {"num_heads": MLSTM_HEADS, "qk_dim": di, "v_dim": di, "gate_soft_cap": lcfg.gate_soft_cap},
            "agreement": mlstm_agreement(chunkwise)}
    raise ValueError(f"unknown implementation {impl!r}")
