"""The core of `wmbench run`: train a token-level world model on the grid world, then measure it.

Model. tokens (B, L) -> Embedding -> backbone from the registry (B, L, D) -> RMS-normed output ->
Linear head -> logits (B, L, V). Training is next-token cross-entropy on the *grid* tokens only:
the input is tokens[:, :-1], the target tokens[:, 1:], and targets that are action tokens are ignored
(actions are inputs chosen by the environment, never predicted). The first frame has no previous
frame to condition on; its cells 1..l_g^2-1 still count in the loss (they teach the wall layout and
the prior over positions; cell 0 has no predecessor at all), but frame 0 is never scored by the error
metric, which needs a previous frame and action.

Evaluation, on held-out sequences drawn from a different seed stream than training:
  * imagination (the headline `error_pct`): for K frame positions t spread over the sequence
    (always including the last frame), `prefill` the true context tokens[:, :t*l_f] (frames 0..t-1 and
    their actions) and `step` greedily through the l_g^2 cells of frame t, feeding back each argmax
    (restricted to the cell tokens). This is how a world model imagines, and a perfect model scores
    exactly the oracle floor: on a re-spawn frame it still writes a valid frame and guesses a cell.
  * teacher forcing (`error_pct_teacher_forced`): one parallel pass; each cell of frames 1..n-1 is the
    argmax given the *true* previous tokens. Cheap and covers every frame, but on re-spawn frames even
    a perfect model writes invalid frames (each cell is guessed on its own, e.g. "floor" everywhere
    until the last cells), so it sits above the floor there; on predictable frames both modes agree.
  * the oracle (tasks.gridworld.oracle_predict) on the same frames: the irreducible floor, and the
    share of re-spawn frames. Errors are reported over all frames and over predictable frames only.
  * imagination wall-clock: at the longest context (the last frame, L - l_f tokens of context) the
    time of `prefill` and the ms per generated token of the greedy step loop.
Training ms/step is the median over `timed_steps` steps after 2 untimed ones (fwd + bwd + optimizer,
device synchronised); the data for each step is generated before its timer starts and timed apart.

Threads. The `cpu` preset runs torch on 1 thread. On a 2-core machine shared with other jobs, 2 OpenMP
threads made these small models 10-15x slower (threads wait for each other at every op), while 1
thread is at most ~2x slower on an idle machine; `threads=0` keeps torch's default.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import wmbench
from wmbench.measure import PeakMemory, median, metric, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IGNORE = -100


# ---- model -------------------------------------------------------------------------------------------

class GridWorldLM(nn.Module):
    """Embedding -> registered backbone -> LM head, with the backbone's prefill / step for imagination."""

    def __init__(self, backbone: str, vocab_size: int, d_model: int, n_layers: int, **backbone_options):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.backbone = wmbench.create_backbone(backbone, d_model, n_layers, **backbone_options)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L, V); logits[:, i] predicts tokens[:, i + 1]."""
        return self.head(self.backbone(self.embed(tokens)))

    def loss(self, tokens: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose *target* token is a grid cell.

        tokens (B, L) int64; is_target (V,) bool, True for the token ids that are predicted.
        """
        logits = self(tokens[:, :-1])                                   # (B, L-1, V)
        tgt = tokens[:, 1:]
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
    seq_len: int = 1664            # tokens, a multiple of l_f = 26
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
#   slower in our runs); the transformer uses 4 heads of width 16 for the same reason.
# `paper`: the paper's model scale (Drama's sequence model: d_model 512, 2 layers, Mamba-2 headdim 64 =
#   16 heads, chunk 256). The paper does not state the grid-world batch, step count or learning rate:
#   those are our choices for a GPU run.
PRESETS: dict[str, dict] = {
    "cpu": dict(backbone_options={"mamba2": {"headdim": 16}, "transformer": {"n_heads": 4}},
                # at lr 6e-3 the transformer stalled far above the floor (53% error at L=208, 3 seeds);
                # seed 0 at L=208: lr 3e-3 -> 28%, 1e-3 -> 6%
                backbone_config={"transformer": {"lr": 1e-3}}),
    "paper": dict(d_model=512, n_layers=2, batch_size=16, steps=5000, lr=1e-3, warmup=200,
                  eval_sequences=512, eval_batch=128, timed_steps=100, imagine_frames=16, threads=0,
                  backbone_options={"mamba2": {"headdim": 64, "chunk_size": 256}}),
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
    values["backbone_options"] = dict(PRESETS[preset].get("backbone_options", {}).get(backbone, {}),
                                      **(overrides.get("backbone_options") or {}))
    return RunConfig(preset=preset, **values).resolved()


def check_config(cfg: RunConfig):
    """Validate a config; returns (task object, number of frames). Raises ValueError with one line."""
    task = wmbench.get_task(cfg.task)()
    n_frames = task.check_length(cfg.seq_len)
    if n_frames < 2:
        raise ValueError(f"--len must hold at least 2 frames ({2 * task.frame_len} tokens), got {cfg.seq_len}")
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
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available; valid choices: cpu")
    wmbench.registry.BACKBONES.get(cfg.backbone)   # unknown backbone -> ValueError naming the choices
    return task, n_frames


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay to lr/10 at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _autocast(cfg: RunConfig):
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=DTYPES[cfg.dtype])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Seed streams: training batch i uses [seed, 0, i]; held-out data uses [seed, 1]. They never overlap.
def _train_seed(seed: int, i: int) -> list[int]:
    return [seed, 0, i]


