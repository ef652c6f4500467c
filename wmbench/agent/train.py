"""`wmbench atari`: train the Drama agent (world model + actor-critic in imagination) on one game.

Reads top to bottom like a CleanRL script. Algorithm 1 of the paper (appendix A.5), per env step:

    1. collect:   a_t ~ π(a | s_t) (random before warm-up), store (O_t, a_t, r_t, e_t) in replay
    2. world model: sample b windows of length l (DFS), one optimiser step (eq. 6-7)
    3. behaviour:   sample b_img contexts of length l_img (DFS), prefill l_img-1 of them, imagine h
                    steps with the actor, one actor-critic step
    4. every `eval_every` steps: evaluate; every `checkpoint_every` steps or `checkpoint_minutes` of
       wall time: checkpoint

Schedule (official code, drama-official-code.md s4): random actions and no updates until the buffer
holds more than `warmup_steps` = 1032 transitions, then `train_ratio` (1.0) world-model updates and
as many agent updates per env step; the Atari100k budget is 100k env steps (400k frames). DFS runs with
the official code's settings by default (wmbench/agent/replay.py explains why the literal formula collapses).

Acting (section 2.3): the policy sees s_t = [ẑ_t, d_{t-1}], ẑ_t sampled from the prior after
re-running the backbone over the last `act_context` real (frame, action) pairs (WorldModel.policy_state;
the official code's "no recurrent cache in the real env"), so acting states are imagination states.
The current frame is not looked at; an episode's first action is random (nothing to predict from).
`policy_latent="posterior"` acts on the current frame's posterior instead. `faithful="code"` switches
every paper-vs-code choice to the code's (wmbench.world_model.config.PAPER_VS_CODE), including, on request of
`stale_reset_frame`, its bug of storing the terminal frame in place of the next reset frame.

Resume: the same command with the same --run-dir continues from the newest checkpoint: models,
optimisers and schedulers, replay buffer (incl. DFS counters and its sampler RNG), python / numpy /
torch RNG states, the acting RNG, step and update counters, the episode log, the acting context and
the environment itself (ALE state incl. its RNG, or the grid world's state), so a resumed run takes
exactly the steps an uninterrupted one would have taken. If an environment cannot be restored
(unknown env class), its current episode restarts instead (the partial episode is closed in replay and
not logged). SIGINT (Ctrl-C) and SIGTERM save a checkpoint at the next step boundary; a second one
aborts at once. One process at a time: a run holds an exclusive lock on RUN_DIR/.lock from before it
reads the run dir until its record is written, and a second process is refused, naming the holder's pid.
A checkpoint that cannot be written (disk full) keeps the previous one: a warning naming both while
training goes on, or, when a signal asked for it, the run stops with that line as its error. Each start
adds its choices (precision, threads, compile and why) to the progress, kept in checkpoints and the record.

The record's headline `score` is the paper's: the mean of the last 5 training episodes. The final
evaluation (100 full greedy games, as the code's eval.py) is a second metric, with its action counts.

Outputs in the run dir: config.json, metrics.jsonl (train / episode / eval rows), tb/ (TensorBoard),
checkpoints/, record.json (also written to --runs-dir for `wmbench report`), .lock. A run is finished
when its record is in both places, once: every start first copies into --runs-dir whatever record the
run dir holds and --runs-dir lacks (a run killed between the two writes, or one whose record fell back
to RUN_DIR/records/ because --runs-dir was full, whose copy there is then removed), and a run whose
record.json is of this --steps stops there ("already finished"). Bad lines in metrics.jsonl are skipped
with a warning when a run resumes; a bad config.json or record is a one-line error naming it.
"""
from __future__ import annotations

import collections
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wmbench.agent import checkpoint as ckpt
from wmbench.agent.acting import env_makers, evaluate, policy_actions
from wmbench.agent.config import TrainConfig, check_config
from wmbench.agent.estimate import UpdateEstimate, estimate_update, fmt_duration, updates_left
from wmbench.agent.run import Run, _refuse_other_config, run_dir_lock
from wmbench.core.measure import finite_or_none, mean_or_nan

# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, progress: bool = True, stop_at: int | None = None,
          estimate: bool = False, force: bool = False) -> dict:
    """Train (or resume) the run `cfg` describes; returns a summary dict.

    stop_at: stop after this env step with a checkpoint, as if killed there (tests, time-boxing).
    force: a finished run (its record exists) evaluates and records again; without it, it returns at once.
    estimate: measure and print a wall-time estimate first; on CPU without cfg.threads, the same
    measurement chooses the thread count (else torch's default is used).
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, progress, stop_at, estimate, force)
    finally:
        torch.set_num_threads(threads)   # cfg.threads is this run's setting, not the process's


def _train(cfg: TrainConfig, show_progress: bool, stop_at: int | None, estimate: bool, force: bool) -> dict:
    t_start = time.perf_counter()          # wall_time counts this session from here: setup included
    cfg = check_config(cfg)
    print(banner(cfg), file=sys.stderr, flush=True)
    with run_dir_lock(Path(cfg.run_dir)):                  # until the record is written
        done = already_finished(cfg, force)
        if done is not None:
            return done
        return _train_locked(cfg, t_start, show_progress, stop_at, estimate)


def already_finished(cfg: TrainConfig, force: bool) -> dict | None:
    """Copy into --runs-dir the records the run dir holds and it lacks (record.complete_records); then the
    summary of a finished run (its record.json is of this --steps), unless `force`; else None."""
    from wmbench.agent import record
    from wmbench.core.records import note_record
    run_dir = Path(cfg.run_dir)
    _refuse_other_config(cfg, run_dir)                     # before trusting the records it holds
    rec, published = record.complete_records(run_dir, cfg.runs_dir)
    if rec is None:
        rec, published = record.find_published(cfg)       # record.json lost to a full run dir
        if rec is not None:
            note_record(published)
    if force or rec is None or rec["config"].get("steps") != cfg.steps:
        return None
    print(f"already finished: {run_dir} ran its {cfg.steps} env steps and its record is {published}; "
          "--force evaluates and records it again", file=sys.stderr)
    return {"run_dir": str(run_dir), "step": cfg.steps, "episodes": len(rec.get("episodes") or []),
            "stopped": False, "already_done": True, "record": str(published)}


def _train_locked(cfg: TrainConfig, t_start: float, show_progress: bool, stop_at: int | None,
                  estimate: bool) -> dict:
    run = Run.start(cfg)                                   # fresh, or resumed from the newest checkpoint
    cfg, p = run.cfg, run.progress
    measure_threads = run.device.type == "cpu" and not cfg.threads
    if measure_threads and reuse_threads(run):
        measure_threads = False
    if estimate and p.step < cfg.steps:
        run.estimate = plan(run, measure_threads).s_per_update
    elif measure_threads:
        cfg.auto_choices["threads"] = f"{torch.get_num_threads()}, torch's default (not measured: no estimate)"
    run.note_start()
    log = RunLog(run, show_progress)
    run.t_session, last_save_t = t_start, time.perf_counter()
    stopped = False
    try:
        with StopFlag() as stop:
            while p.step < cfg.steps:
                collect(run, log)                          # 1. one env step, stored in replay
                update(run, log)                           # 2-3. world model, imagination, actor-critic
                log.step_done(run)                         # 4. train row, progress bar
                if cfg.eval_every and p.step % cfg.eval_every == 0 and p.step < cfg.steps:
                    evaluate_now(run, log)
                stopped = stop.requested or (stop_at is not None and p.step >= stop_at)
                if stopped or p.step == cfg.steps or checkpoint_due(run, last_save_t):
                    checkpoint(run, log, asked=stopped)
                    last_save_t = time.perf_counter()   # a failed one is tried again when due again
                if stopped:
                    break
        log.bar.close()
        if stopped:
            print(f"stopped at env step {p.step}; checkpoint saved in {run.run_dir / 'checkpoints'}; "
                  f"re-run the same command to resume", file=sys.stderr)
            return summary(run, stopped=True)
        return finish(run, log)
    finally:
        log.close()


# ----------------------------------------------------------------------------------------------
# the phases of one env step

def collect(run: Run, log: "RunLog") -> None:
    """a_t (random during warm-up, then sampled from the policy), one env step, store the transition."""
    cfg, p = run.cfg, run.progress
    if len(run.replay) <= cfg.warmup_steps:
        action = int(run.act_rng.integers(run.wm.n_actions))
    else:
        action = int(policy_actions(run.wm, run.agent, [run.ctx], greedy=False, rng=run.act_rng)[0])
    next_obs, reward, term, trunc, info = run.env.step(action)
    run.replay.add(run.store_obs, action, reward, info["done_for_learning"], info.get("life_lost", False),
                   term or trunc)
    p.step += 1
    if term or trunc:
        ep = {"step": p.step, "return": float(info["episode_return"]), "length": int(info["episode_step"])}
        p.episodes.append(ep)
        log.episode(ep)
        run.obs, _ = run.env.reset()
        run.ctx.reset(run.obs)
        # the official code's bug, on request: the terminal frame stands in for the reset frame
        run.store_obs = next_obs if cfg.stale_reset_frame else run.obs
    else:
        run.obs = run.store_obs = next_obs
        run.ctx.push(action, run.obs)


def update(run: Run, log: "RunLog") -> None:
    """After warm-up, `train_ratio` update pairs per env step: world model on b x l windows, then
    imagination from b_img contexts and one actor-critic step (Algorithm 1)."""
    cfg, m, p = run.cfg, run.mcfg, run.progress
    if len(run.replay) > cfg.warmup_steps:
        p.credit += cfg.train_ratio
    while p.credit >= 1.0:
        t0 = time.perf_counter()
        try:
            wm_out = run.wm.train_step(run.replay.sample(m.batch_size, m.batch_length))
            c = run.replay.sample(m.imag_batch, m.imag_context, imagination=True)
            ac_out = run.agent.update(run.wm.imagine(c["obs"], c["action"], run.agent))
        except FloatingPointError as e:
            raise NonFiniteLossError(f"non-finite loss at env step {p.step}, update {p.n_updates + 1}: {e}; "
                                     f"the run stopped and {log.kept()}") from None
        p.update_time_s += time.perf_counter() - t0
        p.credit -= 1.0
        p.n_updates += 1
        log.update({**wm_out, **ac_out, **replay_stats(run.replay)})


def evaluate_now(run: Run, log: "RunLog") -> None:
    cfg = run.cfg
    res = evaluate(run.wm, run.agent, env_makers(cfg)[1], cfg.eval_episodes, cfg.eval_envs, run.mcfg,
                   cfg.eval_greedy, seed=cfg.seed * 1_000_003 + run.progress.step,
                   progress=f"evaluation at step {run.progress.step}" if log.show else None)
    ev = {"step": run.progress.step, "mean": finite_or_none(res.mean), "returns": res.returns,
          "action_counts": res.action_counts}
    run.progress.eval_history.append(ev)
    log.eval(ev)


def checkpoint(run: Run, log: "RunLog", asked: bool) -> None:
    """Save a checkpoint. One that cannot be written (disk full) keeps the previous one: a warning while
    training goes on (the run can still finish and record), the run's error when a stop `asked` for it."""
    try:
        run.save()
    except OSError as e:
        msg = (f"could not write checkpoint {ckpt.step_dir(run.run_dir, run.progress.step)} "
               f"({e.strerror or e}); {log.kept()}")
        if asked:
            raise ckpt.CheckpointNotSaved(msg) from None
        print(f"warning: {msg}; training goes on", file=sys.stderr)
    else:
        log.last_checkpoint = run.progress.step


