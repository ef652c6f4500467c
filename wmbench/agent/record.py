"""The run record of `wmbench atari` (the paper's score first, the final evaluation second, every
paper-vs-code choice), the summary lines printed at the end of a run, and the completion of records a
run dir holds but --runs-dir lacks (a kill between the two writes, a full runs dir)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from wmbench.agent.acting import EvalResult
from wmbench.agent.config import TrainConfig
from wmbench.core.measure import finite_or_none, mean_or_nan


SCORE_METHOD = ("mean return of the last 5 training episodes: the paper's score (a 5-episode running "
                "average of training performance, Machado et al. 2018, read at the end of training; the "
                "paper reports its mean over 5 seeds per game)")


def run_record(run, final: EvalResult) -> dict:
    """The record of a finished run (wmbench.agent.run.Run) and its final evaluation."""
    from wmbench.core.records import make_record
    from wmbench.tasks.atari import ale_version
    from wmbench.world_model.config import PAPER_VS_CODE
    cfg, mcfg, p = run.cfg, run.mcfg, run.progress
    episodes, step, n_updates, elapsed = p.episodes, p.step, p.n_updates, run.elapsed()   # eval included
    rets = [e["return"] for e in episodes]
    late = [e["return"] for e in episodes if e["step"] > cfg.steps - 2500]   # last 10k frames (DreamerV3)
    score = mean_or_nan(rets[-5:])
    how = "greedy" if cfg.eval_greedy else "sampled"
    fr = final.action_fractions()
    metrics: dict[str, dict] = {
        "score": {"value": finite_or_none(score), "unit": "return", "n": len(rets[-5:]), "method": SCORE_METHOD},
        "final_eval_return": {"value": finite_or_none(final.mean), "unit": "return", "n": len(final.returns),
                              "std": finite_or_none(float(np.std(final.returns))) if final.returns else None,
                              "method": f"mean over {len(final.returns)} full games of the final model, {how} "
                                        "actions, separate env seeds (the official eval.py's protocol)"},
        "final_eval_top_action_fraction": {
            "value": finite_or_none(max(fr)) if fr else None, "unit": "fraction",
            "method": "share of the final evaluation's steps taken with its most frequent action "
                      "(near 1: the policy is stuck on one action)"},
        "train_return_last_10k_frames": {"value": finite_or_none(mean_or_nan(late)), "unit": "return", "n": len(late),
                                         "method": "mean of training episodes ending in the last 2500 env "
                                                   "steps (DreamerV3's Atari100k score)"},
        "env_steps_per_s": {"value": step / max(elapsed, 1e-9), "unit": "steps/s",
                            "method": "env steps / wall time of the whole run (acting + updates + eval), "
                                      "all sessions"},
        "updates_per_s": {"value": n_updates / max(elapsed, 1e-9), "unit": "updates/s",
                          "method": "(world-model + agent) update pairs / wall time of the whole run"},
        "s_per_update": {"value": p.update_time_s / max(n_updates, 1), "unit": "s",
                         "method": "mean wall time of one world-model update + imagination + agent update"},
        "wall_time": {"value": elapsed, "unit": "s",
                      "method": "sum over sessions (resumes), each from the command's start (setup, "
                                "estimate, training, the final evaluation)"},
    }
    choices = [{"field": f, "value": getattr(mcfg, f), "paper": p, "code": c, "what": what}
               for f, p, c, what in PAPER_VS_CODE]
    choices += [{"field": "dfs_mode", "value": cfg.dfs_mode, "paper": "official", "code": "official",
                 "what": "DFS as the official code ran it (the paper's numbers); 'literal': s2.4 as printed"},
                {"field": "stale_reset_frame", "value": cfg.stale_reset_frame, "paper": False, "code": True,
                 "what": "the code's bug: the terminal frame stored in place of the next reset frame"}]
    extra: dict[str, Any] = {"episodes": episodes, "eval_history": p.eval_history,
                             "final_eval": {"returns": final.returns, "lengths": final.lengths,
                                            "action_counts": final.action_counts, "action_fractions": fr},
                             "faithful": cfg.faithful, "paper_vs_code": choices,
                             "parameters": run.wm.param_counts(), "run_dir": str(run.run_dir),
                             "starts": p.starts}
    if cfg.game == "gridgoal":
        from wmbench.tasks import gridgoal
        g = run.env
        kw = dict(episode_length=g.episode_length, grid_size=g.grid_size)
        rnd, opt = gridgoal.expected_return("random", **kw), gridgoal.expected_return("optimal", **kw)
        metrics["random_return"] = {"value": rnd, "unit": "return", "method": "exact expectation (Markov chain)"}
        metrics["optimal_return"] = {"value": opt, "unit": "return", "method": "exact expectation (Markov chain)"}
        metrics["score_over_random"] = {"value": finite_or_none(score / rnd), "unit": "ratio", "method": "score / random_return"}
        metrics["final_eval_over_random"] = {"value": finite_or_none(final.mean / rnd), "unit": "ratio",
                                             "method": "final_eval_return / random_return"}
        extra["protocol"] = g.config()
    else:
        from wmbench.tasks.atari import human_normalized, protocol_dict
        human_norm = lambda x: human_normalized(cfg.game, x)  # noqa: E731
        hns = "(x - random) / (human - random), wmbench/data/atari100k_scores.csv"
        metrics["score_human_normalized"] = {"value": finite_or_none(human_norm(score)), "unit": "fraction",
                                             "method": f"the score's {hns}"}
        metrics["final_eval_human_normalized"] = {"value": finite_or_none(human_norm(final.mean)), "unit": "fraction",
                                                  "method": f"the final evaluation's {hns}"}
        extra["protocol"] = protocol_dict(cfg.protocol)
        extra["protocol"].update(cfg.env_options)
        extra["eval_protocol"] = {**extra["protocol"], "break_on_life_loss": False}
        extra["action_meanings"] = run.env.action_meanings
    extra["ale_py_version"] = ale_version()
    config = {**cfg.to_dict(), "model": mcfg.to_dict()}
    return make_record("atari", config, metrics, extra=extra, device=run.device)


PENDING = "records"   # RUN_DIR/records/: records --runs-dir could not take (save_record's fallback)


def record_name(rec: dict) -> str:
    """A record's file name in --runs-dir (without .json): fixed by the record, so a re-run finds it."""
    c = rec["config"]
    stamp = rec["created_at"].replace(":", "").replace("-", "")[:15]
    return f"atari-{c['game']}-{c['backbone']}-{c['sampler']}-{c['size']}-seed{c['seed']}-{stamp}"