def _eval_seed(seed: int) -> list[int]:
    return [seed, 1]


# ---- evaluation ----------------------------------------------------------------------------------

def _cell_mask(task, device) -> torch.Tensor:
    m = torch.zeros(task.vocab_size, dtype=torch.bool, device=device)
    m[list(task.cell_tokens)] = True
    return m


def _greedy_cells(logits: torch.Tensor, not_cell: torch.Tensor) -> torch.Tensor:
    # generated tokens are cells: action ids are never targets, so they are excluded from the argmax
    return logits.float().masked_fill(not_cell, float("-inf")).argmax(-1)


@torch.no_grad()
def teacher_forced_frames(model: GridWorldLM, tokens: torch.Tensor, task, chunk: int) -> np.ndarray:
    """Argmax cell predictions given the true prefix: (B, n*l_f) -> (B, n-1, n_cells) for frames 1..n-1."""
    not_cell = ~_cell_mask(task, tokens.device)
    l_f, n_cells = task.frame_len, task.n_cells
    out = []
    for i in range(0, tokens.shape[0], chunk):
        x = tokens[i:i + chunk]
        logits = model(x)                                          # (b, L, V)
        pred = _greedy_cells(logits, not_cell)                     # pred[:, j] is the guess for x[:, j+1]
        b, L = x.shape
        frames = pred.reshape(b, L // l_f, l_f)                    # frame f: positions f*l_f ... f*l_f+25
        # cell c of frame f (token f*l_f + c, f >= 1) is predicted at position f*l_f + c - 1
        prev_pos = torch.cat([frames[:, :-1, -1:], frames[:, 1:, :n_cells - 1]], dim=-1)
        out.append(prev_pos.cpu().numpy())
    return np.concatenate(out, axis=0)


def _greedy_rollout(model: GridWorldLM, logits: torch.Tensor, state, n_cells: int, not_cell: torch.Tensor):
    """From the logits after a context, generate n_cells cells greedily, feeding back each argmax."""
    cells = []
    for _ in range(n_cells):
        tok = _greedy_cells(logits, not_cell)                      # (B,)
        cells.append(tok)
        logits, state = model.step(tok, state)                     # fed back: a rollout would continue
    return torch.stack(cells, dim=1)


@torch.no_grad()
def imagine_frame(model: GridWorldLM, context: torch.Tensor, task, max_len: int):
    """Greedy imagination of the frame that follows `context` (B, T): prefill then n_cells steps.

    Returns (cells (B, n_cells) int64, prefill seconds, generation seconds). Timings are synchronised.
    """
    dev = context.device
    not_cell = ~_cell_mask(task, dev)
    state = model.init_state(context.shape[0], max_len=max_len)
    sync(dev)
    t0 = time.perf_counter()
    logits, state = model.prefill(context, state)
    sync(dev)
    t1 = time.perf_counter()
    cells = _greedy_rollout(model, logits, state, task.n_cells, not_cell)
    sync(dev)
    t2 = time.perf_counter()
    return cells.cpu().numpy(), t1 - t0, t2 - t1


@torch.no_grad()
def imagine_frames(model: GridWorldLM, tokens: torch.Tensor, task, positions: list[int], max_len: int) -> np.ndarray:
    """Imagine frame t of every sequence for each t in `positions`, each from its true context.

    tokens (B, n*l_f). One pass over the sequence: `prefill` the true tokens up to frame t (continuing
    the state of the previous prefill), copy the state and roll the copy out greedily, so the cost is
    one prefill of the sequence plus len(positions) * n_cells steps. Returns (B, len(positions), n_cells).
    """
    not_cell = ~_cell_mask(task, tokens.device)
    state = model.init_state(tokens.shape[0], max_len=max_len)
    done, out = 0, []
    for t in sorted(positions):
        logits, state = model.prefill(tokens[:, done:t * task.frame_len], state)
        done = t * task.frame_len
        branch = copy.deepcopy(state)                              # states may be updated in place
        out.append(_greedy_rollout(model, logits, branch, task.n_cells, not_cell))
        del branch
    return torch.stack(out, dim=1).cpu().numpy()


def _frame_positions(n_frames: int, k: int) -> list[int]:
    """k frame indices in 1..n-1, evenly spread, always including the last frame."""
    return sorted({int(round(v)) for v in np.linspace(1, n_frames - 1, num=min(k, n_frames - 1))})


def _summarise(task, pred, target, prev, action, prefix: str, method: str) -> dict:
    fe = task.frame_errors(pred, target, prev, action)
    ok = fe["predictable"]
    all_ = task.error_percent(fe["geometric"], fe["logic"])
    out = {
        f"{prefix}error_pct": metric(all_["error"], "%", f"{method}; mean(E_g, E_l) over {len(ok)} frames"),
        f"{prefix}E_g_pct": metric(all_["E_g"], "%", f"{method}; frames with a geometric violation"),
        f"{prefix}E_l_pct": metric(all_["E_l"], "%", f"{method}; frames with a logic failure"),
    }
    if ok.any():
        pr = task.error_percent(fe["geometric"][ok], fe["logic"][ok])
        out[f"{prefix}error_pct_predictable"] = metric(pr["error"], "%", f"{method}; {int(ok.sum())} frames "
                                                       "that do not follow a re-spawn")
    return out


@torch.no_grad()
def evaluate(model: GridWorldLM, cfg: RunConfig, task, n_frames: int) -> dict:
    dev = torch.device(cfg.device)
    model.eval()
    tokens_np = task.sample(cfg.eval_sequences, n_frames, seed=_eval_seed(cfg.seed))
    cells, actions = task.split_frames(tokens_np)                  # (E, n, n_cells), (E, n)
    tokens = torch.from_numpy(tokens_np).to(dev)
    l_f, n_cells = task.frame_len, task.n_cells
    chunk = min(cfg.eval_sequences, cfg.eval_batch)
    out: dict = {}

    # oracle and respawn share over every scored frame (1..n-1)
    prev_all = cells[:, :-1].reshape(-1, n_cells)
    tgt_all = cells[:, 1:].reshape(-1, n_cells)
    act_all = actions[:, :-1].reshape(-1)
    oracle_all = task.oracle_predict(prev_all, act_all)
    fe = task.frame_errors(oracle_all, tgt_all, prev_all, act_all)
    out["respawn_pct"] = metric(100.0 * float((~fe["predictable"]).mean()), "%",
                                f"share of held-out frames 1..n-1 that follow a goal re-spawn ({len(act_all)} frames)")
    out["oracle_error_pct_all_frames"] = metric(task.error_percent(fe["geometric"], fe["logic"])["error"], "%",
                                                "perfect dynamics without re-spawn knowledge, frames 1..n-1")

    # teacher forcing over every frame
    with _autocast(cfg):
        tf = teacher_forced_frames(model, tokens, task, chunk).reshape(-1, n_cells)
    out.update(_summarise(task, tf, tgt_all, prev_all, act_all, "teacher_forced_",
                          "teacher-forced greedy cells, frames 1..n-1"))

    # imagination at K positions (prefill the true context, greedy steps through the frame)
    positions = _frame_positions(n_frames, cfg.imagine_frames)
    preds = []
    with _autocast(cfg):
        for i in range(0, cfg.eval_sequences, chunk):
            preds.append(imagine_frames(model, tokens[i:i + chunk], task, positions, max_len=cfg.seq_len))
    pos = np.array(positions)
    pred = np.concatenate(preds).reshape(-1, n_cells)              # (E * K, n_cells), sequence-major
    tgt = cells[:, pos].reshape(-1, n_cells)
    prev = cells[:, pos - 1].reshape(-1, n_cells)
    act = actions[:, pos - 1].reshape(-1)
    method = f"greedy imagination (prefill true context + {n_cells} steps) at frames {positions}"
    out.update(_summarise(task, pred, tgt, prev, act, "", method))
    fe = task.frame_errors(task.oracle_predict(prev, act), tgt, prev, act)
    out["oracle_error_pct"] = metric(task.error_percent(fe["geometric"], fe["logic"])["error"], "%",
                                     "perfect dynamics without re-spawn knowledge, on the imagined frames")
    out["respawn_pct_imagined"] = metric(100.0 * float((~fe["predictable"]).mean()), "%",
                                         "share of imagined frames that follow a re-spawn")
    out["error_above_floor_pp"] = metric(out["error_pct"]["value"] - out["oracle_error_pct"]["value"], "pp",
                                         "error_pct - oracle_error_pct on the same frames")

    # imagination wall-clock at the longest context: predict the last frame from L - l_f tokens
    b = min(cfg.batch_size, cfg.eval_sequences)
    ctx = tokens[:b, :(n_frames - 1) * l_f]
    pre_s, gen_s = [], []
    with _autocast(cfg):
        imagine_frame(model, ctx, task, max_len=cfg.seq_len)       # warm-up
        for _ in range(3):
            _, a, g = imagine_frame(model, ctx, task, max_len=cfg.seq_len)
            pre_s.append(a)
            gen_s.append(g)
    out["imagine_ms_per_token"] = metric(1e3 * median(gen_s) / n_cells, "ms",
                                         f"median of 3: greedy step() loop for {n_cells} tokens / {n_cells}, "
                                         f"batch {b}, after prefill of {ctx.shape[1]} tokens")
    out["imagine_prefill_ms"] = metric(1e3 * median(pre_s), "ms",
                                       f"median of 3 prefill() calls of {ctx.shape[1]} tokens, batch {b}")
    return out


# ---- training ------------------------------------------------------------------------------------

def build_model(cfg: RunConfig, task) -> GridWorldLM:
    return GridWorldLM(cfg.backbone, task.vocab_size, cfg.d_model, cfg.n_layers,
                       **cfg.backbone_options).to(torch.device(cfg.device))


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
    is_target = _cell_mask(task, dev)
    timed_from = min(2, cfg.steps - 1)             # steps [timed_from, timed_from + timed_steps) are timed
    step_s, data_s, losses = [], [], []
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"{cfg.backbone} L={cfg.seq_len} seed={cfg.seed}", disable=not progress,
               unit="step", dynamic_ncols=True)
    t_train = time.perf_counter()
    with PeakMemory(dev) as mem:
        for i in bar:
            t0 = time.perf_counter()
            batch = torch.from_numpy(task.sample(cfg.batch_size, n_frames, seed=_train_seed(cfg.seed, i))).to(dev)
            sync(dev)
            t1 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(i, cfg)
            with _autocast(cfg):
                loss = model.loss(batch, is_target)
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

    return [
        f"{cfg.backbone} on {cfg.task}, L={cfg.seq_len}, seed {cfg.seed}, {cfg.steps} steps x batch {cfg.batch_size}, "
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


__all__ = ["GridWorldLM", "RunConfig", "PRESETS", "make_config", "check_config", "train_and_evaluate",
           "evaluate", "teacher_forced_frames", "imagine_frame", "imagine_frames", "lr_at", "summary_lines"]
