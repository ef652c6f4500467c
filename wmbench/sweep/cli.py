"""`wmbench sweep SPEC | --grid key=v1,v2 ...`: the command line of driver.py."""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shlex
from pathlib import Path

from wmbench.sweep.spec import COMMANDS, EXECUTORS, inline_spec, load_spec


RUN_TASKS = ("gridworld", "atari")     # the tasks `wmbench run` has a harness for (cli.py's _cmd_run)


def add_parser(sub, build_parser) -> None:
    """`build_parser` makes wmbench's own parser, which checks every run's command line before it runs."""
    p = sub.add_parser("sweep", help="a grid of `wmbench run` / `wmbench atari` runs on an executor, resumable",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Expands SPEC (a TOML/YAML file or a packaged sweep, see `wmbench list`) or "
                                   "inline --grid/--set options into runs and runs each once; re-running the same "
                                   "command resumes.")
    p.add_argument("spec", nargs="?", help="sweep file or packaged sweep name (omit to sweep --grid/--set)")
    p.add_argument("--command", default="run", choices=COMMANDS, help="with --grid: the command swept")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis of the grid (repeatable); with SPEC: added to each of its blocks")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of every run (repeatable); with SPEC: added where a block leaves it unset")
    p.add_argument("--executor", choices=EXECUTORS, help="local (default), slurm (submitit) or ray")
    p.add_argument("--workers", type=int, help="local: runs at once (default: the spec's, else 1)")
    p.add_argument("--threads", type=int,
                   help="torch threads per run (default: the spec's, else cores // workers for local)")
    p.add_argument("--retries", type=int, default=1, help="extra attempts for a run that fails")
    p.add_argument("--grace-s", dest="grace_s", type=float, default=300.0,
                   help="on SIGINT/SIGTERM: seconds the runs get to save a checkpoint and exit before they are "
                        "killed (a second signal kills them at once)")
    p.add_argument("--runs-dir", default="results/runs", help="where the runs write their records")
    p.add_argument("--state-dir", help="the sweep's bookkeeping and logs (default runs/sweeps/NAME)")
    p.add_argument("--dry-run", action="store_true", help="print the commands (and the sbatch file), run nothing")
    p.add_argument("--no-progress", action="store_true", help="one line per finished run, no progress bar")
    p.add_argument("--address", help="ray: the cluster's address (default: a local Ray for this sweep)")
    p.add_argument("--cpus", type=float, help="slurm/ray: CPUs per run (default: the spec's, else 1)")
    p.add_argument("--gpus", type=float, help="slurm/ray: GPUs per run (default: the spec's, else 0)")
    p.add_argument("--partition", help="slurm: the partition")
    p.add_argument("--time-min", dest="time_min", type=int, help="slurm: the time limit of one run, minutes")
    p.add_argument("--mem-gb", dest="mem_gb", type=float, help="slurm: memory per run, GB")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm",
                   help="slurm: submitit's cluster; local and debug run the same path without SLURM")
    p.set_defaults(func=lambda a: cmd_sweep(a, build_parser))


def _spec(a):
    if a.spec:
        spec = load_spec(a.spec)
        if a.grid or a.sets:
            extra = inline_spec("run", a.grid, a.sets).blocks[0]
            for b in spec.blocks:
                clash = set(extra["grid"]) & (set(b["options"]) | set(b["grid"]))
                if clash:
                    raise ValueError(f"--grid {', '.join(sorted(clash))}: the spec already sets it")
                b["grid"].update(extra["grid"])
                b["options"] = {**extra["options"], **b["options"]}
        return spec
    if not a.grid and not a.sets:
        raise ValueError("give a sweep file (or a packaged sweep, see `wmbench list`), or --grid key=v1,v2")
    return inline_spec(a.command, a.grid, a.sets)


