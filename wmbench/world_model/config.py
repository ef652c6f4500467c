"""Size presets for the Drama world model and agent.

`DramaConfig` holds every knob with the paper's numbers as defaults (Tables 5-8 of Wang et al., ICLR
2025); each preset is a dataclass subclass that only overrides what differs:

    XS    the paper's default ~7M world model (Tables 5-8)
    S     XS with doubled encoder/decoder filters and doubled SSM state (appendix A.4.1-A.4.2)
    tiny  CPU smoke runs: small everything, one WM + agent update well under a second on 2 cores
    cpu   sized so that the pixel grid world (`gridgoal`) is learned on a 2-core CPU in ~20 minutes

Where the paper is silent or differs from the authors' code, the field comment says which source the
default follows ("paper", "code" = the official repository at 65b2aac, "DreamerV3").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Which DramaConfig fields each built-in backbone understands (the rest are not passed to it).
BACKBONE_FIELDS = {
    "mamba": ("d_state",),
    "mamba2": ("d_state", "headdim"),
    "transformer": ("n_heads",),
    "gru": (),
    "gated_deltanet": (),
    "mlstm": (),
    "rwkv7": (),
    "mamba3": ("d_state", "headdim"),
}

MODES = {
    "free_bits_mode": ("step", "batch"),
    "weight_decay_mode": ("unscaled", "decoupled"),
    "wm_optimizer": ("laprop", "adamw"),
    "ac_optimizer": ("laprop", "adamw"),
    "imagine_start": ("paper", "code"),
    "reward_alignment": ("paper", "code"),
    "lambda_return": ("dreamerv3", "storm"),
    "critic_target": ("dreamerv3", "storm"),
    "policy_latent": ("prior", "posterior"),
    "init": ("torch", "code"),
    "rollout_precision": ("auto", "fp32", "amp"),
}


INF = float("inf")
# number fields: (low, low excluded, high, high excluded)
RANGES = {
    "gamma": (0.0, True, 1.0, False), "lam": (0.0, False, 1.0, False),
    "wm_lr": (0.0, True, INF, True), "ac_lr": (0.0, True, INF, True),
    "wm_eps": (0.0, True, INF, True), "ac_eps": (0.0, True, INF, True),
    "wm_weight_decay": (0.0, False, 1.0, True),
    "wm_grad_clip": (0.0, True, INF, True), "ac_grad_clip": (0.0, True, INF, True),
    "free_bits": (0.0, False, INF, True), "dyn_scale": (0.0, False, INF, True),
    "rep_scale": (0.0, False, INF, True), "entropy": (0.0, False, INF, True),
    "slow_critic_decay": (0.0, False, 1.0, True), "return_norm_decay": (0.0, False, 1.0, True),
    "unimix": (0.0, False, 1.0, True), "actor_unimix": (0.0, False, 1.0, True),
    "dropout": (0.0, False, 1.0, True),
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class DramaConfig:
    """All hyper-parameters of the world model, imagination and actor-critic (defaults = paper XS)."""
    name: str = "XS"
    # --- observations and autoencoder (Table 5) ---
    image_size: int = 64
    image_channels: int = 3
    obs_pool: int = 1             # average-pool frames by this factor before the encoder (CPU presets)
    enc_filters: tuple = (16, 32, 48, 64, 64)
    enc_strides: tuple = (1, 2, 2, 2, 2)
    kernel: int = 5
    # --- categorical latent: 32 variables x 32 classes, 1% unimix (section 2.2, code) ---
    n_latents: int = 32
    n_classes: int = 32
    unimix: float = 0.01
    # --- sequence model (Table 6) ---
    backbone: str = "mamba2"
    d_model: int = 512
    n_layers: int = 2
    d_state: int = 16
    headdim: int = 128            # paper; the official code ran with mamba-ssm's default 64
    n_heads: int = 8              # transformer option (code: STORM's 8 heads)
    dropout: float = 0.1
    backbone_options: dict = field(default_factory=dict)   # extra keyword arguments for the backbone
    # --- reward / termination heads (Table 7) ---
    head_hidden: int = 256
    head_layers: int = 1
    reward_bins: int = 255        # symlog two-hot over [-20, 20] (DreamerV3, code)
    # --- world-model loss (eq. 6-7) ---
    free_bits: float = 1.0
    dyn_scale: float = 1.0
    rep_scale: float = 0.1
    free_bits_mode: str = "step"  # paper (max inside the expectation); "batch" = code (max of batch mean)
    # --- world-model optimiser (Tables 5-6; optimiser type, eps, clip, warm-up from the code) ---
    wm_optimizer: str = "laprop"
    wm_lr: float = 4e-5
    wm_eps: float = 1e-20
    wm_weight_decay: float = 1e-4
    weight_decay_mode: str = "unscaled"   # code: p -= wd * p every step; "decoupled" = AdamW's lr * wd
    wm_grad_clip: float = 1000.0
    wm_warmup: int = 1000
    decay_ssm_params: bool = False  # weight-decay A_log, D, dt_bias too (code: every parameter decays)
    amp: bool = False             # bf16 autocast for training, acting and imagination (the code's)
    rollout_precision: str = "auto"   # with amp, imagination's prefill and rollout: "fp32" (the code's CUDA
                                      # graph, its GPU default), "amp" (bf16 autocast, the code without CUDA
                                      # graphs), "auto": fp32 on CUDA, amp elsewhere (WorldModel.rollout_amp)
    init: str = "torch"           # PyTorch defaults, zero reward/critic outputs (DreamerV3); "code": below
    #   "code" = the official code's initialisation: truncated normal (fan-avg) for the encoder, decoder
    #   and reward/termination heads; orthogonal gain sqrt(2) for actor/critic hidden layers, 0.001 for
    #   their output layers; zero biases
    batch_size: int = 16          # code (the paper gives no b, l)
    batch_length: int = 128
    # --- imagination (Table 8, section 2.3) ---
    imag_batch: int = 1024
    imag_context: int = 8
    imag_horizon: int = 16
    imagine_start: str = "paper"      # Alg. 1: prefill l_img-1 steps, start at step l_img; "code": prefill
                                      # all l_img, start one step beyond the context
    policy_latent: str = "prior"      # s2.3: the policy sees the prior ẑ_t with d_{t-1} (code too);
                                      # "posterior": the current frame's posterior z_t where one exists
    reward_alignment: str = "paper"   # paper: r_t from d_t after (z_t, a_t); "code": from d_{t-1}
    act_context: int = 16             # past (frame, action) pairs used to act in the environment (code)
    # --- actor-critic (Table 8; optimiser from the code) ---
    ac_layers: int = 2
    actor_hidden: int = 256
    critic_hidden: int = 512
    gamma: float = 0.985
    lam: float = 0.95
    entropy: float = 3e-4
    ac_grad_clip: float = 100.0
    ac_optimizer: str = "laprop"
    ac_lr: float = 4e-5
    ac_eps: float = 1e-20
    ac_warmup: int = 1000
    actor_unimix: float = 0.0         # code (DreamerV3 uses 0.01)
    slow_critic_decay: float = 0.98
    return_norm_decay: float = 0.99
    return_percentiles: tuple = (5.0, 95.0)
    lambda_return: str = "dreamerv3"  # bootstrap with V(s_{t+1}); "storm" = the code's V(s_t)
    critic_target: str = "dreamerv3"  # regularise toward slow critic's V; "storm": toward slow λ-return
    actor_input_norm: bool = False    # code: running mean/var normalisation of [z, d], clipped at ±10
    # per-backbone constructor options of this preset, under the user's `backbone_options`: where a
    # backbone's defaults would miss Mamba-2's parameter count by more than 10% (tests/test_param_match.py)
    BACKBONE_DEFAULTS: ClassVar[dict] = {}

    def __post_init__(self):
        for k in ("enc_filters", "enc_strides", "return_percentiles"):
            v = getattr(self, k)
            if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
                raise ValueError(f"{k} must be a list of numbers, got {v!r}")
        if not isinstance(self.backbone, str) or not isinstance(self.backbone_options, dict):
            raise ValueError("backbone must be a name and backbone_options a dict")
        self.enc_filters = tuple(int(f) for f in self.enc_filters)
        self.enc_strides = tuple(int(s) for s in self.enc_strides)
        self.return_percentiles = tuple(float(p) for p in self.return_percentiles)
        for k, choices in MODES.items():
            if getattr(self, k) not in choices:
                raise ValueError(f"{k} must be one of {', '.join(choices)}, got {getattr(self, k)!r}")
        for k in ("image_size", "image_channels", "obs_pool", "kernel", "n_latents", "n_classes", "d_model",
                  "n_layers", "head_hidden", "head_layers", "reward_bins", "batch_size", "batch_length",
                  "imag_batch", "imag_context", "imag_horizon", "act_context", "ac_layers",
                  "actor_hidden", "critic_hidden", "d_state", "headdim", "n_heads"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        for k in ("wm_warmup", "ac_warmup"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{k} must be an integer >= 0, got {v!r}")
        for k, (lo, lo_open, hi, hi_open) in RANGES.items():
            v = getattr(self, k)
            ok = _is_number(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and \
                (v < hi if hi_open else v <= hi)
            if not ok:
                interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
                raise ValueError(f"{k} must be a number in {interval}, got {v!r}")
        if len(self.enc_filters) != len(self.enc_strides) or not self.enc_filters:
            raise ValueError("enc_filters and enc_strides must be non-empty and of equal length")
        if any(s not in (1, 2) for s in self.enc_strides):
            raise ValueError(f"enc_strides must each be 1 or 2, got {self.enc_strides}")
        down = 1
        for s in self.enc_strides:
            down *= s
        if self.image_size % (down * self.obs_pool):
            raise ValueError(f"image_size {self.image_size} must be divisible by obs_pool x total stride "
                             f"= {self.obs_pool} x {down}")
        if self.kernel % 2 != 1:
            raise ValueError(f"kernel must be odd (for 'same' padding), got {self.kernel}")
        if self.imagine_start == "paper" and self.imag_context < 2:
            raise ValueError("imag_context must be >= 2 with imagine_start='paper' (context + start frame)")
        for k in ("amp", "decay_ssm_params", "actor_input_norm"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be true or false, got {getattr(self, k)!r}")
        lo, hi = self.return_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"return_percentiles must satisfy 0 <= lo < hi <= 100, got {self.return_percentiles}")

    # --- derived sizes ---
    @property
    def latent_dim(self) -> int:
        """Flattened one-hot latent z: n_latents * n_classes (1024 in the paper)."""
        return self.n_latents * self.n_classes

    @property
    def state_dim(self) -> int:
        """Policy input [z, d]: latent_dim + d_model (1536 in the paper)."""
        return self.latent_dim + self.d_model

    def backbone_kwargs(self) -> dict:
        """Keyword arguments for `create_backbone(self.backbone, d_model, n_layers, **kwargs)`."""
        kw: dict[str, Any] = {"dropout": self.dropout}
        for k in BACKBONE_FIELDS.get(self.backbone.lower(), ()):
            kw[k] = getattr(self, k)
        kw.update(self.BACKBONE_DEFAULTS.get(self.backbone.lower(), {}))
        kw.update(self.backbone_options)
        return kw

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["preset_class"] = type(self).__name__
        return d

    def replace(self, **overrides) -> "DramaConfig":
        check_fields(overrides)
        return dataclasses.replace(self, **overrides)


# Where the paper and the official code differ: (field, paper's or wmbench's default, the code's value,
# what it is). `--faithful code` sets every code value at once (with `dfs_mode=official`, already the
# default, and bf16 `amp` only where the device computes bf16 natively). README: "paper vs code".
PAPER_VS_CODE: tuple[tuple[str, Any, Any, str], ...] = (
    ("free_bits_mode", "step", "batch", "free bits: max(1, KL) per step (eq. 7) or on the batch-mean KL"),
    ("headdim", 128, 64, "Mamba-2 head dim: Table 6, or mamba-ssm's default the code ran with"),
    ("imagine_start", "paper", "code", "prefill l_img-1 real steps and start at step l_img (Alg. 1), "
                                       "or prefill all l_img and start one step beyond"),
    ("policy_latent", "prior", "prior", "the policy's latent: the prior ẑ_t (s2.3; code)"),
    ("reward_alignment", "paper", "code", "imagined r_t, e_t from d_t after (z_t, a_t) (Fig. 1), "
                                          "or one step late"),
    ("lambda_return", "dreamerv3", "storm", "λ-return bootstrap V(s_{t+1}) (DreamerV3), or V(s_t)"),
    ("critic_target", "dreamerv3", "storm", "critic regulariser toward the slow critic's value, "
                                            "or toward the slow λ-return"),
    ("ac_layers", 2, 3, "actor and critic hidden layers: Table 8, or the code's config"),
    ("actor_input_norm", False, True, "running mean/var normalisation of the actor's input, clip ±10"),
    ("decay_ssm_params", False, True, "weight decay also on A_log, D and dt_bias"),
    ("init", "torch", "code", "initialisation (paper silent): PyTorch/DreamerV3, or the code's"),
    ("amp", False, True, "bf16 autocast: training, acting, imagination (its rollout in fp32 on CUDA, the code's "
                         "CUDA graph)"),
)


def code_choices(bf16: bool) -> dict:
    """DramaConfig overrides that reproduce the official code (amp only if the device has native bf16)."""
    out = {field: code for field, _, code, _ in PAPER_VS_CODE}
    out["amp"] = bool(bf16)
    return out


def check_fields(overrides: dict) -> None:
    names = {f.name for f in dataclasses.fields(DramaConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown config field(s) {', '.join(bad)}; valid fields: {', '.join(sorted(names))}")


@dataclass
class XS(DramaConfig):
    """The paper's default world model (Tables 5-8), ~7.15M parameters with Mamba-2."""


