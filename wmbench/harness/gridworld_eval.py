"""Measuring a trained grid-world model (`wmbench run`): frame errors against the oracle floor, and
imagination wall-clock.

Evaluation, on held-out sequences drawn from a different seed stream than training:
  * imagination (the headline `error_pct`): for K frame positions t spread over the sequence
    (always including the last frame), `prefill` the true context tokens[:, :t*l_f] (frames 0..t-1 and
    their actions) and `step` greedily through the l_g^2 cells of frame t, feeding back each argmax
    (restricted to the cell tokens). This is how a world model imagines, and a perfect model scores
    exactly the oracle floor: on a re-spawn frame it still writes a valid frame and guesses a cell.
  * teacher forcing (`error_pct_teacher_forced`): one parallel pass; each cell of frames 1..n-1 is the
    argmax given the *true* previous tokens. Cheap and covers every frame, but on re-spawn frames even
    a perfect model writes invalid frames (each cell is guessed on its own, e.g. "floor" everywhere
    until the last cells), so it sits above the floor there; on predictable frames both modes agree.
  * the oracle (tasks.gridworld.oracle_predict) on the same frames: the irreducible floor, and the
    share of re-spawn frames. Errors are reported over all frames and over predictable frames only.
  * imagination wall-clock: at the longest context (the last frame, L - l_f tokens of context) the
    time of `prefill` and the ms per generated token of the greedy step loop.

Memory variants (goal_once, agent_once). The model reads the frames as the variant draws them and writes
full state frames; targets, the oracle's input and the metric are the state frames (the `full` tokens of
the same seed). In imagination each written cell is fed back as the variant draws it on that frame: the
hidden kind becomes FLOOR unless the frame shows it (frame 0 and re-spawn frames, known to the
environment), so the model reads back exactly what it read in training. On predictable frames this is
always FLOOR, so nothing of the target leaks. The memoryless reference (tasks.gridworld.memoryless_predict,
its table counted on the seed stream [seed, 2]) is scored on the same frames: how far it is above the
floor is what memory is worth on this variant, grid and length.
"""
from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import torch

from wmbench.core.measure import median, metric, sync
from wmbench.tasks.gridworld import FLOOR

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(cfg):
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=DTYPES[cfg.dtype])


# Seed streams: training batch i uses [seed, 0, i]; held-out data uses [seed, 1]; the memoryless
# reference's table [seed, 2]. They never overlap.
def train_seed(seed: int, i: int) -> list[int]:
    return [seed, 0, i]


def eval_seed(seed: int) -> list[int]:
    return [seed, 1]


def memoryless_seed(seed: int) -> list[int]:
    return [seed, 2]


# transitions counted for the memoryless table: ~250 per (observation, action) key at l_g = 9 (196 keys),
# enough for its most frequent next state to be stable; 0.2-0.5 s of sampling and counting there
MEMORYLESS_FIT_FRAMES = 50_000


def cell_mask(task, device) -> torch.Tensor:
    m = torch.zeros(task.vocab_size, dtype=torch.bool, device=device)
    m[list(task.cell_tokens)] = True
    return m


def _greedy_cells(logits: torch.Tensor, not_cell: torch.Tensor) -> torch.Tensor:
    # generated tokens are cells: action ids are never targets, so they are excluded from the argmax
    return logits.float().masked_fill(not_cell, float("-inf")).argmax(-1)


