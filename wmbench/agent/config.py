"""Configuration of a `wmbench atari` run: TrainConfig (the schedule, sampler, evaluation and I/O
around a model preset), run presets, and the checks that refuse bad values before any work starts."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wmbench.core.device import check_threads
from wmbench.core.device import resolve_device  # noqa: F401  (re-exported for the agent)


@dataclass
class TrainConfig:
    game: str = "Krull"
    backbone: str = "mamba2"
    sampler: str = "dfs"              # "dfs" (Drama) or "uniform"
    size: str = "auto"                # model preset (wmbench.world_model.config): XS, S, tiny, cpu; auto:
                                      # XS on CUDA, cpu on a CPU (resolve_size says why)
    steps: int = 100_000              # env steps (agent steps of 4 frames on Atari): Atari100k
    seed: int = 0
    run_dir: str = ""                 # "" -> runs/atari/<game>-<backbone>-<sampler>-<size>-seed<seed>
    preset: str = ""                  # run preset that set the defaults below (RUN_PRESETS); informative
    protocol: str = "drama"           # Atari protocol (tasks/atari.py PROTOCOLS)
    train_ratio: float = 1.0          # world-model (and agent) updates per env step after warm-up
    warmup_steps: int = 1032          # code: updates and policy acting start once len(buffer) > 1032
    replay_capacity: int = 100_000    # code: BufferMaxLength 100000 (pages are allocated as it fills)
    dfs_mode: str = "official"        # the official code's DFS (what produced the paper's numbers), or
                                      # "literal": section 2.4 as printed (collapses at scale; README)
    faithful: str = "paper"           # "code": every choice of the official code at once (README table)
    stale_reset_frame: bool | None = None  # the official code's bug: store the terminal frame in place of
                                      # the next episode's first frame (None: only with faithful=code)
    eval_every: int = 10_000          # env steps between in-training evaluations (0: none; code: 1000)
    eval_episodes: int = 10           # code: 10 episodes
    eval_greedy: bool = True          # code: argmax actions in evaluation
    final_eval_episodes: int = 100    # Drama eval.py: 100 episodes of the final model
    eval_envs: int = 16               # episodes run side by side (one batched forward per step)
    checkpoint_every: int = 2000      # code: SaveEverySteps 2000
    checkpoint_minutes: float = 10.0  # also checkpoint after this much wall time (0: off); and on SIGTERM/INT
    log_every: int = 100              # env steps between train-metric rows
    device: str = "auto"              # auto (CUDA if available), cpu, cuda, cuda:1
    threads: int = 0                  # torch CPU threads (0: the fastest of 1 and all cores, measured)
    precision: str = "auto"           # fp32, bf16 (autocast; the official code's) or auto: bf16 only where
                                      # measured faster (resolve_precision); --set amp=... overrides it
    compile: bool | None = None       # torch.compile the backbone's recurrent step (imagination's rollout);
                                      # None: auto (resolve_compile says when, and why)
    model_overrides: dict = field(default_factory=dict)  # DramaConfig fields, e.g. {"wm_lr": 1e-3}
    env_options: dict = field(default_factory=dict)      # protocol fields / GridGoalEnv kwargs
    runs_dir: str = "results/runs"    # where the final run record goes
    auto_choices: dict = field(default_factory=dict)    # what "auto" (or 0 threads) became, and why

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = frozenset({"steps", "run_dir", "device", "threads", "eval_every", "eval_episodes",
                               "eval_greedy", "final_eval_episodes", "eval_envs", "checkpoint_every",
                               "checkpoint_minutes", "log_every", "runs_dir", "preset",
                               "auto_choices", "compile"})   # not precision: a run never changes it
FAITHFUL = ("paper", "code")

# Run presets: a model size plus a schedule sized for it. Explicit options override them.
RUN_PRESETS: dict[str, dict] = {
    "XS": dict(size="XS"),   # the paper: 100k steps, warm-up 1032, 1 update per step
    "S": dict(size="S"),
    # smoke test: every code path in a couple of minutes on CPU
    "tiny": dict(size="tiny", steps=2000, warmup_steps=100, eval_every=1000, eval_episodes=2,
                 final_eval_episodes=4, checkpoint_every=500, log_every=50, replay_capacity=10_000),
    # the CPU learning check on gridgoal: ~1000 updates of the `cpu` model (tests/test_train_atari.py)
    "cpu": dict(size="cpu", steps=1200, warmup_steps=500, train_ratio=1.0, eval_every=500,
                eval_episodes=8, final_eval_episodes=32, checkpoint_every=250, log_every=50,
                replay_capacity=10_000),
}


def resolve_config(preset: str | None = None, **given) -> TrainConfig:
    """TrainConfig defaults <- run preset <- explicitly given values (None means 'not given')."""
    values: dict[str, Any] = {}
    if preset:
        key = {k.lower(): k for k in RUN_PRESETS}.get(str(preset).lower())
        if key is None:
            raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(RUN_PRESETS)}")
        values.update(RUN_PRESETS[key], preset=key)
    values.update({k: v for k, v in given.items() if v is not None})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(values) - names)
    if bad:
        raise ValueError(f"unknown training option(s) {', '.join(bad)}")
    return TrainConfig(**values)


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Canonicalise names and validate every field (ValueError with the valid choices)."""
    from wmbench.world_model.config import list_presets
    from wmbench.core.registry import list_backbones
    from wmbench.agent.replay import SAMPLERS
    from wmbench.tasks.atari import GRIDGOAL, canonical_game, get_protocol

    cfg = copy.deepcopy(cfg)
    cfg.game = canonical_game(cfg.game)
    cfg.backbone = str(cfg.backbone).lower()     # the registry's names: `Mamba2` is the same run as `mamba2`
    if cfg.backbone not in list_backbones():
        raise ValueError(f"unknown backbone {cfg.backbone!r}; valid choices: {', '.join(list_backbones())}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg.sampler!r}; valid choices: {', '.join(SAMPLERS)}")
    device = resolve_device(cfg.device)
    if cfg.device == "auto":
        cfg.auto_choices["device"] = "CUDA is available" if device.type == "cuda" else "no CUDA device"
    cfg.device = str(device)
    sizes = {k.lower(): k for k in list_presets()}
    if str(cfg.size).lower() == "auto":
        cfg.size, cfg.auto_choices["size"] = resolve_size(device)
    if str(cfg.size).lower() not in sizes:
        raise ValueError(f"unknown size {cfg.size!r}; valid choices: auto, {', '.join(list_presets())}")
    cfg.size = sizes[str(cfg.size).lower()]
    if not isinstance(cfg.env_options, dict) or not isinstance(cfg.model_overrides, dict):
        raise ValueError("env_options and model_overrides must be dicts")
    if cfg.game == GRIDGOAL:
        import inspect
        from wmbench.tasks.gridgoal import GridGoalEnv
        valid = [k for k in inspect.signature(GridGoalEnv).parameters if k != "seed"]
    else:
        from wmbench.tasks.atari import AtariProtocol
        get_protocol(cfg.protocol)
        valid = [f.name for f in dataclasses.fields(AtariProtocol) if f.name not in ("name", "source")]
    bad = sorted(set(cfg.env_options) - set(valid))
    if bad:
        raise ValueError(f"unknown env option(s) {', '.join(bad)} for {cfg.game}; valid: {', '.join(valid)}")
    check_env_options(cfg)
    from wmbench.agent.replay import DFS_MODES
    if cfg.dfs_mode not in DFS_MODES:
        hint = " ('paper' is now called 'literal')" if cfg.dfs_mode == "paper" else ""
        raise ValueError(f"dfs_mode must be one of {', '.join(DFS_MODES)}, got {cfg.dfs_mode!r}{hint}")
    if cfg.faithful not in FAITHFUL:
        raise ValueError(f"faithful must be one of {', '.join(FAITHFUL)}, got {cfg.faithful!r}")
    if cfg.stale_reset_frame is None:
        cfg.stale_reset_frame = cfg.faithful == "code"
    if not isinstance(cfg.stale_reset_frame, bool):
        raise ValueError(f"stale_reset_frame must be true or false, got {cfg.stale_reset_frame!r}")
    if not (cfg.checkpoint_minutes >= 0 and math.isfinite(cfg.checkpoint_minutes)):
        raise ValueError(f"checkpoint_minutes must be a finite number >= 0, got {cfg.checkpoint_minutes}")
    if cfg.faithful == "code":   # the code's choices under anything given explicitly
        from wmbench.world_model.config import code_choices
        choices = code_choices(bf16_native(device))
        if cfg.precision != "auto":     # an explicit --precision is the run's amp choice
            choices.pop("amp")
        cfg.model_overrides = {**choices, **cfg.model_overrides}
    for k, lo, hi in COUNT_RANGES:
        v = getattr(cfg, k)
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise ValueError(f"{k} must be an integer in [{lo:,}, {hi:,}], got {v!r}")
    check_threads(cfg.threads, "threads")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    amp = cfg.model_overrides.get("amp")
    if cfg.precision != "auto" and amp is not None and bool(amp) != (cfg.precision == "bf16"):
        raise ValueError(f"--precision {cfg.precision} contradicts --set amp={amp}; give one of them")
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / "atari" / f"{cfg.game}-{cfg.backbone}-{cfg.sampler}-{cfg.size}-seed{cfg.seed}")
    if cfg.precision == "auto":
        cfg.precision, cfg.auto_choices["precision"] = (_first_start_precision(cfg.run_dir) or
                                                        resolve_precision(device, cfg.model_overrides))
    if cfg.compile is None:
        cfg.compile, cfg.auto_choices["compile"] = resolve_compile(device, model_config(cfg))
    if not isinstance(cfg.compile, bool):
        raise ValueError(f"compile must be true or false, got {cfg.compile!r}")
    if cfg.compile:
        from wmbench.world_model.model import check_compile
        check_compile(device)
    if not (cfg.train_ratio >= 0 and math.isfinite(cfg.train_ratio)):
        raise ValueError(f"train_ratio must be a finite number >= 0, got {cfg.train_ratio}")
    m = model_config(cfg)  # unknown / invalid model overrides raise here
    check_backbone(m)
    need = max(m.batch_length, m.imag_context)
    if cfg.warmup_steps < need:
        raise ValueError(f"warmup_steps must be >= {need} (the longest replay window: batch_length "
                         f"{m.batch_length}, imag_context {m.imag_context}), got {cfg.warmup_steps}")
    if cfg.replay_capacity < need:
        raise ValueError(f"replay_capacity must be >= {need}, got {cfg.replay_capacity}")
    import psutil
    frame = m.image_size * m.image_size * m.image_channels          # uint8 frames, pages touched as it fills
    total = psutil.virtual_memory().total
    if cfg.replay_capacity * frame > total:
        raise ValueError(f"replay_capacity {cfg.replay_capacity:,} needs {cfg.replay_capacity * frame / 2**30:.0f} GiB "
                         f"of frames, more than this machine's {total / 2**30:.0f} GiB of RAM")
    return cfg


