"""The core of `wmbench run`: train a token-level world model on the grid world, then measure it.

Model. tokens (B, L) -> Embedding -> backbone from the registry (B, L, D) -> RMS-normed output ->
Linear head -> logits (B, L, V). Training is next-token cross-entropy on the *grid* tokens only:
the input is tokens[:, :-1], the target tokens[:, 1:], and targets that are action tokens are ignored
(actions are inputs chosen by the environment, never predicted). The first frame has no previous
frame to condition on; its cells 1..l_g^2-1 still count in the loss (they teach the wall layout and
the prior over positions; cell 0 has no predecessor at all), but frame 0 is never scored by the error
metric, which needs a previous frame and action.

Memory variants (`variant`, tasks/gridworld.py). The input is the sequence as the variant draws it (an
object hidden on most frames) and the targets are the same positions of the full state frames, so the
model learns to write the hidden object where it is: inputs[:, :-1] -> state[:, 1:]. In `full` the two
are one array, and training is exactly the plain next-token objective above.

Evaluation (held-out sequences, imagined and teacher-forced frames against the oracle floor,
imagination wall-clock) is in gridworld_eval.py.
Training ms/step is the median over `timed_steps` steps after 2 untimed ones (fwd + bwd + optimizer,
device synchronised); the data for each step is generated before its timer starts and timed apart.

Threads. The `cpu` preset runs torch on 1 thread. On a 2-core machine shared with other jobs, 2 OpenMP
threads made these small models 10-15x slower (threads wait for each other at every op), while 1
thread is at most ~2x slower on an idle machine; `threads=0` keeps torch's default.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.core.device import resolve_device
from wmbench.core.measure import PeakMemory, median, metric, sync
from wmbench.core.registry import BACKBONES, create_backbone, get_task
from wmbench.harness.gridworld_eval import DTYPES, autocast, cell_mask, evaluate, train_seed

IGNORE = -100


# ---- model -------------------------------------------------------------------------------------------

class GridWorldLM(nn.Module):
    """Embedding -> registered backbone -> LM head, with the backbone's prefill / step for imagination."""

    def __init__(self, backbone: str, vocab_size: int, d_model: int, n_layers: int, **backbone_options):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.backbone = create_backbone(backbone, d_model, n_layers, **backbone_options)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L, V); logits[:, i] predicts tokens[:, i + 1]."""
        return self.head(self.backbone(self.embed(tokens)))

    def loss(self, tokens: torch.Tensor, is_target: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose *target* token is a grid cell.

        tokens (B, L) int64 (what the model reads); is_target (V,) bool, True for the token ids that are
        predicted; targets (B, L) the tokens to predict at the same positions (default: tokens itself; a
        memory variant passes the full state frames).
        """
        logits = self(tokens[:, :-1])                                   # (B, L-1, V)
        tgt = (tokens if targets is None else targets)[:, 1:]
        tgt = torch.where(is_target[tgt], tgt, torch.full_like(tgt, IGNORE))
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), tgt.reshape(-1),
                               ignore_index=IGNORE)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.backbone.init_state(batch_size, max_len)

    def prefill(self, tokens: torch.Tensor, state):
        """tokens (B, T) -> (logits of the last position (B, V), state after them)."""
        y, state = self.backbone.prefill(self.embed(tokens), state)
        return self.head(y[:, -1]), state

    def step(self, token: torch.Tensor, state):
        """token (B,) -> (logits (B, V), state)."""
        y, state = self.backbone.step(self.embed(token), state)
        return self.head(y), state