@torch.no_grad()
def teacher_forced_frames(model, tokens: torch.Tensor, task, chunk: int) -> np.ndarray:
    """Argmax cell predictions given the true prefix: (B, n*l_f) -> (B, n-1, n_cells) for frames 1..n-1."""
    not_cell = ~cell_mask(task, tokens.device)
    l_f, n_cells = task.frame_len, task.n_cells
    out = []
    for i in range(0, tokens.shape[0], chunk):
        x = tokens[i:i + chunk]
        logits = model(x)                                          # (b, L, V)
        pred = _greedy_cells(logits, not_cell)                     # pred[:, j] is the guess for x[:, j+1]
        b, L = x.shape
        frames = pred.reshape(b, L // l_f, l_f)                    # frame f: positions f*l_f ... f*l_f+25
        # cell c of frame f (token f*l_f + c, f >= 1) is predicted at position f*l_f + c - 1
        prev_pos = torch.cat([frames[:, :-1, -1:], frames[:, 1:, :n_cells - 1]], dim=-1)
        out.append(prev_pos.cpu().numpy())
    return np.concatenate(out, axis=0)


def _feed_back(task, shown: torch.Tensor | None):
    """How a written cell is read back (module docstring): None in `full` (as written); in a variant, the
    hidden kind as FLOOR on the rows whose frame does not show it (shown (B,) bool; None: no row shows it)."""
    kind = getattr(task, "hidden_kind", None)
    if kind is None:
        return None

    def observe(tok: torch.Tensor) -> torch.Tensor:
        hide = tok == kind
        if shown is not None:
            hide &= ~shown
        return torch.where(hide, torch.full_like(tok, FLOOR), tok)
    return observe


def _greedy_rollout(model, logits: torch.Tensor, state, n_cells: int, not_cell: torch.Tensor, feed=None):
    """From the logits after a context, generate n_cells cells greedily, feeding back each argmax
    (through `feed`, when given: a memory variant reads back what it would have been shown)."""
    cells = []
    for _ in range(n_cells):
        tok = _greedy_cells(logits, not_cell)                      # (B,)
        cells.append(tok)
        logits, state = model.step(tok if feed is None else feed(tok), state)   # a rollout would continue
    return torch.stack(cells, dim=1)


def _shown_at(shown, t: int, device) -> torch.Tensor | None:
    return None if shown is None else torch.as_tensor(np.asarray(shown)[:, t], device=device)


@torch.no_grad()
def imagine_frame(model, context: torch.Tensor, task, max_len: int, shown=None):
    """Greedy imagination of the frame that follows `context` (B, T): prefill then n_cells steps.

    shown (B,) bool: whether that frame draws the variant's hidden kind (ignored in `full`).
    Returns (cells (B, n_cells) int64, prefill seconds, generation seconds). Timings are synchronised.
    """
    dev = context.device
    not_cell = ~cell_mask(task, dev)
    feed = _feed_back(task, None if shown is None else torch.as_tensor(np.asarray(shown), device=dev))
    state = model.init_state(context.shape[0], max_len=max_len)
    sync(dev)
    t0 = time.perf_counter()
    logits, state = model.prefill(context, state)
    sync(dev)
    t1 = time.perf_counter()
    cells = _greedy_rollout(model, logits, state, task.n_cells, not_cell, feed)
    sync(dev)
    t2 = time.perf_counter()
    return cells.cpu().numpy(), t1 - t0, t2 - t1


@torch.no_grad()
def imagine_frames(model, tokens: torch.Tensor, task, positions: list[int], max_len: int,
                   shown=None) -> np.ndarray:
    """Imagine frame t of every sequence for each t in `positions`, each from its true context.

    tokens (B, n*l_f) as observed; shown (B, n) bool, which frames draw the variant's hidden kind
    (ignored in `full`). One pass over the sequence: `prefill` the true tokens up to frame t (continuing
    the state of the previous prefill), copy the state and roll the copy out greedily, so the cost is
    one prefill of the sequence plus len(positions) * n_cells steps. Returns (B, len(positions), n_cells).
    """
    not_cell = ~cell_mask(task, tokens.device)
    state = model.init_state(tokens.shape[0], max_len=max_len)
    done, out = 0, []
    for t in sorted(positions):
        logits, state = model.prefill(tokens[:, done:t * task.frame_len], state)
        done = t * task.frame_len
        branch = copy.deepcopy(state)                              # states may be updated in place
        feed = _feed_back(task, _shown_at(shown, t, tokens.device))
        out.append(_greedy_rollout(model, logits, branch, task.n_cells, not_cell, feed))
        del branch
    return torch.stack(out, dim=1).cpu().numpy()


def _frame_positions(n_frames: int, k: int) -> list[int]:
    """k frame indices in 1..n-1, evenly spread, always including the last frame."""
    return sorted({int(round(v)) for v in np.linspace(1, n_frames - 1, num=min(k, n_frames - 1))})


def _summarise(task, pred, target, prev, action, prefix: str, method: str) -> dict:
    fe = task.frame_errors(pred, target, prev, action)
    ok = fe["predictable"]
    all_ = task.error_percent(fe["geometric"], fe["logic"])
    out = {
        f"{prefix}error_pct": metric(all_["error"], "%", f"{method}; mean(E_g, E_l) over {len(ok)} frames"),
        f"{prefix}E_g_pct": metric(all_["E_g"], "%", f"{method}; frames with a geometric violation"),
        f"{prefix}E_l_pct": metric(all_["E_l"], "%", f"{method}; frames with a logic failure"),
    }
    if ok.any():
        pr = task.error_percent(fe["geometric"][ok], fe["logic"][ok])
        out[f"{prefix}error_pct_predictable"] = metric(pr["error"], "%", f"{method}; {int(ok.sum())} frames "
                                                       "that do not follow a re-spawn")
    return out


def _memoryless(task, cfg, n_frames: int, prev_seen, prev, act, tgt) -> dict:
    """The memoryless reference on the imagined frames: prev_seen the observed frames before them, prev
    the state frames before them (for the predictable flags), act the actions, tgt the state targets."""
    if task.hidden_kind is None:
        table = {}                         # every frame shows everything: the reference is the oracle
    else:
        n_seq = -(-MEMORYLESS_FIT_FRAMES // (n_frames - 1))
        fit_obs, fit_state, _ = task.sample_views(n_seq, n_frames, seed=memoryless_seed(cfg.seed))
        table = task.fit_memoryless(fit_obs, fit_state)
    pred = task.memoryless_predict(table, prev_seen, act)
    method = ("the previous observed frame and action only: the dynamics where it shows everything, else the "
              "most frequent next state after it in a separate sample (tasks.gridworld.memoryless_predict)")
    fe = task.frame_errors(pred, tgt, prev, act)
    ok = fe["predictable"]
    out = {"memoryless_error_pct": metric(task.error_percent(fe["geometric"], fe["logic"])["error"], "%",
                                          f"{method}; on the imagined frames")}
    if ok.any():
        out["memoryless_error_pct_predictable"] = metric(
            task.error_percent(fe["geometric"][ok], fe["logic"][ok])["error"], "%",
            f"{method}; on the {int(ok.sum())} imagined frames that do not follow a re-spawn")
    return out


@torch.no_grad()
def evaluate(model, cfg, task, n_frames: int) -> dict:
    dev = torch.device(cfg.device)
    model.eval()
    # the model reads `observed`; `cells` are the state frames it must write (one array in `full`)
    observed, state_np, shown = task.sample_views(cfg.eval_sequences, n_frames, seed=eval_seed(cfg.seed))
    cells, actions = task.split_frames(state_np)                   # (E, n, n_cells), (E, n)
    seen, _ = task.split_frames(observed)
    tokens = torch.from_numpy(observed).to(dev)
    l_f, n_cells = task.frame_len, task.n_cells
    chunk = min(cfg.eval_sequences, cfg.eval_batch)
    out: dict = {}

    # oracle and respawn share over every scored frame (1..n-1)
    prev_all = cells[:, :-1].reshape(-1, n_cells)
    tgt_all = cells[:, 1:].reshape(-1, n_cells)
    act_all = actions[:, :-1].reshape(-1)
    oracle_all = task.oracle_predict(prev_all, act_all)
    fe = task.frame_errors(oracle_all, tgt_all, prev_all, act_all)
    out["respawn_pct"] = metric(100.0 * float((~fe["predictable"]).mean()), "%",
                                f"share of held-out frames 1..n-1 that follow a goal re-spawn ({len(act_all)} frames)")
    out["oracle_error_pct_all_frames"] = metric(task.error_percent(fe["geometric"], fe["logic"])["error"], "%",
                                                "perfect dynamics without re-spawn knowledge, frames 1..n-1")

    # teacher forcing over every frame
    with autocast(cfg):
        tf = teacher_forced_frames(model, tokens, task, chunk).reshape(-1, n_cells)
    out.update(_summarise(task, tf, tgt_all, prev_all, act_all, "teacher_forced_",
                          "teacher-forced greedy cells, frames 1..n-1"))

    # imagination at K positions (prefill the true context, greedy steps through the frame)
    positions = _frame_positions(n_frames, cfg.imagine_frames)
    preds = []
    with autocast(cfg):
        for i in range(0, cfg.eval_sequences, chunk):
            preds.append(imagine_frames(model, tokens[i:i + chunk], task, positions, max_len=cfg.seq_len,
                                        shown=shown[i:i + chunk]))
    pos = np.array(positions)
    pred = np.concatenate(preds).reshape(-1, n_cells)              # (E * K, n_cells), sequence-major
    tgt = cells[:, pos].reshape(-1, n_cells)
    prev = cells[:, pos - 1].reshape(-1, n_cells)
    act = actions[:, pos - 1].reshape(-1)
    method = f"greedy imagination (prefill true context + {n_cells} steps) at frames {positions}"
    out.update(_summarise(task, pred, tgt, prev, act, "", method))
    fe = task.frame_errors(task.oracle_predict(prev, act), tgt, prev, act)
    out["oracle_error_pct"] = metric(task.error_percent(fe["geometric"], fe["logic"])["error"], "%",
                                     "perfect dynamics without re-spawn knowledge, on the imagined frames")
    out["respawn_pct_imagined"] = metric(100.0 * float((~fe["predictable"]).mean()), "%",
                                         "share of imagined frames that follow a re-spawn")
    out["error_above_floor_pp"] = metric(out["error_pct"]["value"] - out["oracle_error_pct"]["value"], "pp",
                                         "error_pct - oracle_error_pct on the same frames")
    out.update(_memoryless(task, cfg, n_frames, seen[:, pos - 1].reshape(-1, n_cells), prev, act, tgt))

    # imagination wall-clock at the longest context: predict the last frame from L - l_f tokens
    b = min(cfg.batch_size, cfg.eval_sequences)
    ctx = tokens[:b, :(n_frames - 1) * l_f]
    pre_s, gen_s = [], []
    with autocast(cfg):
        last_shown = shown[:b, n_frames - 1]
        imagine_frame(model, ctx, task, max_len=cfg.seq_len, shown=last_shown)       # warm-up
        for _ in range(3):
            _, a, g = imagine_frame(model, ctx, task, max_len=cfg.seq_len, shown=last_shown)
            pre_s.append(a)
            gen_s.append(g)
    out["imagine_ms_per_token"] = metric(1e3 * median(gen_s) / n_cells, "ms",
                                         f"median of 3: greedy step() loop for {n_cells} tokens / {n_cells}, "
                                         f"batch {b}, after prefill of {ctx.shape[1]} tokens")
    out["imagine_prefill_ms"] = metric(1e3 * median(pre_s), "ms",
                                       f"median of 3 prefill() calls of {ctx.shape[1]} tokens, batch {b}")
    return out