def _first_start_precision(run_dir: str) -> tuple[str, str] | None:
    """A resumed run keeps the precision its first start chose automatically (config.json of the run dir,
    else its newest checkpoint): one run never mixes precisions. None for a new run."""
    from wmbench.agent import checkpoint as ckpt
    from wmbench.core.readback import read_json_object
    if not Path(run_dir).is_dir():
        return None                   # a new run (or a path the folder checks refuse, with their message)
    path = Path(run_dir) / "config.json"
    saved = read_json_object(path, "run config").get("train") if path.exists() else None
    if not isinstance(saved, dict):
        saved = (ckpt.peek_meta(run_dir) or {}).get("config")
    if isinstance(saved, dict) and saved.get("precision") in ("fp32", "bf16") \
            and "precision" in (saved.get("auto_choices") or {}):
        return saved["precision"], f"the choice of this run's first start, kept on resume ({run_dir})"
    return None


MAX_STEPS = 10**9          # 1,300 years of updates on a CPU; a typo, not a plan
MAX_SEED = 2**31 - 1       # ALE and gymnasium seed with a signed 32-bit int; derived seeds stay below
# (field, smallest, largest) of every integer option: a value outside is refused with the range
COUNT_RANGES = (("steps", 1, MAX_STEPS), ("seed", 0, MAX_SEED), ("eval_envs", 1, 4096), ("log_every", 1, MAX_STEPS),
                ("warmup_steps", 0, MAX_STEPS), ("eval_every", 0, MAX_STEPS), ("eval_episodes", 0, 10**6),
                ("final_eval_episodes", 0, 10**6), ("checkpoint_every", 0, MAX_STEPS),
                ("replay_capacity", 1, 10**12))   # the RAM check below names the real limit


