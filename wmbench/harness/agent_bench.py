"""`wmbench bench --agent`: the Drama agent's update and acting, phase by phase, for each backbone.

One cell per backbone (a fresh process: its peak memory is its own). On random frames of the real
shapes (the preset's batch, sequence, imagination and acting sizes), after `warmup` untimed updates,
`iters` timed ones, each split into:

    world-model update      wm.train_step on b x l windows (forward, eq. 6-7 loss, backward, optimiser)
    imagination: context    encoding the b_img x l_img context frames (posterior latents)
    imagination: rollout    prefill + h imagined steps with the actor (imagine() minus the context part)
    actor-critic update     losses, backward, optimiser on the imagined trajectories
    acting                  one env step's action from the acting context (batch 1), ms per env step

FLOPs of one update (torch.utils.flop_counter) over its median time give the achieved rate, and its
fraction of the dense matmul rate measured here with the same threads. This is the paper's imagination
wall-clock claim measured backbone by backbone inside the agent.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from wmbench.core import allocator
from wmbench.core.errors import UserError
from wmbench.core.measure import PeakMemory, median, metric
from wmbench.core.registry import BACKBONES, BUILTIN_BACKBONES
from wmbench.harness.cells import matmul_peak, run_cell_subprocess, save_cells_record, tick

PHASES = ("wm_update", "imagine_context", "imagine_rollout", "ac_update")


@dataclass
class AgentBenchConfig:
    backbones: list[str] = field(default_factory=lambda: list(BUILTIN_BACKBONES))
    size: str = "cpu"
    device: str = "cpu"
    threads: int = 0              # torch CPU threads in each cell (0: torch's default)
    warmup: int = 1               # untimed updates first
    iters: int = 3                # timed updates
    act_iters: int = 20           # timed acting steps
    seed: int = 0
    n_actions: int = 18           # Atari's full action set
    replay_capacity: int = 100_000  # a full replay buffer of the run's size is in memory (0: none); the
                                    # batches are sampled from it by the run's DFS sampler
    compile: bool | None = None   # torch.compile the rollout step as `wmbench atari` does (None: its auto choice)
    precision: str = "auto"       # fp32, bf16 (autocast) or auto: `wmbench atari`'s choice on this device


def check_agent_bench_config(cfg: AgentBenchConfig) -> None:
    from wmbench.core.device import resolve_device
    from wmbench.world_model import get_preset
    if not cfg.backbones:
        raise UserError("--backbones is empty; valid choices: " + ", ".join(BACKBONES.names()))
    for name in cfg.backbones:
        BACKBONES.get(name)
        get_preset(cfg.size, backbone=name)    # unknown size, or a size the backbone cannot take
    for flag, v, lo in (("--iters", cfg.iters, 1), ("--warmup", cfg.warmup, 0), ("--threads", cfg.threads, 0),
                        ("--replay-capacity", cfg.replay_capacity, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise UserError(f"{flag} must be an integer >= {lo}, got {v!r}")
    dev = resolve_device(cfg.device)
    from wmbench.agent.config import PRECISIONS
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.compile is not None and not isinstance(cfg.compile, bool):
        raise UserError(f"compile must be true, false or unset, got {cfg.compile!r}")
    if cfg.compile:
        from wmbench.world_model.model import check_compile
        try:
            check_compile(dev)
        except ValueError as e:
            raise UserError(str(e)) from None


def full_replay(cfg: AgentBenchConfig, m, obs_shape: tuple):
    """A replay buffer of the run's capacity, every slot written (so its pages are resident, as at the end
    of a run), with random frames and actions."""
    from wmbench.agent.replay import make_replay
    rng = np.random.default_rng(cfg.seed)
    replay = make_replay("dfs", cfg.replay_capacity, batch_size=m.batch_size, imagine_batch_size=m.imag_batch,
                         seed=cfg.seed)
    block = rng.integers(0, 256, (min(1000, cfg.replay_capacity),) + obs_shape, dtype=np.uint8)
    for i in range(0, cfg.replay_capacity, len(block)):
        n = min(len(block), cfg.replay_capacity - i)
        replay.obs[i:i + n] = block[:n]
    replay.action[:] = rng.integers(0, cfg.n_actions, cfg.replay_capacity)
    replay.size = replay.n_added = cfg.replay_capacity
    replay.ptr = 0
    return replay


def ticks_per_cell(cfg: AgentBenchConfig) -> int:
    return cfg.warmup + cfg.iters + 2          # + the FLOP count and the acting steps


def run_cell(cfg: AgentBenchConfig, backbone: str) -> dict:
    """Measure one backbone in this process; returns metrics."""
    from wmbench.agent import ActorCritic
    from wmbench.agent.acting import ActingContext, policy_actions
    from wmbench.agent.estimate import random_batches
    from wmbench.world_model import WorldModel, get_preset
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    m = get_preset(cfg.size, backbone=backbone)
    precision, precision_why = cfg.precision, f"--precision {cfg.precision} given"
    if precision == "auto":   # the same choice as `wmbench atari` makes on this device
        from wmbench.agent.config import resolve_precision
        precision, precision_why = resolve_precision(dev, {})
    m.amp = precision == "bf16"
    obs_shape = (m.image_size, m.image_size, m.image_channels)
    with PeakMemory(dev) as mem:
        wm, ac = WorldModel(m, cfg.n_actions).to(dev), ActorCritic(m, cfg.n_actions).to(dev)
        batch, (ctx_obs, ctx_act) = random_batches(m, obs_shape, cfg.n_actions, 1.0)
        replay = full_replay(cfg, m, obs_shape) if cfg.replay_capacity else None
        sample_s = []

        def draw():
            nonlocal batch, ctx_obs, ctx_act
            if replay is not None:
                t = time.perf_counter()
                batch = replay.sample(m.batch_size, m.batch_length)
                ctx = replay.sample(m.imag_batch, m.imag_context, imagination=True)
                ctx_obs, ctx_act = ctx["obs"], ctx["action"]
                sample_s.append(time.perf_counter() - t)
        n_ctx = m.imag_context - 1 if m.imagine_start == "paper" else m.imag_context

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def update() -> dict[str, float]:
            draw()
            t = {}
            t0 = time.perf_counter()
            wm.train_step(batch)
            sync()
            t1 = time.perf_counter()
            wm.eval()
            with torch.no_grad():
                wm.encode(torch.as_tensor(ctx_obs[:, :n_ctx], device=dev), conv_amp=bool(wm.cfg.amp))  # as imagine()
            wm.train()
            sync()
            t2 = time.perf_counter()
            img = wm.imagine(ctx_obs, ctx_act, ac)
            sync()
            t3 = time.perf_counter()
            ac.update(img)
            sync()
            t4 = time.perf_counter()
            t["wm_update"], t["imagine_context"] = t1 - t0, t2 - t1
            t["imagine_rollout"], t["ac_update"] = max((t3 - t2) - (t2 - t1), 0.0), t4 - t3
            return t

        # FLOPs first, on the eager step (the counter sees every op; a compiled step hides them), and
        # as the model computes them (lean_conv.model_flops): the bound counts its work, not our extra
        from torch.utils.flop_counter import FlopCounterMode

        from wmbench.world_model import lean_conv
        with lean_conv.model_flops(), FlopCounterMode(display=False) as fc:
            wm.train_step(batch)
            ac.update(wm.imagine(ctx_obs, ctx_act, ac))
        flops = int(fc.get_total_flops())
        tick()
        compiled, compile_why = cfg.compile, "--compile given" if cfg.compile else "--no-compile given"
        if compiled is None:   # the same choice as `wmbench atari` makes on this device and size
            from wmbench.agent.config import resolve_compile
            compiled, compile_why = resolve_compile(dev, m)
        if compiled:
            wm.compile_rollout()   # compiles in the first warm-up update
        for _ in range(cfg.warmup):
            update()
            tick()
        runs = []
        for _ in range(cfg.iters):
            runs.append(update())
            tick()

        rng = np.random.default_rng(cfg.seed)
        ctx = ActingContext.for_model(m)
        ctx.reset(rng.integers(0, 256, obs_shape, dtype=np.uint8))
        while len(ctx.obs) < ctx.T:
            ctx.push(int(rng.integers(cfg.n_actions)), rng.integers(0, 256, obs_shape, dtype=np.uint8))
        act_times = []
        for i in range(cfg.act_iters + 2):
            t0 = time.perf_counter()
            policy_actions(wm, ac, [ctx], greedy=False, rng=rng)
            sync()
            if i >= 2:
                act_times.append(time.perf_counter() - t0)
        tick()

    out = {}
    for ph in PHASES:
        out[ph] = metric(1e3 * median([r[ph] for r in runs]), "ms", f"median of {cfg.iters} updates after "
                         f"{cfg.warmup} untimed", samples_ms=[1e3 * r[ph] for r in runs])
    total = median([sum(r.values()) for r in runs])
    out["update"] = metric(1e3 * total, "ms", "median of the summed phases")
    out["acting"] = metric(1e3 * median(act_times), "ms per env step",
                           f"median of {cfg.act_iters} policy_actions calls on a full acting context "
                           f"({m.act_context} frames), batch 1")
    out["peak_memory"] = metric(mem.peak_bytes, "bytes", mem.method + (
        f", replay buffer of {cfg.replay_capacity:,} frames included" if replay is not None else ""))
    if replay is not None:
        out["replay_bytes"] = metric(int(replay.obs.nbytes), "bytes", "the replay buffer's frames (full)")
        out["replay_sample"] = metric(1e3 * median(sample_s), "ms", "median DFS draw + gather of one world-model "
                                      "batch and one imagination context batch (not in the phases)")
    out["update_flops"] = metric(flops, "FLOP", "torch.utils.flop_counter over one world-model update, "
                                 "imagination and actor-critic update (the model's FLOPs: recomputation and "
                                 "zero taps not counted)")
    out["achieved_flops"] = metric(flops / total, "FLOP/s", "update_flops / median update time")
    out["n_params"] = metric(wm.param_counts()["total"] + sum(p.numel() for p in ac.parameters()),
                             "parameters", "world model + actor-critic")
    out["threads"] = metric(torch.get_num_threads(), "threads", "torch.get_num_threads() in the cell")
    out["compiled"] = metric(bool(compiled), "bool", f"torch.compile of the rollout step: {compile_why}")
    rollout = "bf16 autocast" if wm.rollout_amp else "fp32"
    out["precision"] = metric(precision, "", f"training, acting and context-encoding precision (the rollout: "
                              f"{rollout}): {precision_why}")
    return out


def run_agent_bench(cfg: AgentBenchConfig, runs_dir="results/runs", progress: bool = True) -> tuple[dict, str]:
    from tqdm import tqdm

    check_agent_bench_config(cfg)
    results = {}
    # the dense matmul rates, before and after the cells: on a shared host one measurement can read 30%
    # low (98-202 GFLOP/s fp32 within an hour on one 2-core EPYC), which would flatter every ratio to it
    dtypes = (torch.float32,) if cfg.precision == "fp32" else (torch.float32, torch.bfloat16)
    rates = {dt: [matmul_peak(cfg.device, dt, cfg.threads)] for dt in dtypes}
    bar = tqdm(total=len(cfg.backbones) * ticks_per_cell(cfg), desc="bench --agent", disable=not progress,
               unit="step", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    for i, b in enumerate(cfg.backbones):
        bar.set_postfix_str(f"{b} at {cfg.size}")
        results[b] = run_cell_subprocess("wmbench.harness.agent_bench",
                                         {"cfg": asdict(cfg), "backbone": b, "malloc": allocator.active()},
                                         on_tick=lambda: bar.update(1))
        bar.n = (i + 1) * ticks_per_cell(cfg)
        bar.refresh()
    bar.close()
    for dt in rates:
        rates[dt].append(matmul_peak(cfg.device, dt, cfg.threads))
    how = "the best of two measurements (before and after the cells), each the best of repeated 1024^3 {} matmuls"
    fp32_rate, bf16_rate = max(rates[torch.float32]), max(rates.get(torch.bfloat16, [0.0]))
    metrics = {"matmul_throughput": metric(fp32_rate, "FLOP/s", how.format("fp32"), samples=rates[torch.float32])}
    if any(c.get("precision", {}).get("value") == "bf16" for c in results.values()):
        # recorded only where a cell ran bf16 (--precision auto measures it in case one does)
        metrics["matmul_throughput_bf16"] = metric(bf16_rate, "FLOP/s", how.format("bf16"),
                                                   samples=rates[torch.bfloat16])
    for cell in results.values():
        if "error" not in cell:
            bf16 = cell.get("precision", {}).get("value") == "bf16"
            flops, update_s = cell["update_flops"]["value"], cell["update"]["value"] / 1e3
            rate = bf16_rate if bf16 else fp32_rate
            cell["fraction_of_matmul_peak"] = metric(cell["achieved_flops"]["value"] / rate, "fraction",
                                                     f"achieved FLOP/s / measured dense {'bf16' if bf16 else 'fp32'} "
                                                     "matmul FLOP/s")
            # the FLOP bound: the update's FLOPs at a dense matmul rate. fp32's (sgemm) is the same yardstick
            # whatever precision a cell chose; bf16's says how close a bf16 cell comes to that precision's peak
            cell["x_fp32_bound"] = metric(update_s / (flops / fp32_rate), "ratio",
                                          "median update time / (update_flops / fp32 matmul rate)")
            if bf16:
                cell["x_bf16_bound"] = metric(update_s / (flops / bf16_rate), "ratio",
                                              "median update time / (update_flops / bf16 matmul rate)")
    metrics["cells"] = results
    return save_cells_record("agent-bench", asdict(cfg), metrics, cfg.device, cfg.threads, runs_dir,
                             f"agent-bench-{cfg.size}")


def _cell_main(payload: str) -> None:
    d = json.loads(payload)
    allocator.configure(d["malloc"])
    print(json.dumps(run_cell(AgentBenchConfig(**d["cfg"]), d["backbone"])))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", required=True)
    _cell_main(ap.parse_args().cell)
