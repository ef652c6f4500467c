"""The `wmbench` command line: run, atari, bench, report, list.

User mistakes (unknown names, impossible sizes, corrupt files) print one line `error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from wmbench.core import allocator


def _csv(kind):
    def parse(s: str):
        try:
            return [kind(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {s!r}")
    return parse


def _add_bench(sub):
    p = sub.add_parser("bench", help="fwd+bwd time, memory, FLOPs and step latency per backbone and length")
    p.add_argument("--backbones", type=_csv(str), default=["mamba", "mamba2", "gru", "transformer"])
    p.add_argument("--len", dest="lengths", type=_csv(int), default=[208, 1664])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--contexts", type=_csv(int), default=[8, 208, 1664], help="step-latency contexts")
    p.add_argument("--runs-dir", default="results/runs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(a) -> int:
    from wmbench.harness.bench import BenchConfig, run_bench
    from wmbench.report.bench import format_table
    for name, v in (("--batch", a.batch), ("--d-model", a.d_model), ("--layers", a.layers), ("--iters", a.iters)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if any(n <= 0 for n in a.lengths + a.contexts):
        raise ValueError("--len and --contexts must be positive integers")
    cfg = BenchConfig(backbones=a.backbones, lengths=a.lengths, batch_size=a.batch, d_model=a.d_model,
                      n_layers=a.layers, dtype=a.dtype, device=a.device, iters=a.iters, warmup=a.warmup,
                      step_contexts=a.contexts)
    _check_sizes(cfg.backbones, cfg.d_model, cfg.n_layers)
    record, path = run_bench(cfg, runs_dir=a.runs_dir, progress=not a.no_progress)
    print(format_table(record))
    print(f"record: {path}")
    return 0


def _check_sizes(backbones, d_model, n_layers, **options) -> None:
    """Build each backbone once on the meta device so impossible sizes fail before any work."""
    import torch

    import wmbench
    with torch.device("meta"):
        for b in backbones:
            wmbench.create_backbone(b, d_model, n_layers, **options)


def _add_list(sub):
    p = sub.add_parser("list", help="registered backbones, tasks, games and presets")
    p.set_defaults(func=_cmd_list)


def _cmd_list(a) -> int:
    import wmbench
    print("backbones: " + ", ".join(wmbench.list_backbones()))
    print("tasks:     " + ", ".join(wmbench.list_tasks()))
    for title, loader in (("games", _games), ("presets", _presets)):
        items = loader()
        if items:
            print(f"{title + ':':<11}" + ", ".join(items))
    return 0


def _games() -> list[str]:
    try:
        from wmbench.tasks.atari import list_games
    except ImportError:
        return []
    return list_games()


def _presets() -> list[str]:
    out = []
    try:
        from wmbench.harness.gridworld import PRESETS as run_presets
        out += [f"run:{k}" for k in run_presets]
    except ImportError:
        pass
    try:
        from wmbench.world_model.config import list_presets
        out += [f"atari:{k}" for k in list_presets()]
    except ImportError:
        pass
    return out


def _add_run(sub):
    p = sub.add_parser("run", help="one benchmark cell: train a backbone on a task, measure it, write run records")
    p.add_argument("--backbone", default="mamba2")
    p.add_argument("--task", default="gridworld")
    p.add_argument("--len", dest="seq_len", type=int, default=1664, help="sequence length in tokens")
    p.add_argument("--seeds", type=_csv(int), default=[0])
    p.add_argument("--preset", default="cpu", help="configuration preset (see `wmbench list`)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", dest="batch_size", type=int, help="sequences per step (default: automatic)")
    p.add_argument("--d-model", dest="d_model", type=int)
    p.add_argument("--layers", dest="n_layers", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-sequences", dest="eval_sequences", type=int)
    p.add_argument("--tokens-per-step", dest="tokens_per_step", type=int,
                   help="token budget of the automatic batch (batch = tokens_per_step // len)")
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--runs-dir", default="results/runs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_run)


def _is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def _cmd_run(a) -> int:
    from wmbench.harness.gridworld import check_config, make_config, summary_lines, train_and_evaluate
    from wmbench.core.records import make_record, write_record

    if a.task != "gridworld":
        import wmbench
        wmbench.get_task(a.task)  # unknown task -> error naming the valid ones
        raise ValueError(f"task {a.task!r} has no `wmbench run` harness; valid choices: gridworld")
    overrides = {k: getattr(a, k) for k in ("steps", "batch_size", "d_model", "n_layers", "lr",
                                            "eval_sequences", "dtype", "device", "threads", "tokens_per_step")}
    cfgs = [make_config(a.preset, backbone=a.backbone, task=a.task, seq_len=a.seq_len, seed=s, **overrides)
            for s in a.seeds]
    for cfg in cfgs:                       # every seed's config is valid before any work starts
        check_config(cfg)
        _check_sizes([cfg.backbone], cfg.d_model, cfg.n_layers, **cfg.backbone_options)
    for cfg in cfgs:
        status = "ok"
        try:
            metrics = train_and_evaluate(cfg, progress=not a.no_progress)
        except Exception as e:  # noqa: BLE001 - a real OOM is a result (the paper's Table 2 reports it)
            if not _is_oom(e):
                raise
            status, metrics = "OOM", {}
        rec = make_record("gridworld", cfg.to_dict(), metrics, extra={"status": status}, device=cfg.device)
        path = write_record(rec, a.runs_dir, name=f"gridworld-{cfg.backbone}-L{cfg.seq_len}-seed{cfg.seed}-"
                            + rec["created_at"].replace(":", "").replace("-", "")[:15])
        if status == "ok":
            print("\n".join(summary_lines(cfg, metrics)))
        else:
            print(f"{cfg.backbone} L={cfg.seq_len} seed {cfg.seed}: out of memory")
        print(f"record: {path}")
    return 0


def _add_report(sub):
    p = sub.add_parser("report", help="tables and plots from all run records")
    p.add_argument("--runs-dir", default="results/runs")
    p.add_argument("--out", default="results", help="writes OUT/tables and OUT/plots")
    p.set_defaults(func=_cmd_report)


def _cmd_report(a) -> int:
    from wmbench.report.tables import build_report
    for path in build_report(a.runs_dir, a.out):
        print(path)
    return 0


def _add_atari(sub):  # the Drama agent: wmbench/agent/
    from wmbench.agent.cli import add_parser
    add_parser(sub)


COMMANDS = [_add_run, _add_atari, _add_bench, _add_report, _add_list]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wmbench", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        allocator.configure()
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # UserError is a ValueError
        if os.environ.get("WMBENCH_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
