"""`wmbench atari`: the command-line arguments of the Drama agent's training run."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from wmbench.agent.config import RUN_PRESETS, TrainConfig, check_config, resolve_config
from wmbench.core import argtypes


def check_run(cfg: TrainConfig) -> None:
    """What `Run.start` refuses, without building anything: folders, and a run dir made with another config."""
    from pathlib import Path

    from wmbench.agent import checkpoint as ckpt
    from wmbench.agent.run import _refuse_diff, _refuse_other_config, check_meta
    from wmbench.core.paths import probe_dir
    probe_dir(cfg.runs_dir, "--runs-dir")
    probe_dir(cfg.run_dir, "--run-dir")
    _refuse_other_config(cfg, Path(cfg.run_dir))
    meta = ckpt.peek_meta(cfg.run_dir)
    if meta is not None:
        check_meta(meta, ckpt.ckpt_root(cfg.run_dir))
        _refuse_diff(meta.get("config", {}), cfg, f"the checkpoint in {cfg.run_dir}")
        if int(meta.get("step", 0)) > cfg.steps:
            raise ValueError(f"{cfg.run_dir} is already at env step {meta['step']}, beyond --steps {cfg.steps}")


def _kv(s: str) -> tuple[str, Any]:
    """'key=value' with value parsed as JSON when possible (numbers, booleans, lists), else a string."""
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except ValueError:
        return k.strip(), v


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("atari", help="train the Drama agent on an Atari100k game (or gridgoal); resumable",
                              description="Train the Drama agent (world model + actor-critic) on one game. "
                                          "Re-run the same command with the same --run-dir to resume.")
    p.add_argument("--game", required=True, help="one of the 26 Atari100k games (case-insensitive) or gridgoal")
    p.add_argument("--backbone", help="sequence model (default mamba2)")
    p.add_argument("--sampler", help="replay sampler: dfs (default) or uniform")
    p.add_argument("--size", help="model size preset: auto (default: XS on CUDA, cpu on a CPU), XS, S, tiny, cpu")
    p.add_argument("--preset", help="run preset (size + schedule): " + ", ".join(RUN_PRESETS))
    p.add_argument("--steps", type=argtypes.count, help="env steps (default 100000)")
    p.add_argument("--seed", type=argtypes.seed, help="seed of everything random (default 0)")
    p.add_argument("--run-dir", type=argtypes.path, help="checkpoints, metrics and TensorBoard logs; resume: the same dir (default "
                                     "runs/atari/GAME-BACKBONE-SAMPLER-SIZE-seedSEED)")
    p.add_argument("--protocol", help="Atari protocol: drama (default), dreamerv3, storm, iris")
    p.add_argument("--device", help="auto (default: CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=argtypes.threads, help="torch CPU threads (default: 1 or all cores, whichever measures faster)")
    p.add_argument("--train-ratio", type=float, help="updates per env step after warm-up (default 1)")
    p.add_argument("--warmup", dest="warmup_steps", type=argtypes.count0, help="random-action steps before training (1032)")
    p.add_argument("--replay-capacity", type=int, help="transitions kept in replay (default 100000)")
    p.add_argument("--dfs-mode", help="official (default: the code's DFS, which produced the paper's numbers) "
                                      "or literal (section 2.4 as printed)")
    p.add_argument("--faithful", help="paper (default) or code: every choice of the official code at once "
                                      "(README: paper vs code)")
    p.add_argument("--stale-reset-frame", action=argparse.BooleanOptionalAction, default=None,
                   help="reproduce the official code's bug of storing the terminal frame in place of the next "
                        "episode's first frame (default: only with --faithful code)")
    p.add_argument("--eval-every", type=argtypes.count0, help="env steps between in-training evaluations (default 10000; 0: none)")
    p.add_argument("--eval-episodes", type=argtypes.count0, help="games per in-training evaluation (default 10)")
    p.add_argument("--final-eval-episodes", type=argtypes.count0, help="games of the final evaluation (default 100)")
    p.add_argument("--eval-sampled", action="store_true", help="sample actions in evaluation (default greedy)")
    p.add_argument("--checkpoint-every", type=argtypes.count0, help="env steps between checkpoints (2000)")
    p.add_argument("--checkpoint-minutes", type=float,
                   help="also checkpoint after this many minutes of wall time (10; 0: off)")
    p.add_argument("--log-every", type=argtypes.count, help="env steps between metrics.jsonl train rows (default 100)")
    p.add_argument("--set", dest="model_overrides", type=_kv, action="append", metavar="FIELD=VALUE",
                   help="override a model/agent hyper-parameter (wmbench.world_model.DramaConfig), repeatable")
    p.add_argument("--env-option", dest="env_options", type=_kv, action="append", metavar="KEY=VALUE",
                   help="protocol field or gridgoal option (e.g. episode_length=50), repeatable")
    p.add_argument("--runs-dir", type=argtypes.path, help="where the run record goes (default results/runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--precision", help="auto (default: bf16 autocast only where measured faster than fp32 "
                   "on this device), fp32 or bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the backbone's recurrent step used by imagination (default: on for a "
                        "Linux CPU with a C++ compiler at imagination batch >= 128, where it was measured to "
                        "pay off; off elsewhere); it compiles at the first update")
    p.add_argument("--force", action="store_true",
                   help="a finished run (its record exists): evaluate and record it again instead of stopping")
    p.add_argument("--check", action="store_true",
                   help="validate the options, folders and an existing run dir, print the resolved config, stop")
    p.add_argument("--no-estimate", action="store_true",
                   help="skip the wall-time estimate (on CPU it also picks the thread count; without it and "
                        "without --threads, torch's default count is used)")
    p.set_defaults(func=main_atari, validate=check_args)
    return p


def check_args(a: argparse.Namespace) -> TrainConfig:
    """Everything the real run refuses before it starts, without writing: `--check`, and a sweep's check of
    each run's command line, call exactly this."""
    cfg = config_from_args(a)
    if cfg.warmup_steps >= cfg.steps:
        raise ValueError(f"--warmup {cfg.warmup_steps} must be below --steps {cfg.steps}: the run would end "
                         "inside its random-action warm-up, train nothing, and score a random policy")
    check_run(cfg)
    return cfg


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    given = {k: getattr(a, k, None) for k in
             ("game", "backbone", "sampler", "size", "steps", "seed", "run_dir", "protocol", "device", "threads",
              "train_ratio", "warmup_steps", "replay_capacity", "dfs_mode", "faithful", "eval_every",
              "eval_episodes", "final_eval_episodes", "checkpoint_every", "checkpoint_minutes", "log_every",
              "runs_dir", "stale_reset_frame", "compile", "precision")}
    if getattr(a, "eval_sampled", False):
        given["eval_greedy"] = False
    if a.model_overrides:
        given["model_overrides"] = dict(a.model_overrides)
    if a.env_options:
        given["env_options"] = dict(a.env_options)
    return check_config(resolve_config(a.preset, **given))


def main_atari(a: argparse.Namespace) -> int:
    from wmbench.agent.record import summary_lines
    from wmbench.agent.train import NonFiniteLossError, train
    from wmbench.core.records import RecordNotSaved
    cfg = check_args(a)
    if a.check:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    try:
        summary = train(cfg, progress=not a.no_progress, estimate=not a.no_estimate, force=a.force)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RecordNotSaved as e:
        e.report()
        return 1
    if summary["stopped"]:
        return 130
    if summary.get("already_done"):
        print(f"record: {summary['record']}")
        return 0
    print("\n".join(summary_lines(cfg, summary)))
    print(f"record: {summary['record']}")
    return 0