def checkpoint_due(run: Run, last_save_t: float) -> bool:
    cfg = run.cfg
    return bool((cfg.checkpoint_every and run.progress.step % cfg.checkpoint_every == 0) or
                (cfg.checkpoint_minutes and time.perf_counter() - last_save_t >= 60 * cfg.checkpoint_minutes))


def finish(run: Run, log: "RunLog") -> dict:
    """The final evaluation (full games, greedy) and the run record, in --runs-dir and the run dir."""
    from wmbench.agent.record import PENDING, record_name, run_record
    from wmbench.core.records import save_record, write_record
    cfg = run.cfg
    final = evaluate(run.wm, run.agent, env_makers(cfg)[1], cfg.final_eval_episodes, cfg.eval_envs, run.mcfg,
                     cfg.eval_greedy, seed=cfg.seed * 1_000_003 + 10**9,
                     progress="final evaluation" if log.show else None)
    log.writer.add_scalar("eval/final_return", final.mean, run.progress.step)
    rec = run_record(run, final)
    try:
        write_record(rec, run.run_dir, name="record", overwrite=True)   # the run dir's latest record
    except OSError as e:
        print(f"warning: could not write {run.run_dir / 'record.json'} ({e.strerror or e})", file=sys.stderr)
    # a kill from here on, or a full --runs-dir, leaves the record for the next start to complete
    path = save_record(rec, cfg.runs_dir, name=record_name(rec), fallbacks=(run.run_dir / PENDING,))
    return {**summary(run, stopped=False), "record": str(path), "final_eval_return": final.mean,
            "score": rec["metrics"]["score"]["value"], "metrics": rec["metrics"],
            "final_eval_action_fractions": final.action_fractions()}


def summary(run: Run, stopped: bool) -> dict:
    p = run.progress
    return {"run_dir": str(run.run_dir), "step": p.step, "updates": p.n_updates, "episodes": len(p.episodes),
            "stopped": stopped}


