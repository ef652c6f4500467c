"""`wmbench run --task atari`: configs per seed, the dataset (random or an agent's policy), one record per
cell, cells already recorded skipped, and the trained world model kept for `wmbench imagine`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from wmbench.harness.wm_atari import AtariWMConfig, check_config, dataset_key, make_config, train_and_evaluate

MODELS_DIR = Path("runs") / "wm-atari"     # trained world models (beside the agent's runs/atari)


class CheckpointPolicy:
    """An agent's policy, restored from its run dir, acting as in training (sampled actions)."""

    def __init__(self, run_dir: str, game: str, protocol: str):
        from wmbench.agent.acting import ActingContext
        from wmbench.agent.checkpoint import restore_models
        cfg, self.wm, self.agent, state = restore_models(run_dir, "--policy")
        if cfg.game.lower() != game.lower():
            raise ValueError(f"--policy {run_dir} was trained on {cfg.game!r}, not {game}")
        if cfg.protocol != protocol:
            raise ValueError(f"--policy {run_dir} used protocol {cfg.protocol!r}, not {protocol!r}")
        self.ctx = ActingContext.for_model(self.wm.cfg)
        # the checkpoint's manifest already holds its weights' sha256 (verified while loading)
        manifest = json.loads((state.path / "manifest.json").read_text())
        self.id = f"checkpoint:{manifest['state.pt']['sha256']}"
        self.step = int(state.meta.get("step", 0))

    def reset(self, obs) -> None:
        self.ctx.reset(obs)

    def observe(self, action: int, next_obs) -> None:
        self.ctx.push(action, next_obs)

    def __call__(self, obs, rng: np.random.Generator) -> int:
        from wmbench.agent.acting import policy_actions
        return int(policy_actions(self.wm, self.agent, [self.ctx], greedy=False, rng=rng)[0])


def _configs(a, seq_len_given: bool) -> list[AtariWMConfig]:
    if not a.game:
        raise ValueError("--task atari needs --game (wmbench list shows the games)")
    seeds = list(a.seeds)
    overrides = dict(game=a.game, backbone=a.backbone, steps=a.steps, batch_size=a.batch_size, d_model=a.d_model,
                     n_layers=a.n_layers, lr=a.lr, device=a.device, threads=a.threads, data_steps=a.data_steps,
                     data_seed=a.data_seed, val_windows=a.eval_sequences,
                     seq_len=a.seq_len if seq_len_given else None)
    if a.dtype not in (None, "fp32"):
        raise ValueError("--task atari runs in fp32 (--dtype bf16 is not supported yet)")
    if a.tokens_per_step is not None:
        raise ValueError("--tokens-per-step applies to --task gridworld only")
    if a.policy:
        overrides["policy"] = str(Path(a.policy).resolve())
    from wmbench.tasks.atari import canonical_game
    overrides["game"] = canonical_game(a.game)
    return [make_config(a.preset, seed=s, **overrides) for s in seeds]


def check_atari_cells(a, seq_len_given: bool) -> tuple:
    """The `wmbench run --task atari` options checked, nothing written: (cell configs, the dataset's
    policy or None for random play, the dataset key)."""
    if a.device is not None:
        from wmbench.core.device import resolve_device
        a.device = str(resolve_device(a.device))
    cfgs = _configs(a, seq_len_given)
    for cfg in cfgs:
        check_config(cfg)
    policy = CheckpointPolicy(cfgs[0].policy, cfgs[0].game, cfgs[0].protocol) if cfgs[0].policy != "random" else None
    return cfgs, policy, dataset_key(cfgs[0], policy.id if policy else "random")


def print_checked(checked: tuple) -> int:
    cfgs, _, key = checked
    print(json.dumps({"dataset": key.as_dict(), "cells": [c.to_dict() for c in cfgs]}, indent=1))
    return 0


