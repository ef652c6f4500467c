"""The `wmbench` command line: run, atari, bench, sweep, report, imagine, list.

User mistakes (unknown names, impossible sizes, corrupt files) print one line `error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from wmbench.core import allocator, argtypes
from wmbench.core.errors import one_line
from wmbench.core.registry import BUILTIN_BACKBONES


def _csv(kind):
    def parse(s: str):
        try:
            return [kind(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {s!r}")
    return parse


# an option's default, marked so a command can tell it from the same value typed (argparse shows it as usual)
class _DefaultList(list):
    pass


class _DefaultInt(int):
    pass


class _DefaultStr(str):
    pass


def _default(value):
    return {list: _DefaultList, int: _DefaultInt, str: _DefaultStr}[type(value)](value)


def _given(value) -> bool:
    return not isinstance(value, (_DefaultList, _DefaultInt, _DefaultStr))


def _add_bench(sub):
    p = sub.add_parser("bench", help="fwd+bwd time, memory, FLOPs and step latency per backbone and length",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", type=_csv(str), default=_default(list(BUILTIN_BACKBONES)),
                   help="comma-separated backbone names")
    p.add_argument("--len", dest="lengths", type=_csv(int), default=_default([208, 1664]),
                   help="sequence lengths (with --peers: each pair's own unless given)")
    p.add_argument("--batch", type=int, default=_default(16),
                   help="sequences per fwd+bwd (with --peers: each pair's own unless given)")
    p.add_argument("--d-model", type=int, default=512, help="model width")
    p.add_argument("--layers", type=int, default=2, help="backbone layers")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 parameters")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=argtypes.threads, default=0, help="torch CPU threads per cell (0: torch's default)")
    p.add_argument("--iters", type=int, default=3, help="timed fwd+bwd calls per cell")
    p.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd calls first")
    p.add_argument("--contexts", type=_csv(int), default=_default([8, 208, 1664]), help="step-latency contexts")
    p.add_argument("--runs-dir", type=argtypes.path, default="results/runs", help="where the record goes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--check", action="store_true", help="validate the options and folders, print the config, stop")
    p.add_argument("--agent", action="store_true",
                   help="the Drama agent's update phase by phase per backbone, at --size (--len, --batch, "
                        "--d-model, --layers, --dtype, --contexts do not apply)")
    p.add_argument("--size", default=_default("cpu"), help="with --agent: the model size preset (XS, S, tiny, cpu)")
    p.add_argument("--replay-capacity", type=int, default=100_000,
                   help="with --agent: frames of the full replay buffer held in memory and sampled from (0: none)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="with --agent: torch.compile the rollout step (default: the choice `wmbench atari` makes "
                        "on this device and size)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="with --agent: training precision (default: the choice `wmbench atari` makes on this device: "
                        "bf16 autocast only where measured faster)")
    p.add_argument("--peers", nargs="?", const="all", metavar="PAIRS",
                   help="installed peer implementations side by side with ours at the same shapes: mambapy and "
                        "transformers' Mamba (with mambapy's scan, and its default sequential loop) vs our mamba, "
                        "transformers' Mamba2 vs our mamba2, mamba-ssm's ssd_minimal_discrete vs our SSD op; "
                        "fla's Gated DeltaNet (naive reference op) and transformers' Qwen3-Next GatedDeltaNet vs "
                        "our gated_deltanet, fla's RWKV-7 (naive reference op) vs our rwkv7, xlstm's mLSTM stack "
                        "and xLSTM-Large's mLSTM layer vs our mlstm, mamba3 (no installed CPU peer); all, or a "
                        "comma-separated subset of mambapy, hf-mamba, hf-mamba-seq, hf-mamba2, ssd-minimal, "
                        "fla-gdn, hf-gdn, fla-rwkv7, xlstm, xlstm-large, mamba3 "
                        "(--backbones, --dtype, --contexts do not apply)")
    p.set_defaults(func=_cmd_bench)


def _cmd_agent_bench(a) -> int:
    from wmbench.core.device import resolve_device
    from wmbench.harness.agent_bench import AgentBenchConfig, check_agent_bench_config, run_agent_bench
    from wmbench.report.agent_bench import agent_bench_markdown
    cfg = AgentBenchConfig(backbones=list(a.backbones), size=str(a.size), device=str(resolve_device(a.device)),
                           threads=a.threads, warmup=a.warmup, iters=a.iters, replay_capacity=a.replay_capacity,
                           compile=a.compile, precision=a.precision)
    check_agent_bench_config(cfg)
    return _measure(a, cfg, run_agent_bench, lambda rec: agent_bench_markdown([rec]))


def _measure(a, cfg, run, render) -> int:
    """--check, or: the runs dir made ready, the measurement, its table and record path (exit 1 if the
    record had to go to a fallback)."""
    import json
    from dataclasses import asdict

    from wmbench.core.paths import probe_dir, remove_orphans, writable_dir
    from wmbench.core.records import RecordNotSaved
    if a.check:
        probe_dir(a.runs_dir, "--runs-dir")
        print(json.dumps(asdict(cfg), indent=1))
        return 0
    runs_dir = writable_dir(a.runs_dir, "--runs-dir")
    remove_orphans(runs_dir)
    try:
        record, path = run(cfg, runs_dir=runs_dir, progress=not a.no_progress)
    except RecordNotSaved as e:
        e.report()
        return 1
    print(render(record))
    print(f"record: {path}")
    return 0


def _cmd_bench(a) -> int:
    from wmbench.core.device import resolve_device
    from wmbench.harness.bench import BenchConfig, check_bench_config, run_bench
    from wmbench.report.bench import format_table
    if a.peers is not None:
        return _cmd_peers_bench(a)
    if a.agent:
        return _cmd_agent_bench(a)
    cfg = BenchConfig(backbones=list(a.backbones), lengths=list(a.lengths), batch_size=int(a.batch),
                      d_model=a.d_model, n_layers=a.layers, dtype=a.dtype, device=str(resolve_device(a.device)),
                      iters=a.iters, warmup=a.warmup, step_contexts=list(a.contexts), threads=a.threads)
    check_bench_config(cfg)
    _check_sizes(cfg.backbones, cfg.d_model, cfg.n_layers)
    return _measure(a, cfg, run_bench, format_table)


def _cmd_peers_bench(a) -> int:
    from wmbench.core.device import resolve_device
    from wmbench.core.errors import UserError
    from wmbench.harness.peers import PAIRS, PeersConfig, check_peers_config, parse_pairs, run_peers
    from wmbench.report.peers import peers_markdown
    if a.agent:
        raise UserError("--peers and --agent are separate benchmarks; give one of them")
    for flag, value in (("--backbones", a.backbones), ("--contexts", a.contexts), ("--size", a.size)):
        if _given(value):
            raise UserError(f"{flag} does not apply to --peers (each pair names its own implementations)")
    if a.dtype != "fp32":
        raise UserError(f"--dtype {a.dtype} does not apply to --peers: the peers are timed in fp32")
    cfg = PeersConfig(pairs=parse_pairs(a.peers), lengths=list(a.lengths) if _given(a.lengths) else None,
                      batch_size=a.batch if _given(a.batch) else None, d_model=a.d_model, n_layers=a.layers,
                      device=str(resolve_device(a.device)), threads=a.threads, warmup=a.warmup, iters=a.iters)
    check_peers_config(cfg)
    ours = sorted({PAIRS[p].ours.split(":")[1] for p in cfg.pairs} - {"ssd"})
    _check_sizes(ours, cfg.d_model, cfg.n_layers)
    return _measure(a, cfg, run_peers, lambda rec: peers_markdown([rec]))


def _check_sizes(backbones, d_model, n_layers, **options) -> None:
    """Build each backbone once on the meta device so impossible sizes fail before any work."""
    import torch

    import wmbench
    with torch.device("meta"):
        for b in backbones:
            wmbench.create_backbone(b, d_model, n_layers, **options)


def _add_doctor(sub):
    p = sub.add_parser("doctor", help="what this machine has and what wmbench will use: device, bf16, "
                                      "threads, allocator, optional CUDA kernels")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(a) -> int:
    from wmbench.harness.doctor import doctor_lines
    print("\n".join(doctor_lines()))
    return 0


def _add_list(sub):
    p = sub.add_parser("list", help="registered backbones, tasks, games and presets")
    p.set_defaults(func=_cmd_list)


def _cmd_list(a) -> int:
    import wmbench
    print("backbones: " + ", ".join(wmbench.list_backbones()))
    print("tasks:     " + ", ".join(wmbench.list_tasks()))
    for title, loader in (("games", _games), ("presets", _presets), ("sweeps", _sweeps)):
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


def _sweeps() -> list[str]:
    from wmbench.sweep.spec import packaged_specs
    return list(packaged_specs())


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
    p = sub.add_parser("run", help="one benchmark cell: train a backbone on a task, measure it, write run records",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="mamba2", help="sequence model (wmbench list)")
    p.add_argument("--task", default="gridworld", help="workload (wmbench list)")
    p.add_argument("--len", dest="seq_len", type=int, default=_default(1664),
                   help="sequence length: tokens for gridworld; transitions per training window for atari (default 64)")
    p.add_argument("--grid", dest="grid_size", type=int, default=_default(5),
                   help="with --task gridworld: the grid side l_g, 4 to 16 (--len must be a multiple of l_g^2 + 1)")
    p.add_argument("--variant", default=_default("full"),
                   help="with --task gridworld: what the frames show: full (everything), goal_once (the goal only "
                        "where it appears) or agent_once (the agent only where it appears); see README")
    p.add_argument("--game", help="with --task atari: the Atari game (wmbench list)")
    p.add_argument("--data-steps", dest="data_steps", type=argtypes.count,
                   help="with --task atari: env steps in the offline dataset (default: the preset's)")
    p.add_argument("--data-seed", dest="data_seed", type=argtypes.seed, default=0,
                   help="with --task atari: seed of the dataset's env and policy (every backbone and training seed "
                        "shares it)")
    p.add_argument("--policy", type=argtypes.path, help="with --task atari: an agent's run dir whose checkpoint plays the dataset "
                                    "(default: a uniformly random policy)")
    p.add_argument("--data-dir", dest="data_dir", type=argtypes.path,
                   help="with --task atari: the dataset cache (default: $WMBENCH_DATA or ~/.cache/wmbench/datasets)")
    p.add_argument("--seeds", type=argtypes.seeds, default=[0], help="comma-separated seeds, each run once")
    p.add_argument("--preset", default="cpu", help="configuration preset (see `wmbench list`)")
    p.add_argument("--steps", type=argtypes.count, help="optimiser steps (default: the preset's)")
    p.add_argument("--batch", dest="batch_size", type=argtypes.count, help="sequences per step (default: automatic)")
    p.add_argument("--d-model", dest="d_model", type=argtypes.count, help="model width (default: the preset's)")
    p.add_argument("--layers", dest="n_layers", type=argtypes.count, help="backbone layers (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's, per backbone)")
    p.add_argument("--eval-sequences", dest="eval_sequences", type=argtypes.count,
                   help="held-out sequences scored (default: the preset's)")
    p.add_argument("--tokens-per-step", dest="tokens_per_step", type=argtypes.count,
                   help="token budget of the automatic batch (batch = tokens_per_step // len)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16: autocast (default: the preset's, fp32)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--threads", type=argtypes.threads, help="torch CPU threads (0: torch's default; default: the preset's)")
    p.add_argument("--runs-dir", type=argtypes.path, default="results/runs", help="where the run records go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="run a seed again even if its record exists")
    p.add_argument("--check", action="store_true", help="validate the options and folders, print the configs, stop")
    p.set_defaults(func=_cmd_run, validate=_check_run_args)


def _is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def _check_run_args(a):
    """Everything `wmbench run` refuses before it starts, without writing: the real run, `--check` and a
    sweep's check of each run call exactly this. Returns the per-seed configs (and, for --task atari,
    the dataset's policy and key)."""
    from wmbench.core.paths import probe_dir
    from wmbench.harness.gridworld import check_config, check_memory, make_config

    if a.task == "atari":
        for flag, v in (("--grid", a.grid_size), ("--variant", a.variant)):
            if _given(v):
                raise ValueError(f"{flag} applies to --task gridworld only")
        _check_seeds(a.seeds)
        from wmbench.harness.wm_atari_cli import check_atari_cells
        checked = check_atari_cells(a, seq_len_given=_given(a.seq_len))
    else:
        if a.task != "gridworld":
            import wmbench
            wmbench.get_task(a.task)  # unknown task -> error naming the valid ones
            raise ValueError(f"task {a.task!r} has no `wmbench run` harness; valid choices: gridworld, atari")
        _check_seeds(a.seeds)
        if a.device is not None:
            from wmbench.core.device import resolve_device
            a.device = str(resolve_device(a.device))     # auto -> cpu / cuda
        overrides = {k: getattr(a, k) for k in ("steps", "batch_size", "d_model", "n_layers", "lr",
                                                "eval_sequences", "dtype", "device", "threads", "tokens_per_step")}
        checked = [make_config(a.preset, backbone=a.backbone, task=a.task, seq_len=a.seq_len, seed=s,
                               grid_size=int(a.grid_size), variant=str(a.variant), **overrides)
                   for s in a.seeds]
        for cfg in checked:                    # every seed's config is valid before any work starts
            check_config(cfg)
            _check_sizes([cfg.backbone], cfg.d_model, cfg.n_layers, **cfg.backbone_options)
            check_memory(cfg)
    probe_dir(a.runs_dir, "--runs-dir")
    return checked