def read_run_record(path: Path) -> dict:
    """An atari run record written by `finish`; one-line UserError naming `path` if it is not one."""
    from wmbench.core.errors import UserError
    from wmbench.core.readback import read_json_object
    from wmbench.core.records import validate_record
    rec = read_json_object(path, "run record")
    try:
        validate_record(rec)
        if rec["kind"] != "atari" or not isinstance(rec.get("created_at"), str):
            raise ValueError("not the record of a wmbench atari run")
        record_name(rec)
    except KeyError as e:
        raise UserError(f"run record {path} is unusable (its config lacks {e}); restore it or delete it") from None
    except ValueError as e:
        raise UserError(f"run record {path} is unusable ({e}); restore it or delete it") from None
    return rec


def published_copy(rec: dict, runs_dir) -> Path | None:
    """The file in `runs_dir` holding exactly `rec`: NAME.json, or NAME-N.json (write_record's names when
    NAME.json was taken), or None."""
    from wmbench.core.readback import loads, regular_file
    name = record_name(rec)
    for path in [Path(runs_dir) / f"{name}.json", *sorted(Path(runs_dir).glob(f"{name}-*.json"))]:
        try:
            if regular_file(path) and loads(path.read_bytes()) == rec:
                return path
        except (OSError, ValueError, UnicodeDecodeError):
            continue     # unreadable: not our copy
    return None