def check_env_options(cfg: TrainConfig) -> None:
    """Build the environment's settings from `cfg.env_options` the way the run will (no emulator started),
    so a bad value (episode_length=-5) fails here, before --check says the config is fine."""
    from wmbench.tasks.atari import GRIDGOAL, get_protocol
    try:
        if cfg.game == GRIDGOAL:
            from wmbench.tasks.gridgoal import GridGoalEnv
            GridGoalEnv(seed=0, **cfg.env_options)
        else:
            dataclasses.replace(get_protocol(cfg.protocol), **cfg.env_options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--env-option: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_backbone(mcfg) -> None:
    """Build the backbone on the meta device (no memory, no time): unknown `backbone_options` and
    impossible sizes fail before any work."""
    from wmbench.core.registry import create_backbone
    try:
        with torch.device("meta"):
            create_backbone(mcfg.backbone, mcfg.d_model, mcfg.n_layers, **mcfg.backbone_kwargs())
    except TypeError as e:
        raise ValueError(f"backbone {mcfg.backbone!r} does not take these options ({e})") from None


def resolve_size(device: torch.device) -> tuple[str, str]:
    """`--size auto`: the paper's XS where it can finish (a CUDA GPU), else the `cpu` model, which runs
    100k env steps in about a night on a CPU (0.39 s per update with 2 threads on a 2-core AMD EPYC)."""
    if device.type == "cuda":
        return "XS", "a CUDA device: the paper's size"
    return "cpu", ("no CUDA device: the cpu model (frames pooled to 16x16, d_model 128) runs 100k env steps "
                   "in about a night; the paper's XS needs a GPU (force it with --size XS)")


PRECISIONS = ("auto", "fp32", "bf16")
BF16_MIN_SPEEDUP = 1.2    # bf16 autocast is chosen only if it measured at least this much faster


def resolve_precision(device: torch.device, overrides: dict) -> tuple[str, str]:
    """`--precision auto`: bf16 autocast only on a device where it was measured faster than fp32 here
    (a matmul and a convolution of the world model's sizes, `bf16_speedup`). A CPU without native bf16
    (AVX512-BF16 or AMX) is not measured: it emulates bf16, 0.5-0.7x of fp32 on an Intel Xeon."""
    if "amp" in overrides:
        return ("bf16" if overrides["amp"] else "fp32"), "set by --set amp (or --faithful code)"
    if not bf16_native(device):
        return "fp32", "no native bf16 on this device (bf16 would be emulated, slower than fp32)"
    from wmbench.core.choices import cached
    return tuple(cached("precision", device, lambda: _measure_precision(device)))


def _measure_precision(device: torch.device) -> tuple[str, str]:
    speedup = bf16_speedup(device)
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"measured {speedup:.2f}x fp32's speed here (--precision fp32 to turn it off)"
    return "fp32", f"bf16 measured {speedup:.2f}x fp32's speed here, below {BF16_MIN_SPEEDUP}x"


def bf16_speedup(device: torch.device, min_time_s: float = 0.3) -> float:
    """fp32 time / bf16-autocast time of a 1024^3 matmul plus a 5x5 conv (32 frames, 32 -> 48 channels at
    32x32), best of repeats for `min_time_s` each."""
    import time
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(1024, 1024, generator=g).to(device) for _ in range(2))
    x, w = torch.randn(32, 32, 32, 32, generator=g).to(device), torch.randn(48, 32, 5, 5, generator=g).to(device)

    def work():
        a @ b
        torch.nn.functional.conv2d(x, w, padding=2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def best(bf16: bool) -> float:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            work()
            t_end, out = time.perf_counter() + min_time_s, float("inf")
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                work()
                out = min(out, time.perf_counter() - t0)
        return out
    return best(False) / best(True)


COMPILE_MIN_IMAG_BATCH = 128   # the smallest imagination batch where compiling the step was measured to pay


def resolve_compile(device: torch.device, mcfg) -> tuple[bool, str]:
    """`--compile` unset: on where it was measured to pay off. On a Linux CPU with a C++ compiler, the
    compiled step made imagination 1.44x faster at the `cpu` size (0.13 -> 0.09 s, compiled in 7 s) and
    1.14x at XS (7.9 -> 6.9 s, 17 s) with 2 threads on a 2-core AMD EPYC; it is not measured on GPUs
    yet, nor below an imagination batch of 128 (the `tiny` smoke size)."""
    import platform
    from wmbench.world_model.model import cxx_compiler
    if device.type != "cpu":
        return False, "not measured on this device type yet (force with --compile)"
    if platform.system() != "Linux" or cxx_compiler() is None:
        return False, "torch.compile's CPU backend needs Linux and a C++ compiler here"
    if mcfg.imag_batch < COMPILE_MIN_IMAG_BATCH:
        return False, f"imagination batch {mcfg.imag_batch} < {COMPILE_MIN_IMAG_BATCH}, where it was not measured to pay"
    return True, ("a CPU with a C++ compiler; the compiled rollout step measured 1.14-1.44x faster "
                  "imagination (--no-compile turns it off)")


def model_config(cfg: TrainConfig):
    from wmbench.world_model.config import get_preset
    for k, flag in (("backbone", "--backbone"), ("name", "--size")):
        if k in cfg.model_overrides:
            raise ValueError(f"--set {k}=... is not a model option; use {flag}")
    overrides = dict(cfg.model_overrides)
    if "amp" not in overrides and cfg.precision in ("fp32", "bf16"):
        overrides["amp"] = cfg.precision == "bf16"
    return get_preset(cfg.size, backbone=cfg.backbone, **overrides)


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or
    AMX (elsewhere bf16 autocast emulates and runs slower than fp32: 0.5-0.7x measured on an Intel Xeon)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    return False