@dataclass
class S(XS):
    """Appendix A.4.1-A.4.2: doubled filters per encoder/decoder layer and doubled SSM state."""
    name: str = "S"
    enc_filters: tuple = (32, 64, 96, 128, 128)
    d_state: int = 32


@dataclass
class Tiny(DramaConfig):
    """CPU smoke runs: every size small; learns nothing useful, exercises every code path fast."""
    name: str = "tiny"
    obs_pool: int = 4
    enc_filters: tuple = (8, 16, 16)
    enc_strides: tuple = (2, 2, 2)
    n_latents: int = 8
    n_classes: int = 8
    d_model: int = 32
    n_layers: int = 1
    d_state: int = 8
    headdim: int = 16
    n_heads: int = 2
    dropout: float = 0.0
    head_hidden: int = 32
    batch_size: int = 4
    batch_length: int = 16
    imag_batch: int = 32
    imag_context: int = 4
    imag_horizon: int = 8
    act_context: int = 4
    actor_hidden: int = 32
    critic_hidden: int = 32
    BACKBONE_DEFAULTS: ClassVar[dict] = {"mlstm": {"num_heads": 1}}   # 4 heads' gates: +22% at d_model 32
    wm_lr: float = 3e-4
    ac_lr: float = 3e-4
    wm_warmup: int = 10
    ac_warmup: int = 10