def publish(rec: dict, source: Path, runs_dir) -> Path:
    """Make sure `rec` (read from `source`) is in `runs_dir`: the copy there, or a new one written
    atomically (said in one line). Either way the sweep that started us gets its receipt (note_record).
    RecordNotSaved (exit 1) when `runs_dir` cannot take it: it stays in `source` for the next re-run."""
    from wmbench.core.records import RecordNotSaved, note_record, write_record
    path = published_copy(rec, runs_dir)
    if path is None:
        try:
            path = write_record(rec, runs_dir, name=record_name(rec))
        except OSError as e:
            raise RecordNotSaved(f"could not write the record {source} to {runs_dir} ({e.strerror or e}); "
                                 "it stays there: re-run the same command once there is space", source) from None
        print(f"wrote the missing record {path} (a copy of {source})", file=sys.stderr)
    note_record(path)
    return path


def find_published(cfg: TrainConfig) -> tuple[dict | None, Path | None]:
    """The newest record in --runs-dir of this run dir at this --steps, for a run whose record.json could
    not be written (a full run dir) while --runs-dir took the record: without it, a re-run would evaluate
    and record the run a second time. record.json is restored from it where possible."""
    from wmbench.core.readback import read_json_object
    from wmbench.core.records import write_record
    prefix = f"atari-{cfg.game}-{cfg.backbone}-{cfg.sampler}-{cfg.size}-seed{cfg.seed}-"
    found = []
    for path in Path(cfg.runs_dir).glob(prefix + "*.json"):
        try:
            rec = read_json_object(path, "record")
        except ValueError:
            continue                 # unreadable: the report names it; not this run's proof
        if rec.get("run_dir") == str(cfg.run_dir) and (rec.get("config") or {}).get("steps") == cfg.steps:
            found.append((str(rec.get("created_at", "")), path, rec))
    if not found:
        return None, None
    _, path, rec = max(found)
    try:
        write_record(rec, cfg.run_dir, name="record", overwrite=True)
    except OSError as e:
        print(f"warning: could not restore {Path(cfg.run_dir) / 'record.json'} ({e.strerror or e})", file=sys.stderr)
    return rec, path


def complete_records(run_dir: Path, runs_dir) -> tuple[dict | None, Path | None]:
    """Every record the run dir holds, made sure to be in `runs_dir` (once): RUN_DIR/record.json, and each
    pending fallback in RUN_DIR/records/, which is removed once it is there. Returns the run dir's
    record.json and its copy in `runs_dir`, or (None, None) if it has none."""
    latest, rec, published = run_dir / "record.json", None, None
    if os.path.lexists(latest):
        rec = read_run_record(latest)
        published = publish(rec, latest, runs_dir)
    for pending in sorted((run_dir / PENDING).glob("*.json")):
        publish(read_run_record(pending), pending, runs_dir)
        pending.unlink()
    return rec, published


def summary_lines(cfg: TrainConfig, summary: dict) -> list[str]:
    m = summary["metrics"]
    v = lambda name, d=2: "n/a" if m[name]["value"] is None else f"{m[name]['value']:.{d}f}"  # noqa: E731
    head = (f"{cfg.game} {cfg.backbone}/{cfg.sampler}/{cfg.size} seed {cfg.seed}: score {v('score')} "
            f"(mean of the last {m['score']['n']} training episodes, as the paper reports)")
    if "score_human_normalized" in m:
        head += f", human-normalised {v('score_human_normalized', 3)}"
    if "score_over_random" in m:
        head += f", {v('score_over_random')}x the random policy"
    out = [head,
           f"{summary['step']} env steps, {summary['updates']} updates, {summary['episodes']} training episodes; "
           f"{v('env_steps_per_s')} env steps/s, {v('s_per_update', 3)} s per update",
           f"final evaluation ({'greedy' if cfg.eval_greedy else 'sampled'}): {v('final_eval_return')} "
           f"(mean of {m['final_eval_return']['n']} full games)"]
    if "final_eval_human_normalized" in m:
        out[-1] += f", human-normalised {v('final_eval_human_normalized', 3)}"
    if "random_return" in m:
        out.append(f"random policy {v('random_return')}, optimal {v('optimal_return')}, "
                   f"final evaluation / random = {v('final_eval_over_random')}")
    top = m["final_eval_top_action_fraction"]["value"]
    if top is not None and top >= 0.9:
        fr = summary.get("final_eval_action_fractions") or []
        a = int(np.argmax(fr)) if fr else -1
        out.append(f"warning: the evaluated policy took action {a} in {100 * top:.0f}% of its steps")
    return out


