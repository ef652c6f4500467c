"""The world-model benchmark on real Atari frames: `wmbench run --task atari --game G --backbone B`.

One cell trains the Drama world-model shell (`wmbench.world_model.WorldModel`: encoder, categorical
latents, stem, backbone, heads, the eq. 6-7 loss; the same class the agent trains) for `steps`
optimiser steps on windows of a fixed offline dataset (harness/atari_dataset.py), then measures it
on held-out episodes. Only the backbone differs between cells of a game: the batches are drawn from
the training episodes by a generator seeded with the cell's seed alone, so every backbone sees the same
windows in the same order (the record's `batches_sha256` proves it).

Measurements (each metric in the record says its unit and method):
- train_ms_per_step: median optimiser step (forward, loss, backward, update), data gathered outside
  the timer; peak_memory of the training loop.
- on `val_windows` windows of `seq_len` transitions from the validation episodes, in eval mode, with the
  latents' mode (argmax) so that the numbers do not depend on sampling:
  recon_mse (per pixel, frames in [0, 1]) and recon_psnr = 10 log10(1 / mse); reward_mae (predicted
  reward, the two-hot's expectation, against the true one); termination_bce and termination_error
  (share of steps whose flag, logit > 0, is wrong); dynamics_kl = KL(posterior || prior) of the next
  latent, nats per step.
- open-loop error against horizon: the first `ol_context` frames of each window are encoded and
  prefilled; then h = 1..`ol_horizon` steps are imagined with the window's true actions (latent = the
  prior's mode, fed back), decoded and scored against the true frames (MSE per pixel per horizon).
  Beside it the same MSE of simply repeating the last context frame, the baseline a model must beat.
- imagination wall-clock: ms per imagined step (stem, backbone step, prior sample, reward and
  termination heads: imagination's loop without the actor) at batch `imag_batch` after a prefill of
  c = 8, 64, 256, 1024 context steps; this shows each backbone's state (or KV-cache) cost.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from wmbench.core.measure import PeakMemory, median, metric, sync
from wmbench.harness.atari_dataset import DatasetKey, window_starts


@dataclass
class AtariWMConfig:
    """One world-model benchmark cell. Defaults = the `cpu` preset (minutes per cell on a 2-core CPU)."""
    game: str = "Krull"
    backbone: str = "mamba2"
    seq_len: int = 64              # transitions per training window (the paper's agent uses 128)
    seed: int = 0                  # model initialisation and batch order
    preset: str = "cpu"
    steps: int = 400               # optimiser steps
    batch_size: int = 16           # windows per step (the paper's b)
    model: str = "cpu"             # DramaConfig preset the world model starts from (see MODEL_OVERRIDES)
    d_model: int = 128
    n_layers: int = 2
    lr: float = 1e-3
    warmup: int = 50               # learning-rate warm-up steps
    protocol: str = "drama"
    data_steps: int = 20_000       # env steps in the dataset
    data_seed: int = 0
    policy: str = "random"         # "random" or an agent run dir
    val_windows: int = 64          # held-out windows scored
    eval_batch: int = 16
    ol_context: int = 16           # open loop: real frames prefilled
    ol_horizon: int = 16           # open loop: imagined steps scored
    imag_batch: int = 1024
    imag_contexts: list = field(default_factory=lambda: [8, 64, 256, 1024])
    imag_steps: int = 8            # timed imagined steps per context (after 2 untimed)
    device: str = "cpu"
    threads: int = 0               # torch CPU threads (0: torch's default)

    def to_dict(self) -> dict:
        return asdict(self)


# The world model of each preset: a DramaConfig preset plus these fields. `cpu`: full 64x64 frames
# (the agent's `cpu` size pools them to 16x16) through a thinner 4-layer encoder (8-16-32-64 filters,
# stride 2 each, 64x4x4 = 1,024 features, as XS), 16x16 latents, d_model 128 and 2 backbone layers.
# `paper`: the paper's XS world model (Tables 5-7), for GPUs.
MODEL_OVERRIDES = {
    "cpu": dict(obs_pool=1, enc_filters=(8, 16, 32, 64), enc_strides=(2, 2, 2, 2), kernel=5,
                n_latents=16, n_classes=16, head_hidden=128),
    "XS": {},
}
PRESETS: dict[str, dict] = {
    "cpu": {},
    "paper": dict(model="XS", d_model=512, n_layers=2, steps=5000, seq_len=128, lr=4e-5, warmup=1000,
                  data_steps=100_000, val_windows=256, threads=0),
}


def make_config(preset: str = "cpu", **overrides) -> AtariWMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for --task atari; valid choices: {', '.join(PRESETS)}")
    names = {f.name for f in fields(AtariWMConfig)} - {"preset"}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown option(s) {', '.join(bad)} for --task atari")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("backbone"), str):
        values["backbone"] = values["backbone"].lower()   # the registry's name: `Mamba2` is `mamba2`
    cfg = AtariWMConfig(preset=preset, **values)
    if "ol_context" not in values and "ol_horizon" not in values and \
            isinstance(cfg.seq_len, int) and cfg.ol_context + cfg.ol_horizon > cfg.seq_len >= 2:
        # a short --len: the open loop takes half the window as context and scores the other half
        cfg.ol_context = cfg.ol_horizon = cfg.seq_len // 2
    return cfg


def model_config(cfg: AtariWMConfig):
    """The DramaConfig of the cell's world model."""
    from wmbench.world_model import get_preset
    return get_preset(cfg.model, backbone=cfg.backbone, d_model=cfg.d_model, n_layers=cfg.n_layers,
                      batch_size=cfg.batch_size, batch_length=cfg.seq_len, wm_lr=cfg.lr, wm_warmup=cfg.warmup,
                      **MODEL_OVERRIDES.get(cfg.model, {}))