def _cmd_run(a) -> int:
    import json

    from wmbench.core.paths import writable_dir
    from wmbench.core.records import device_name, make_record, note_record, save_record_and_say
    from wmbench.harness.gridworld import summary_lines, train_and_evaluate

    checked = _check_run_args(a)
    if a.task == "atari":
        from wmbench.harness.wm_atari_cli import print_checked, run_atari_cells
        return print_checked(checked) if a.check else run_atari_cells(a, checked)
    cfgs = checked
    if a.check:
        print(json.dumps([c.to_dict() for c in cfgs], indent=1))
        return 0
    runs_dir = writable_dir(a.runs_dir, "--runs-dir")
    failed = False
    existing = [] if a.force else _records_of(runs_dir, "gridworld")   # read once, not once per seed
    for r in existing:                     # records from before --grid / --variant ran the full 5x5 task
        if isinstance(r.get("config"), dict):
            r["config"].setdefault("grid_size", 5)
            r["config"].setdefault("variant", "full")
    for cfg in cfgs:
        done = _existing_record(existing, cfg.to_dict(), device_name(cfg.device))
        # the record name and messages name the grid and variant when they are not the paper's 5x5 full task
        cell = "" if (cfg.grid_size, cfg.variant) == (5, "full") else f"{cfg.variant}-g{cfg.grid_size}-"
        if done is not None:
            print(f"{cell}{cfg.backbone} L={cfg.seq_len} seed {cfg.seed}: already done (--force runs it again)")
            print(f"record: {done}")
            note_record(done)
            continue
        status = "ok"
        try:
            metrics = train_and_evaluate(cfg, progress=not a.no_progress)
        except FloatingPointError as e:    # diverged: this seed has no result; the others still run
            print(f"error: {cell}{cfg.backbone} L={cfg.seq_len} seed {cfg.seed}: {one_line(str(e))}; "
                  "no record written", file=sys.stderr)
            failed = True
            continue
        except Exception as e:  # noqa: BLE001 - a real OOM is a result (the paper's Table 2 reports it)
            if not _is_oom(e):
                raise
            status, metrics = "OOM", {}
        rec = make_record("gridworld", cfg.to_dict(), metrics, extra={"status": status}, device=cfg.device)
        if "threads" in metrics:           # the count that ran (the process's is restored afterwards)
            rec["environment"]["torch_threads"] = metrics["threads"]["value"]
        if status == "ok":
            print("\n".join(summary_lines(cfg, metrics)))
        else:
            print(f"{cell}{cfg.backbone} L={cfg.seq_len} seed {cfg.seed}: out of memory")
        name = f"gridworld-{cell}{cfg.backbone}-L{cfg.seq_len}-seed{cfg.seed}-" + \
            rec["created_at"].replace(":", "").replace("-", "")[:15]
        failed |= not save_record_and_say(rec, runs_dir, name)
    return 1 if failed else 0