# ----------------------------------------------------------------------------------------------
# logging: metrics.jsonl, TensorBoard, the progress bar

class RunLog:
    """Train rows every `log_every` env steps (means over the updates since the last row), episode and
    evaluation rows, to metrics.jsonl and TensorBoard; the progress bar."""

    def __init__(self, run: Run, show_progress: bool):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        cfg, p = run.cfg, run.progress
        self.writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=p.step if p.step else None)
        self.jsonl = open(run.run_dir / "metrics.jsonl", "a")
        self.window: dict[str, list] = collections.defaultdict(list)   # train metrics since the last row
        self.step0, self.updates0, self.t0 = p.step, p.n_updates, time.perf_counter()
        self.update_time0 = p.update_time_s
        self.last_checkpoint = run.resumed_from
        self.ckpt_dir = ckpt.ckpt_root(run.run_dir)
        self.show = show_progress
        self.human_norm = None
        if cfg.game != "gridgoal":
            from wmbench.tasks.atari import human_normalized
            self.human_norm = lambda score: human_normalized(cfg.game, score)  # noqa: E731
        self.bar = tqdm(total=cfg.steps, initial=p.step, disable=not show_progress, unit="step",
                        dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]", desc=f"{cfg.game} {cfg.backbone}/{cfg.sampler}/{cfg.size}",
                        file=sys.stderr)

    def kept(self) -> str:
        """Which checkpoint a failure leaves the run with."""
        if self.last_checkpoint is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint (env step {self.last_checkpoint}) in {self.ckpt_dir} is kept"

    def _row(self, row: dict) -> None:
        # strict JSON (NaN as null): a resume reads the log back with wmbench.core.readback
        row = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def episode(self, ep: dict) -> None:
        self._row({"type": "episode", **ep})
        self.writer.add_scalar("episode/return", ep["return"], ep["step"])
        if self.human_norm is not None:
            self.writer.add_scalar("episode/human_normalized", self.human_norm(ep["return"]), ep["step"])

    def update(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.window[k].append(v)

    def eval(self, ev: dict) -> None:
        self._row({"type": "eval", **ev})
        if ev["returns"]:
            self.writer.add_scalar("eval/return", ev["mean"], ev["step"])

    def step_done(self, run: Run) -> None:
        cfg, p = run.cfg, run.progress
        el = max(time.perf_counter() - self.t0, 1e-9)
        sps, ups = (p.step - self.step0) / el, (p.n_updates - self.updates0) / el
        if p.step % cfg.log_every == 0 or p.step == cfg.steps:
            row = {"type": "train", "step": p.step, "updates": p.n_updates, "env_steps_per_s": sps,
                   "updates_per_s": ups, **{k: mean_or_nan(v) for k, v in self.window.items()}}
            self._row(row)
            for k, v in row.items():
                if k not in ("type", "step"):
                    group = ("perf/" if k.endswith("_per_s") or k == "updates" else
                             "replay/" if k.startswith("replay_") else "train/")
                    self.writer.add_scalar(group + k, v, p.step)
            self.window.clear()
        if self.show and (p.step % 10 == 0 or p.step == cfg.steps):
            last = p.episodes[-1]["return"] if p.episodes else float("nan")
            last5 = mean_or_nan([e["return"] for e in p.episodes[-5:]])
            self.bar.set_postfix_str(f"sps={sps:.1f} ups={ups:.2f} ret={last:.1f} ret5={last5:.1f} "
                                     f"eta={fmt_duration(self.eta(run))}", refresh=False)
        self.bar.update(1)

    def eta(self, run: Run) -> float:
        """Seconds left: updates left at this session's measured s/update (the estimate until 3 updates
        are done), plus env steps left at this session's acting pace (wall time outside updates)."""
        cfg, p = run.cfg, run.progress
        done = p.n_updates - self.updates0
        s_upd = ((p.update_time_s - self.update_time0) / done if done >= 3 else run.estimate) or 0.0
        steps = max(p.step - self.step0, 1)
        s_act = max(time.perf_counter() - self.t0 - (p.update_time_s - self.update_time0), 0.0) / steps
        return updates_left(cfg, p.step) * s_upd + (cfg.steps - p.step) * s_act

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        self.writer.close()


def replay_stats(replay) -> dict[str, float]:
    """The samplers' health for the logs: effective sample size 1 / sum(p^2) of the last draw of each
    sampler and its number of window starts, the largest use counters (v: world model, b: imagination)
    and whether a batch had to be drawn with replacement."""
    out = {}
    for kind, st in replay.last_stats.items():
        out[f"replay_{kind}_ess"] = st["ess"]
        out[f"replay_{kind}_starts"] = st["starts"]
        out[f"replay_{kind}_max_count"] = st["max_count"]
        out[f"replay_{kind}_with_replacement"] = st["with_replacement"]
    return out




# ----------------------------------------------------------------------------------------------
# stopping, and what is about to run

class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm went NaN/inf: the run stops, the last checkpoint is kept."""


class StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (kill, a scheduler's pre-emption): finish the current step, checkpoint,
    exit. A second signal aborts at once (the last checkpoint stays as it was)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
              "(send it again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def banner(cfg: TrainConfig) -> str:
    """What is about to run, and what each automatic choice became and why (before any slow step)."""
    sampler = f"dfs ({cfg.dfs_mode})" if cfg.sampler == "dfs" else cfg.sampler
    lines = [f"wmbench atari: {cfg.game}, {cfg.backbone}, {sampler}, size {cfg.size}, {cfg.steps:,} env steps, "
             f"seed {cfg.seed}, device {cfg.device}, faithful to the {cfg.faithful}"]
    for k in ("size", "device", "precision", "compile"):
        if k in cfg.auto_choices:
            value = {True: "on", False: "off"}.get(getattr(cfg, k), getattr(cfg, k))
            lines.append(f"  {k} auto -> {value}: {cfg.auto_choices[k]}")
    lines.append(f"  run dir {cfg.run_dir} (re-run the same command to resume); record to {cfg.runs_dir}/")
    if cfg.warmup_steps >= cfg.steps:
        lines.append(f"warning: --steps {cfg.steps} ends inside the warm-up ({cfg.warmup_steps} random-action "
                     "steps): nothing will be trained")
    return "\n".join(lines)


def _threads_choice(run: Run) -> str:
    """The choice cache's key for the thread count: it depends on the model and the cores we may use."""
    import hashlib
    from wmbench.agent.estimate import usable_cores
    model = hashlib.sha256(json.dumps(run.mcfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"threads|{usable_cores()} cores|model {model}"


def reuse_threads(run: Run) -> bool:
    """An automatic thread count made before is used again, not measured again: a resumed run's first
    start's, else this machine's for this model (wmbench/core/choices.py). True if one was set."""
    from wmbench.core.choices import lookup
    first = run.progress.starts[0] if run.progress.starts else {}
    if "threads" in first.get("auto_choices", {}) and isinstance(first.get("threads"), int):
        n, why = first["threads"], "the choice of this run's first start, kept on resume"
    else:
        hit = lookup(_threads_choice(run), run.device)
        if hit is None or not isinstance(hit[0], int) or hit[0] < 1:
            return False
        n, why = hit
    torch.set_num_threads(n)
    run.cfg.auto_choices["threads"] = f"{n}, {why}"
    print(f"  threads auto -> {n}: {why}", file=sys.stderr)
    return True


def plan(run: Run, measure_threads: bool) -> UpdateEstimate:
    """Measure seconds per update (and, on CPU without --threads, the thread count to use); print it."""
    cfg = run.cfg
    print("  measuring one update at 1/16, 1/8, ... of the batch" + (" with 1 and all threads" if measure_threads
          else "") + " ...", file=sys.stderr, flush=True)
    est = estimate_update(run.mcfg, tuple(run.env.observation_space.shape), run.wm.n_actions, run.device,
                          threads=None if measure_threads else torch.get_num_threads())
    if measure_threads:
        torch.set_num_threads(est.threads)
        timings = ", ".join(f"{n}: {t:.3f} s" for n, t in sorted(est.by_threads.items()))
        at = "the full batch" if est.threads_at == 1.0 else f"{est.threads_at:g} of the batch"
        cfg.auto_choices["threads"] = f"{est.threads}, the fastest update at {at} ({timings})"
        print(f"  threads -> {est.threads} (one update at {at}: {timings})", file=sys.stderr)
        from wmbench.core.choices import remember
        remember(_threads_choice(run), run.device, est.threads, f"the fastest update at {at} ({timings})")
    n_left = updates_left(cfg, run.progress.step)
    largest = max(est.by_fraction) if est.by_fraction else 1.0
    basis = "timed at the full batch" if largest == 1.0 else f"extrapolated from batch fractions up to {largest:g}"
    print(f"  estimate: {est.s_per_update:.2f} s per update ({basis}) x {n_left:,.0f} updates left = about "
          f"{fmt_duration(est.s_per_update * n_left)} of training, plus acting and evaluation "
          f"(measured in {est.measure_s:.1f} s; the progress bar's eta follows the real pace)", file=sys.stderr)
    return est