@dataclass
class CPU(DramaConfig):
    """The CPU model: `--size auto` picks it on a machine without CUDA (100k Atari env steps in about a
    night), and it learns the pixel grid world `gridgoal` on a 2-core CPU within minutes.

    Frames are average-pooled 4x (16x16) before a 3-layer encoder (the decoder mirrors it and
    reconstructs the pooled frame); smaller latent, backbone and heads, shorter sequences, higher
    learning rates (a few thousand updates instead of ~99k), no dropout. Losses, latent structure and
    imagination are unchanged.
    """
    name: str = "cpu"
    obs_pool: int = 4                  # 64x64 -> 16x16: the grid's 16-pixel cells become 4-pixel ones
    enc_filters: tuple = (16, 32, 64)
    enc_strides: tuple = (2, 2, 2)     # 16 -> 8 -> 4 -> 2: 2x2x64 = 256 features
    n_latents: int = 16
    n_classes: int = 16
    d_model: int = 128
    n_layers: int = 1
    d_state: int = 16
    headdim: int = 32
    n_heads: int = 4
    dropout: float = 0.0
    head_hidden: int = 128
    batch_size: int = 16
    batch_length: int = 32
    imag_batch: int = 128
    imag_context: int = 4
    imag_horizon: int = 16
    act_context: int = 4
    actor_hidden: int = 128
    critic_hidden: int = 128
    wm_lr: float = 1e-3
    ac_lr: float = 3e-4
    wm_warmup: int = 100
    ac_warmup: int = 100


PRESETS = {"XS": XS, "S": S, "tiny": Tiny, "cpu": CPU}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides) -> DramaConfig:
    """Build preset `name` (case-insensitive), with field overrides, e.g. get_preset("XS", backbone="gru")."""
    key = {k.lower(): k for k in PRESETS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}")
    check_fields(overrides)
    return PRESETS[key](**overrides)