# ---- configuration -----------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """One grid-world run. Defaults = the `cpu` preset (L=1664 in <= 5 min on a 2-core CPU)."""
    backbone: str = "mamba2"
    task: str = "gridworld"
    grid_size: int = 5             # l_g, the grid side (tasks/gridworld.py: MIN_GRID_SIZE..MAX_GRID_SIZE)
    variant: str = "full"          # what frames show: full | goal_once | agent_once (tasks/gridworld.py)
    seq_len: int = 1664            # tokens, a multiple of l_f = l_g^2 + 1 (26 at l_g = 5)
    seed: int = 0
    steps: int = 500               # optimizer steps
    batch_size: int = 0            # sequences per step; 0 = auto: max(1, tokens_per_step // seq_len)
    d_model: int = 64
    n_layers: int = 2
    lr: float = 6e-3               # peak AdamW learning rate (linear warm-up, cosine to lr/10)
    eval_sequences: int = 128      # held-out sequences
    warmup: int = 50               # learning-rate warm-up steps
    timed_steps: int = 20          # steps timed for ms/step (after 2 untimed ones)
    dtype: str = "fp32"            # fp32 | bf16 (autocast; parameters stay fp32)
    device: str = "cpu"
    backbone_options: dict = field(default_factory=dict)
    imagine_frames: int = 8        # frame positions imagined per held-out sequence
    eval_batch: int = 64           # held-out sequences per evaluation forward pass
    threads: int = 1               # torch CPU threads for the run (0 = leave torch's default)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # the auto batch's token budget (4 x 1664 = 32 x 208). With 2 x 1664, one Mamba seed in three
    # stayed 7 pp above the floor after 500 steps; 4 x 1664 reached +0.7 pp, at no cost to the GRU,
    # whose step time is latency-bound at these sizes (390 ms at batch 2 and at batch 4)
    tokens_per_step: int = 6656
    preset: str = "cpu"

    def resolved(self) -> "RunConfig":
        """A copy with the automatic batch size filled in."""
        if self.batch_size == 0:
            b = max(1, int(self.tokens_per_step) // max(1, int(self.seq_len)))
            return replace(self, batch_size=b)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# Per-preset RunConfig values; per backbone, `backbone_config` (RunConfig values, e.g. lr) and
# `backbone_options` (constructor options, merged under the user's --backbone-options). Explicit
# command-line values always win.
# `cpu`: small models (d_model 64) that fit the 5-minute CPU budget. Mamba-2 uses headdim 16 (8 heads of
#   the 128 inner channels; the default headdim 128 leaves a single head, which learned the dynamics far
#   slower in our runs); the transformer uses 4 heads of width 16 for the same reason. Mamba-3 takes
#   Mamba-2's head dim and state size (d_state 16 where its own default is 128), as in the world model.
# `paper`: the paper's model scale (Drama's sequence model: d_model 512, 2 layers, Mamba-2 headdim 64 =
#   16 heads, chunk 256). The paper does not state the grid-world batch, step count or learning rate:
#   those are our choices for a GPU run.
PRESETS: dict[str, dict] = {
    "cpu": dict(backbone_options={"mamba2": {"headdim": 16}, "transformer": {"n_heads": 4},
                                  "mamba3": {"headdim": 16, "d_state": 16}},
                # at lr 6e-3 the transformer stalled far above the floor (53% error at L=208, 3 seeds);
                # seed 0 at L=208: lr 3e-3 -> 28%, 1e-3 -> 6%
                backbone_config={"transformer": {"lr": 1e-3}}),
    "paper": dict(d_model=512, n_layers=2, batch_size=16, steps=5000, lr=1e-3, warmup=200,
                  eval_sequences=512, eval_batch=128, timed_steps=100, imagine_frames=16, threads=0,
                  backbone_options={"mamba2": {"headdim": 64, "chunk_size": 256},
                                    "mamba3": {"headdim": 64, "d_state": 16}}),
}


def make_config(preset: str = "cpu", **overrides) -> RunConfig:
    """A RunConfig from a preset plus explicit overrides (None values keep the preset's value).

    backbone_options from the user are merged over the preset's options for that backbone.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(PRESETS)}")
    names = {f.name for f in fields(RunConfig)} - {"preset"}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown RunConfig field(s) {', '.join(bad)}; valid: {', '.join(sorted(names))}")
    per_backbone = ("backbone_options", "backbone_config")
    values = {k: v for k, v in PRESETS[preset].items() if k not in per_backbone}
    backbone = str(overrides.get("backbone") or values.get("backbone", RunConfig.backbone)).lower()
    values.update(PRESETS[preset].get("backbone_config", {}).get(backbone, {}))
    values.update({k: v for k, v in overrides.items() if v is not None and k != "backbone_options"})
    values["backbone"] = backbone         # the registry's name: `Mamba2` is the same run as `mamba2`
    values["backbone_options"] = dict(PRESETS[preset].get("backbone_options", {}).get(backbone, {}),
                                      **(overrides.get("backbone_options") or {}))
    return RunConfig(preset=preset, **values).resolved()


def check_config(cfg: RunConfig):
    """Validate a config; returns (task object, number of frames). Raises ValueError with one line."""
    task = get_task(cfg.task)(grid_size=cfg.grid_size, variant=cfg.variant)
    n_frames = task.check_length(cfg.seq_len, min_frames=2)   # a frame to predict from, and one to predict
    for name in ("steps", "batch_size", "d_model", "n_layers", "eval_sequences", "timed_steps",
                 "imagine_frames", "eval_batch"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    if not isinstance(cfg.threads, int) or cfg.threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0 = torch's default), got {cfg.threads!r}")
    if not isinstance(cfg.warmup, int) or cfg.warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {cfg.warmup!r}")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a positive number, got {cfg.lr!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; valid choices: {', '.join(DTYPES)}")
    resolve_device(cfg.device)
    BACKBONES.get(cfg.backbone)   # unknown backbone -> ValueError naming the choices
    return task, n_frames


# float32 values kept per token, per model width, per layer for the backward pass: a lower bound (the
# input, the expanded inner activations and the gate of a Mamba-2 or GRU layer already exceed it)
ACTIVATION_FLOATS = 16


def check_memory(cfg: RunConfig) -> None:
    """Refuse a run whose training activations alone cannot fit in the memory available now."""
    import psutil
    need = cfg.batch_size * cfg.seq_len * cfg.d_model * cfg.n_layers * ACTIVATION_FLOATS * 4
    if cfg.device == "cpu" or torch.device(cfg.device).type == "cpu":
        have, where = psutil.virtual_memory().available, "RAM available"
    else:
        have, where = torch.cuda.mem_get_info(torch.device(cfg.device))[0], "GPU memory free"
    if need > have:
        raise ValueError(f"--len {cfg.seq_len} needs at least {need / 2**30:.0f} GiB of activations (batch "
                         f"{cfg.batch_size} x {cfg.seq_len:,} tokens x d_model {cfg.d_model} x {cfg.n_layers} "
                         f"layers), more than the {have / 2**30:.0f} GiB {where}; use a shorter --len or --batch")


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay to lr/10 at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- training ------------------------------------------------------------------------------------

def build_model(cfg: RunConfig, task) -> GridWorldLM:
    return GridWorldLM(cfg.backbone, task.vocab_size, cfg.d_model, cfg.n_layers,
                       **cfg.backbone_options).to(torch.device(cfg.device))


def _training_batch(task, cfg: RunConfig, n_frames: int, i: int, dev: torch.device):
    """Batch i on the device: (inputs, targets), targets None in `full` (the inputs are the targets)."""
    seed = train_seed(cfg.seed, i)
    if task.hidden_kind is None:
        return torch.from_numpy(task.sample(cfg.batch_size, n_frames, seed=seed)).to(dev), None
    observed, state, _ = task.sample_views(cfg.batch_size, n_frames, seed=seed)
    return torch.from_numpy(observed).to(dev), torch.from_numpy(state).to(dev)


def train_and_evaluate(cfg: RunConfig, progress: bool = True) -> dict:
    """Train a GridWorldLM for cfg.steps steps, evaluate it; returns {name: metric dict}."""
    cfg = cfg.resolved()
    task, n_frames = check_config(cfg)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train_and_evaluate(cfg, task, n_frames, progress)
    finally:
        torch.set_num_threads(threads)


def _train_and_evaluate(cfg: RunConfig, task, n_frames: int, progress: bool) -> dict:
    from tqdm import tqdm

    _seed_everything(cfg.seed)
    dev = torch.device(cfg.device)
    model = build_model(cfg, task)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    is_target = cell_mask(task, dev)
    timed_from = min(2, cfg.steps - 1)             # steps [timed_from, timed_from + timed_steps) are timed
    step_s, data_s, losses = [], [], []
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"{cfg.backbone} L={cfg.seq_len} seed={cfg.seed}", disable=not progress,
               unit="step", dynamic_ncols=True)
    t_train = time.perf_counter()
    with PeakMemory(dev) as mem:
        for i in bar:
            t0 = time.perf_counter()
            inputs, targets = _training_batch(task, cfg, n_frames, i, dev)
            sync(dev)
            t1 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(i, cfg)
            with autocast(cfg):
                loss = model.loss(inputs, is_target, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            lv = loss.item()                        # synchronises the device
            sync(dev)
            t2 = time.perf_counter()
            if not math.isfinite(lv):
                raise FloatingPointError(f"training loss became {lv} at step {i}; try a lower --lr")
            losses.append(lv)
            if timed_from <= i < timed_from + cfg.timed_steps:
                step_s.append(t2 - t1)
                data_s.append(t1 - t0)
            if i % 5 == 0 or i == cfg.steps - 1:
                bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr_at(i, cfg):.1e}")
    bar.close()
    train_s = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    ev = evaluate(model, cfg, task, n_frames)
    eval_s = time.perf_counter() - t_eval

    ms = 1e3 * median(step_s)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    tail = losses[-max(1, len(losses) // 10):]
    timed = f"median of {len(step_s)} timed steps after {timed_from} untimed"
    metrics = {
        "train_ms_per_step": metric(ms, "ms", f"{timed}; fwd+bwd+AdamW, device synchronised, data excluded",
                                    samples_ms=[1e3 * s for s in step_s]),
        "data_ms_per_step": metric(1e3 * median(data_s), "ms", f"{timed}; sample_sequences + host-to-device copy"),
        "tokens_per_s": metric(tokens_per_step / (ms / 1e3), "tokens/s", "batch_size*seq_len / train_ms_per_step"),
        "peak_memory": metric(mem.peak_bytes, "bytes", mem.method + " (whole training loop)"),
        "n_params": metric(n_params, "parameters", "embedding + backbone + head"),
        "backbone_params": metric(model.backbone.n_params, "parameters", "the backbone alone"),
        "final_loss": metric(float(np.mean(tail)), "nats/token",
                             f"mean training cross-entropy on grid tokens over the last {len(tail)} steps"),
        "train_time": metric(train_s, "s", "wall-clock of the training loop incl. data and progress bar"),
    }
    metrics.update(ev)
    metrics["eval_time"] = metric(eval_s, "s", "wall-clock of the evaluation")
    metrics["threads"] = metric(torch.get_num_threads(), "threads", "torch.get_num_threads() during the run")
    return metrics


def summary_lines(cfg: RunConfig, metrics: dict) -> list[str]:
    """A one-screen summary of a run."""
    cfg = cfg.resolved()

    def v(k):
        return metrics.get(k, {}).get("value", float("nan"))

    lines = [
        f"{cfg.backbone} on {cfg.task} ({cfg.variant}, grid {cfg.grid_size}), L={cfg.seq_len}, seed {cfg.seed}, "
        f"{cfg.steps} steps x batch {cfg.batch_size}, "
        f"d_model {cfg.d_model}, {cfg.n_layers} layers ({v('n_params'):,} parameters), {cfg.device} {cfg.dtype}",
        f"  train  {v('train_ms_per_step'):8.1f} ms/step   {v('tokens_per_s'):10,.0f} tokens/s   "
        f"peak memory {v('peak_memory') / 2**20:,.0f} MiB ({metrics['peak_memory']['method']})   "
        f"data {v('data_ms_per_step'):.1f} ms/step (excluded)",
        f"  error  {v('error_pct'):6.2f} % imagined (floor {v('oracle_error_pct'):.2f} %, "
        f"{v('error_above_floor_pp'):+.2f} pp)   predictable frames {v('error_pct_predictable'):.2f} %",
        f"         {v('teacher_forced_error_pct'):6.2f} % teacher-forced   predictable frames "
        f"{v('teacher_forced_error_pct_predictable'):.2f} %   "
        f"re-spawn frames {v('respawn_pct'):.1f} %",
        f"  imagine {v('imagine_ms_per_token'):.2f} ms/token after a {v('imagine_prefill_ms'):.0f} ms prefill   "
        f"train {v('train_time'):.0f} s, eval {v('eval_time'):.0f} s, final loss {v('final_loss'):.4f}",
    ]
    if cfg.variant != "full":          # in `full` the memoryless reference is the oracle itself
        lines.insert(3, f"         {v('memoryless_error_pct'):6.2f} % without memory (previous frame and action "
                        f"only)   predictable frames {v('memoryless_error_pct_predictable'):.2f} %")
    return lines


__all__ = ["GridWorldLM", "RunConfig", "PRESETS", "make_config", "check_config", "train_and_evaluate",
           "lr_at", "summary_lines"]