def run_atari_cells(a, checked: tuple) -> int:
    """The `wmbench run --task atari` command after check_atari_cells: returns the exit status."""
    from wmbench.core.paths import writable_dir
    from wmbench.core.records import (device_name, existing_record, make_record, note_record, records_of,
                                      save_record_and_say)
    from wmbench.harness.atari_dataset import DatasetError, get_dataset
    cfgs, policy, key = checked
    runs_dir = writable_dir(a.runs_dir, "--runs-dir")
    existing = [] if a.force else records_of(runs_dir, "wm-atari")
    def done_before(c):
        return existing_record(existing, _record_config(c, key), device_name(c.device))
    todo = [c for c in cfgs if done_before(c) is None]
    for c in cfgs:
        if c not in todo:
            done = done_before(c)
            print(f"{c.game} {c.backbone} L={c.seq_len} seed {c.seed}: already done (--force runs it again)")
            print(f"record: {done}")
            note_record(done)
    if not todo:
        return 0
    try:
        ds = get_dataset(key, cache=a.data_dir, policy=policy, progress=not a.no_progress)
    except DatasetError as e:
        raise ValueError(str(e)) from None
    failed = False
    for cfg in todo:
        try:
            metrics, wm = train_and_evaluate(cfg, ds, progress=not a.no_progress)
        except FloatingPointError as e:    # diverged: this seed has no result; the others still run
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {cfg.game} {cfg.backbone} L={cfg.seq_len} seed {cfg.seed}: {msg}; no record written",
                  file=sys.stderr)
            failed = True
            continue
        rec = make_record("wm-atari", _record_config(cfg, key), metrics,
                          extra={"dataset": {"path": str(ds.path), "n_steps": ds.manifest["n_steps"],
                                             "n_episodes": ds.manifest["n_episodes"],
                                             "files_sha256": {k: v["sha256"] for k, v in ds.manifest["files"].items()}}},
                          device=cfg.device)
        rec["environment"]["torch_threads"] = metrics["threads"]["value"]
        stamp = rec["created_at"].replace(":", "").replace("-", "")[:15]
        name = f"wm-atari-{cfg.game}-{cfg.backbone}-L{cfg.seq_len}-seed{cfg.seed}-{stamp}"
        model_path = _save_model(wm, name)
        if model_path:
            rec["artifacts"] = {"world_model": str(Path(model_path).resolve())}
        print(summary_line(cfg, metrics))
        failed |= not save_record_and_say(rec, runs_dir, name)
    return 1 if failed else 0


def _record_config(cfg: AtariWMConfig, key) -> dict:
    """The record's config: the cell's options, the world model's full config and the dataset's key."""
    from wmbench.harness.wm_atari import model_config
    return json.loads(json.dumps({**cfg.to_dict(), "world_model": model_config(cfg).to_dict(),
                                  "dataset_key": key.as_dict()}, default=str))


def _save_model(wm, name: str) -> Path | None:
    """The trained world model's weights and config (for `wmbench imagine`); a failure to write them is a
    warning, never a lost record."""
    import io

    from wmbench.core.records import atomic_write_bytes
    try:
        buf = io.BytesIO()
        torch.save({"config": wm.cfg.to_dict(), "n_actions": wm.n_actions, "state_dict": wm.state_dict()}, buf)
        return atomic_write_bytes(MODELS_DIR / name / "world_model.pt", buf.getvalue())
    except OSError as e:
        print(f"warning: could not save the world model under {MODELS_DIR} ({e.strerror or e})", file=sys.stderr)
        return None


def summary_line(cfg: AtariWMConfig, m: dict) -> str:
    ms = m["imagine_ms_per_step"]["value"]
    img = ", ".join(f"{c}: {v:.1f}" if v is not None else f"{c}: OOM" for c, v in ms.items())
    return (f"{cfg.game} {cfg.backbone} L={cfg.seq_len} seed {cfg.seed}: {m['train_ms_per_step']['value']:.0f} ms/step, "
            f"peak {m['peak_memory']['value'] / 2**20:.0f} MiB, recon PSNR {m['recon_psnr']['value']:.1f} dB, "
            f"open-loop MSE@{cfg.ol_horizon} {m['open_loop_mse']['value']:.4f} "
            f"(repeat-last {m['open_loop_mse']['repeat_last_frame'][-1]:.4f}), reward MAE {m['reward_mae']['value']:.3f}, "
            f"KL {m['dynamics_kl']['value']:.2f}; imagination ms/step by context {img}")