def check_config(cfg: AtariWMConfig) -> None:
    """One-line ValueError for a cell that cannot run (before any data is generated)."""
    from wmbench.core.device import resolve_device
    from wmbench.core.registry import BACKBONES
    from wmbench.tasks.atari import canonical_game
    canonical_game(cfg.game)                  # unknown game -> the valid ones
    BACKBONES.get(cfg.backbone)
    for name in ("steps", "batch_size", "d_model", "n_layers", "data_steps", "val_windows", "eval_batch",
                 "ol_context", "ol_horizon", "imag_batch", "imag_steps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise ValueError(f"--len must be an integer >= 2 transitions, got {cfg.seq_len!r}")
    if cfg.ol_context + cfg.ol_horizon > cfg.seq_len:
        raise ValueError(f"the open-loop context + horizon ({cfg.ol_context} + {cfg.ol_horizon}) must fit in "
                         f"--len {cfg.seq_len}")
    if not cfg.imag_contexts or any(not isinstance(c, int) or c < 1 for c in cfg.imag_contexts):
        raise ValueError(f"imag_contexts must be positive integers, got {cfg.imag_contexts!r}")
    if cfg.seed < 0 or cfg.data_seed < 0 or cfg.threads < 0:
        raise ValueError("seeds and --threads must be >= 0")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a positive number, got {cfg.lr!r}")
    resolve_device(cfg.device)
    model_config(cfg)                          # impossible model sizes


def check_lengths(cfg: AtariWMConfig, ds) -> tuple[list, list]:
    """The dataset's (train, validation) episodes, after checking that windows of --len fit in both."""
    train, val = ds.split()
    longest = lambda eps: max(e - s for s, e in eps)
    for what, eps in (("training", train), ("validation", val)):
        if longest(eps) < cfg.seq_len:
            raise ValueError(f"--len {cfg.seq_len} is longer than every {what} episode of the dataset "
                             f"(longest {longest(eps)} transitions); use a shorter --len or more --data-steps")
    return train, val


def dataset_key(cfg: AtariWMConfig, policy_id: str = "random") -> DatasetKey:
    from wmbench.tasks.atari import canonical_game
    return DatasetKey(game=canonical_game(cfg.game), protocol=cfg.protocol, policy=policy_id,
                      n_steps=cfg.data_steps, seed=cfg.data_seed)


# ---------------------------------------------------------------------------------------------
# data

def gather(ds, starts: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """Windows [start, start + length) of every array, (B, L, ...)."""
    idx = starts[:, None] + np.arange(length)[None, :]
    return {"obs": np.ascontiguousarray(ds.obs[idx]), "action": ds.action[idx], "reward": ds.reward[idx],
            "termination": ds.termination[idx]}


def training_starts(cfg: AtariWMConfig, train_eps) -> np.ndarray:
    """(steps, batch) window starts drawn uniformly from the training episodes with the cell's seed:
    the same for every backbone."""
    starts = window_starts(train_eps, cfg.seq_len)
    rng = np.random.default_rng(cfg.seed)
    return starts[rng.integers(0, len(starts), (cfg.steps, cfg.batch_size))]


def validation_starts(cfg: AtariWMConfig, val_eps) -> np.ndarray:
    """`val_windows` starts spread evenly over every possible validation window (deterministic)."""
    starts = window_starts(val_eps, cfg.seq_len)
    pick = np.unique(np.linspace(0, len(starts) - 1, cfg.val_windows).round().astype(np.int64))
    return starts[pick]


# ---------------------------------------------------------------------------------------------
# measurements

def horizon_squared_errors(pred: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """pred, true (B, H, ...) frames -> (H,) squared error summed over the batch and pixels of each horizon
    step (divide by B x pixels per frame for the per-pixel MSE at each horizon)."""
    return (pred - true).pow(2).flatten(2).sum((0, 2)).double().cpu().numpy()


@torch.no_grad()
def open_loop(wm, z_ctx: torch.Tensor, actions: torch.Tensor, horizon: int) -> torch.Tensor:
    """Decoded open-loop imagination: z_ctx (B, k, K*C) latents of k real frames, actions (B, k + horizon)
    the true actions -> (B, horizon, C, H, W) predicted frames k .. k + horizon - 1. The context is
    prefilled in one pass; each step takes the prior's mode as the next latent and feeds it back."""
    B, k = z_ctx.shape[:2]
    state = wm.backbone.init_state(B, max_len=k + horizon)
    h_ctx, state = wm.backbone.prefill(wm.embed(z_ctx, actions[:, :k]), state)
    h_t, preds = h_ctx[:, -1], []
    for j in range(horizon):
        z_t = mode_onehot(wm.prior(h_t))                                           # ẑ_{k+j} from d_{k+j-1}
        preds.append(wm.decoder(z_t))
        if j + 1 < horizon:
            h_t, state = wm.backbone.step(wm.embed(z_t, actions[:, k + j]), state)
    return torch.stack(preds, 1)


def mode_onehot(logp: torch.Tensor) -> torch.Tensor:
    """(..., K, C) log-probs -> one-hot of each variable's most likely class, flattened (..., K*C)."""
    return F.one_hot(logp.argmax(-1), logp.shape[-1]).to(logp.dtype).flatten(-2)


@torch.no_grad()
def evaluate(wm, ds, starts: np.ndarray, cfg: AtariWMConfig) -> dict:
    """Held-out one-step metrics and the open-loop error per horizon (see the module docstring)."""
    from wmbench.world_model.distributions import categorical_kl
    wm.eval()
    k, H = cfg.ol_context, cfg.ol_horizon
    sums = {"se": 0.0, "px": 0, "rew_ae": 0.0, "term_bce": 0.0, "term_err": 0.0, "kl": 0.0, "steps": 0, "kl_n": 0}
    ol_se, ol_rec_se, base_se, ol_px = np.zeros(H), np.zeros(H), np.zeros(H), 0
    for i in range(0, len(starts), cfg.eval_batch):
        b = gather(ds, starts[i:i + cfg.eval_batch], cfg.seq_len)
        B, L = b["action"].shape
        target = wm._frames(torch.as_tensor(b["obs"]))                      # (B*L, C, H, W)
        logp = wm._latents(wm.encoder(target), B, L)[0]                      # (B, L, K, C)
        z = mode_onehot(logp)
        recon = wm.decoder(z.flatten(0, 1))
        sums["se"] += float((recon - target).pow(2).sum())
        sums["px"] += target.numel()
        a = wm._check_actions(b["action"])
        h = wm.backbone(wm.embed(z, a))                                      # (B, L, d)
        rew = torch.as_tensor(b["reward"]).float()
        sums["rew_ae"] += float((wm.reward(h) - rew).abs().sum())
        logit = wm.term_head(h).squeeze(-1)
        term = torch.as_tensor(b["termination"]).float()
        sums["term_bce"] += float(F.binary_cross_entropy_with_logits(logit, term, reduction="sum"))
        sums["term_err"] += float(((logit > 0).float() != term).float().sum())
        sums["steps"] += B * L
        kl = categorical_kl(logp[:, 1:], wm.prior(h[:, :-1]))
        sums["kl"] += float(kl.sum())
        sums["kl_n"] += kl.numel()
        # open loop: prefill k real steps, then imagine H with the true actions
        frames = target.view(B, L, *target.shape[1:])
        true = frames[:, k:k + H]
        pred = open_loop(wm, z[:, :k], a[:, :k + H], H)
        ol_se += horizon_squared_errors(pred, true)
        # against the true frames' own reconstructions: the dynamics' error without the autoencoder's
        ol_rec_se += horizon_squared_errors(pred, recon.view(B, L, *recon.shape[1:])[:, k:k + H])
        base_se += horizon_squared_errors(frames[:, k - 1:k].expand_as(true), true)
        ol_px += frames[:, 0].numel()
    wm.train()
    mse = sums["se"] / sums["px"]
    n = sums["steps"]
    w = f"{len(starts)} held-out windows of {cfg.seq_len} transitions, latents' mode"
    return {
        "recon_mse": metric(mse, "per-pixel MSE", f"decoded posterior mode vs frame in [0,1], {w}"),
        "recon_psnr": metric(10 * math.log10(1.0 / max(mse, 1e-12)), "dB", "10 log10(1 / recon_mse)"),
        "reward_mae": metric(sums["rew_ae"] / n, "reward units", f"|two-hot expectation - true reward|, {w}"),
        "termination_bce": metric(sums["term_bce"] / n, "nats", f"BCE of the termination logit, {w}"),
        "termination_error": metric(sums["term_err"] / n, "fraction", f"steps with a wrong flag (logit > 0), {w}"),
        "dynamics_kl": metric(sums["kl"] / sums["kl_n"], "nats per step",
                              f"KL(posterior(z_t+1) || prior(d_t)), summed over latents, {w}"),
        "open_loop_mse": metric(float(ol_se[-1] / ol_px), "per-pixel MSE",
                                f"at horizon {H}: prefill {k} real steps, imagine with the true actions, "
                                f"prior mode fed back, decoded; per_horizon = h 1..{H}",
                                per_horizon=(ol_se / ol_px).tolist(),
                                repeat_last_frame=(base_se / ol_px).tolist(),
                                vs_reconstruction=(ol_rec_se / ol_px).tolist()),
    }


# The context is prefilled in chunks of this many steps (the backbone contract: prefill(a) + prefill(b) ==
# prefill(a + b)). One pass over 1,024 steps at batch 1,024 held 10 GiB of Mamba-2 activations (1 thread,
# d_model 128): two cells at once were OOM-killed on a 24 GiB machine. Chunks of 128: 2.1 GiB, the same time.
PREFILL_CHUNK = 128


@torch.no_grad()
def imagination_speed(wm, cfg: AtariWMConfig) -> dict:
    """ms per imagined step at batch imag_batch after a prefill of each context length."""
    wm.eval()
    dev, B, d = wm.device, cfg.imag_batch, wm.cfg.d_model
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    per_ctx, prefill = {}, {}
    for c in cfg.imag_contexts:
        try:
            state = wm.backbone.init_state(B, max_len=c + cfg.imag_steps + 2)
            prefill[str(c)] = 0.0
            for i in range(0, c, PREFILL_CHUNK):
                x = torch.randn(B, min(PREFILL_CHUNK, c - i), d, generator=gen).to(dev)
                sync(dev)
                t0 = time.perf_counter()
                _, state = wm.backbone.prefill(x, state)
                sync(dev)
                prefill[str(c)] += 1e3 * (time.perf_counter() - t0)
            del x
            z = mode_onehot(wm.prior(torch.zeros(B, d, device=dev)))
            a = torch.randint(0, wm.n_actions, (B,), generator=gen).to(dev)
            times = []
            for i in range(cfg.imag_steps + 2):
                sync(dev)
                t0 = time.perf_counter()
                h, state = wm.backbone.step(wm.embed(z, a), state)
                z = wm.sample_prior(h)
                wm.reward(h), wm.termination(h)
                sync(dev)
                if i >= 2:
                    times.append(1e3 * (time.perf_counter() - t0))
            per_ctx[str(c)] = median(times)
            del state
        except (MemoryError, torch.OutOfMemoryError):
            per_ctx[str(c)] = None
    wm.train()
    return {"imagine_ms_per_step": metric(
        per_ctx, "ms per imagined step", f"median of {cfg.imag_steps} steps (stem, backbone step, prior sample, "
        f"reward and termination heads) at batch {B} after a prefill of each context length (key, in chunks of "
        f"{PREFILL_CHUNK} steps); None: out of memory", prefill_ms=prefill)}


# ---------------------------------------------------------------------------------------------
# one cell

def train_and_evaluate(cfg: AtariWMConfig, ds, progress: bool = True) -> tuple[dict, "torch.nn.Module"]:
    """Train the cell's world model on `ds` and measure it. Returns (metrics, world model)."""
    from tqdm import tqdm

    from wmbench.world_model import WorldModel
    train_eps, val_eps = check_lengths(cfg, ds)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        dev = torch.device(cfg.device)
        wm = WorldModel(model_config(cfg), n_actions_of(ds))
        wm.to(dev)
        plan = training_starts(cfg, train_eps)
        batches_sha = hashlib.sha256(plan.tobytes()).hexdigest()
        step_ms, losses = [], []
        bar = tqdm(total=cfg.steps, desc=f"{cfg.game} {cfg.backbone} seed {cfg.seed}", disable=not progress,
                   unit="step")
        with PeakMemory(dev) as mem:
            for s in range(cfg.steps):
                batch = gather(ds, plan[s], cfg.seq_len)
                sync(dev)
                t0 = time.perf_counter()
                out = wm.train_step(batch)
                sync(dev)
                step_ms.append(1e3 * (time.perf_counter() - t0))
                losses.append(float(out["loss"]))
                bar.update(1)
                if s % 20 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.1f}")
        bar.close()
        timed = step_ms[2:] or step_ms
        metrics = {
            "train_ms_per_step": metric(median(timed), "ms", f"median of {len(timed)} optimiser steps after 2 "
                                        "untimed (forward, eq. 6-7 loss, backward, update; data gathered outside)"),
            "peak_memory": metric(mem.peak_bytes, "bytes", mem.method + " over the training loop"),
            "train_loss": metric(float(np.mean(losses[-20:])), "eq. 6-7 loss", "mean of the last 20 steps",
                                 curve=[float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)]),
            "batches_sha256": metric(batches_sha, "sha256", "of the (steps, batch) window starts: equal for every "
                                     "backbone of a seed"),
            "n_params": metric(wm.param_counts()["total"], "parameters", "world model"),
            "backbone_params": metric(wm.param_counts()["backbone"], "parameters", "the backbone alone"),
            "threads": metric(torch.get_num_threads(), "threads", "torch.get_num_threads() during the cell"),
        }
        metrics.update(evaluate(wm, ds, validation_starts(cfg, val_eps), cfg))
        metrics.update(imagination_speed(wm, cfg))
        return metrics, wm
    finally:
        torch.set_num_threads(old_threads)


def n_actions_of(ds) -> int:
    """The game's action count (a policy may not have used every action)."""
    from wmbench.tasks.atari import make_env
    env = make_env(ds.key.game, protocol=ds.key.protocol)
    try:
        return int(env.action_space.n)
    finally:
        env.close()