def _check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds 0,1,2")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"--seeds repeats {', '.join(map(str, dup))}; each seed runs once")
    if min(seeds) < 0:
        raise ValueError(f"--seeds must be >= 0, got {min(seeds)}")


def _records_of(runs_dir, kind: str) -> list[dict]:
    from wmbench.core.records import records_of
    return records_of(runs_dir, kind)


def _existing_record(records: list[dict], config: dict, machine: str) -> str | None:
    from wmbench.core.records import existing_record
    return existing_record(records, config, machine)


def _add_report(sub):
    p = sub.add_parser("report", help="tables and plots from all run records",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs-dir", type=argtypes.path, default="results/runs", help="the folder of run records")
    p.add_argument("--out", type=argtypes.path, default="results", help="writes OUT/tables and OUT/plots")
    p.add_argument("--machine", help="only records whose CPU/GPU name contains this (rows never mix machines)")
    p.add_argument("--strict", action="store_true",
                   help="an unusable record is an error (exit 2) instead of a warning line")
    p.set_defaults(func=_cmd_report)


def _cmd_report(a) -> int:
    from wmbench.report.tables import build_report
    written, messages = build_report(a.runs_dir, a.out, machine=a.machine, strict=a.strict)
    for line in messages:
        print(line, file=sys.stderr)
    for path in written:
        print(path)
    return 0


def _add_atari(sub):  # the Drama agent: wmbench/agent/
    from wmbench.agent.cli import add_parser
    add_parser(sub)


def _add_imagine(sub):
    p = sub.add_parser("imagine", help="a 'true | imagined | error' video of open-loop rollouts from a trained world model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--record", help="a `wmbench run --task atari` record (its saved world model and held-out data)")
    src.add_argument("--run-dir", dest="run_dir", help="an agent's run dir (`wmbench atari`): its newest checkpoint")
    p.add_argument("--out", type=argtypes.path, help="output path without extension (default: results/videos/imagine-<name>)")
    p.add_argument("--samples", type=int, default=4, help="windows, one row each")
    p.add_argument("--context", type=int, default=16, help="real frames prefilled before imagining")
    p.add_argument("--horizon", type=int, default=16, help="imagined steps shown")
    p.add_argument("--scale", type=int, default=2, help="enlargement of 64-pixel frames")
    p.set_defaults(func=_cmd_imagine)


def _cmd_imagine(a) -> int:
    from wmbench.harness.imagine_video import imagine_video
    for path in imagine_video(a.record, a.run_dir, a.out, a.samples, a.context, a.horizon, a.scale):
        print(f"wrote {path}")
    return 0


def _add_sweep(sub):  # grids of runs: wmbench/sweep/
    from wmbench.sweep.cli import add_parser
    add_parser(sub, build_parser)     # the sweep checks each run's options with the real parser


COMMANDS = [_add_run, _add_atari, _add_bench, _add_sweep, _add_report, _add_imagine, _add_list, _add_doctor]


class _Parser(argparse.ArgumentParser):
    """argparse's mistakes in the tool's format: one `error:` line naming the help to read, exit 2.
    No prefix matching (argparse's default): `--backbon` must not silently mean `--backbone`, above
    all in a sweep's `--grid backbon=...`. Subcommands are built with this class too."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from wmbench.core.version import __version__
    ap = _Parser(prog="wmbench", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"wmbench {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    if argv is None:   # the command, not a library call: run under tcmalloc where installed (allocator.py)
        allocator.reexec_with_tcmalloc(sys.argv[1:])
    args = build_parser().parse_args(argv)
    try:
        allocator.configure()
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # UserError is a ValueError; OSError: a folder or disk gone bad
        if os.environ.get("WMBENCH_DEBUG"):
            raise
        msg = one_line(str(e)) if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