def validate(runs, build_parser, argv_of=None) -> None:
    """Every run's command line (`argv_of(run)`, default the spec's options) parses, its named backbone,
    task and game exist, and the command's own check of its options passes: a mistake fails the sweep
    before the first run starts, not as N failed runs."""
    import wmbench
    from wmbench.tasks.atari import list_games
    parser = build_parser()
    games = {g.lower() for g in list_games()} | {"gridgoal"}
    for run in runs:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = parser.parse_args(argv_of(run) if argv_of else run.argv())
        except SystemExit:
            msg = err.getvalue().strip().splitlines()
            raise ValueError(f"run `{run.label}`: {msg[0] if msg else 'invalid options'}") from None
        b, t, g = run.option("backbone"), run.option("task"), run.option("game")
        if b is not None and b not in wmbench.list_backbones():
            raise ValueError(f"run `{run.label}`: unknown backbone {b!r}; valid: {', '.join(wmbench.list_backbones())}")
        if t is not None and t not in RUN_TASKS:
            raise ValueError(f"run `{run.label}`: task {t!r} has no `wmbench run` harness; valid: {', '.join(RUN_TASKS)}")
        if g is not None and str(g).lower() not in games:
            raise ValueError(f"run `{run.label}`: unknown game {g!r} (see `wmbench list`)")
        _run_check(run, args)


def _run_check(run, args) -> None:
    """The command's own validation, `args.validate(args)`: exactly what `--check` and the real run refuse
    (wmbench/cli.py sets it on each command that has one)."""
    from wmbench.core.errors import one_line
    check = getattr(args, "validate", None)
    if check is None:
        return
    try:
        check(args)
    except ValueError as e:            # UserError too
        raise ValueError(f"run `{run.label}`: {one_line(str(e))}") from None


def _at_least_one(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value


def cmd_sweep(a, build_parser) -> int:
    from wmbench.sweep import driver, executors

    spec = _spec(a)
    ex = dict(spec.executor)
    name = a.executor or ex.get("name", "local")
    if name not in EXECUTORS:
        raise ValueError(f"executor {name!r}; valid choices: {', '.join(EXECUTORS)}")
    workers = _at_least_one(a.workers, "--workers") if a.workers is not None else \
        _at_least_one(ex.get("workers", 1), "[executor] workers")
    threads = a.threads if a.threads is not None else ex.get("threads")
    if threads is not None:
        _at_least_one(threads, "--threads" if a.threads is not None else "[executor] threads")
    elif name == "local":
        threads = max(1, (os.cpu_count() or 1) // workers)
    if a.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {a.retries}")
    if not math.isfinite(a.grace_s) or a.grace_s < 0:
        raise ValueError(f"--grace-s must be >= 0 and finite (seconds), got {a.grace_s}")
    runs = spec.expand()
    runs_dir = Path(a.runs_dir).resolve()
    state = Path(a.state_dir or Path("runs") / "sweeps" / spec.name).resolve()
    validate(runs, build_parser, lambda r: driver.run_argv(r, runs_dir, state, threads))
    res = {"cpus": a.cpus if a.cpus is not None else ex.get("cpus", 1),
           "gpus": a.gpus if a.gpus is not None else ex.get("gpus", 0)}
    slurm = {**{k: v for k, v in ex.items() if k not in ("name", "workers", "threads", "address")}, **res,
             **{k: getattr(a, k) for k in ("partition", "time_min", "mem_gb") if getattr(a, k) is not None}}

    if a.dry_run:
        print(f"# sweep {spec.name} ({spec.source}): {len(runs)} runs, executor {name}, state {state}")
        for r in runs:
            mark = "  # done" if driver.done_problem(r, state, runs_dir) is None else ""
            print("wmbench " + shlex.join(driver.run_argv(r, runs_dir, state, threads)) + mark)
        if name == "slurm":
            print("\n# the sbatch file of the job array (submitit):")
            print(executors.sbatch_script(state / "submitit", slurm, len(runs), a.grace_s))
        return 0

    if name == "local":
        backend = executors.LocalBackend(workers)
    elif name == "slurm":
        backend = executors.SubmititBackend(state / "submitit", slurm,
                                            cluster=None if a.cluster == "slurm" else a.cluster, grace_s=a.grace_s)
    else:
        backend = executors.RayBackend(a.address or ex.get("address"), **res)
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = driver.run_sweep(runs, backend, state, runs_dir, retries=a.retries, threads=threads,
                           progress=not a.no_progress, grace_s=a.grace_s)
    for line in driver.summary(out, len(runs), state):
        print(line)
    if out.signal is not None:
        return 128 + out.signal         # 130 for SIGINT, 143 for SIGTERM, as a shell reports a signal
    return 1 if (out.failed or out.busy) else 0
