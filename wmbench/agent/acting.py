"""Acting in the real environment: the environments of a run, their saved state, the acting context,
batched policy actions and evaluation over full games."""
from __future__ import annotations

import collections
import sys
from dataclasses import dataclass

import numpy as np
import torch

from wmbench.agent import checkpoint as ckpt
from wmbench.agent.config import TrainConfig
from wmbench.core.measure import mean_or_nan


def env_makers(cfg: TrainConfig):
    """(training env, evaluation env) constructors of run `cfg`, by seed. Evaluation plays full games:
    a lost life ends nothing and does not cut an action repeat short (the official eval env)."""
    from wmbench.tasks.atari import GRIDGOAL, make_env
    eval_extra = {} if cfg.game == GRIDGOAL else {"break_on_life_loss": False}

    def make(seed: int):
        return make_env(cfg.game, cfg.protocol, seed=seed, **cfg.env_options)

    def make_eval(seed: int):
        return make_env(cfg.game, cfg.protocol, seed=seed, **{**cfg.env_options, **eval_extra})
    return make, make_eval


# ----------------------------------------------------------------------------------------------
# environment state (so a resumed run continues the very same episode)

def env_state(env) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(JSON part, array part) of the environment's full state, or None if we do not know the class."""
    if hasattr(env, "get_state") and hasattr(env, "set_state"):
        return env.get_state()
    from wmbench.tasks.atari import AtariEnv
    from wmbench.tasks.gridgoal import GridGoalEnv
    if isinstance(env, GridGoalEnv):
        return ({"kind": "gridgoal", "rng": ckpt.generator_state(env._rng), "agent": env.agent.tolist(),
                 "goal": env.goal.tolist(), "steps": env._steps, "return": env._return,
                 "needs_reset": env._needs_reset}, {})
    if isinstance(env, AtariEnv) and hasattr(env.emu, "ale"):
        ale = env.emu.ale.cloneState(include_rng=True).serialize()
        return ({"kind": "atari", "noop_rng": ckpt.generator_state(env._noop_rng), "frames": env._frames,
                 "steps": env._steps, "return": env._return, "lives": env._lives, "seeded": env._seeded,
                 "needs_reset": env._needs_reset},
                {"env_ale_state": np.frombuffer(ale, np.uint8).copy(), "env_buf": env._buf.copy()})
    return None


def set_env_state(env, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    if hasattr(env, "get_state") and hasattr(env, "set_state"):
        env.set_state(meta, arrays)
        return
    if meta["kind"] == "gridgoal":
        env._rng = ckpt.generator_from_state(meta["rng"])
        env.agent, env.goal = np.array(meta["agent"]), np.array(meta["goal"])
        env._steps, env._return, env._needs_reset = meta["steps"], meta["return"], meta["needs_reset"]
    elif meta["kind"] == "atari":
        import ale_py
        env.emu.ale.restoreState(ale_py.ALEState(arrays["env_ale_state"].tobytes()))
        env._buf[...] = arrays["env_buf"]
        env._noop_rng = ckpt.generator_from_state(meta["noop_rng"])
        env._frames, env._steps, env._return = meta["frames"], meta["steps"], meta["return"]
        env._lives, env._seeded, env._needs_reset = meta["lives"], meta["seeded"], meta["needs_reset"]
    else:
        raise ValueError(f"unknown environment state kind {meta['kind']!r}")


# ----------------------------------------------------------------------------------------------
# acting

class ActingContext:
    """The last T real frames (current one last) and the T-1 actions between them."""

    def __init__(self, T: int):
        self.T = T
        self.obs: collections.deque = collections.deque(maxlen=T)
        self.act: collections.deque = collections.deque(maxlen=max(T - 1, 0))

    @classmethod
    def for_model(cls, mcfg) -> "ActingContext":
        """act_context past (frame, action) pairs for the prior latent (the code's RealityContextLength),
        plus the current frame, which the posterior latent also encodes."""
        return cls(mcfg.act_context + 1 if mcfg.policy_latent == "prior" else mcfg.act_context)

    def reset(self, obs: np.ndarray) -> None:
        self.obs.clear(), self.act.clear()
        self.obs.append(obs)

    def push(self, action: int, next_obs: np.ndarray) -> None:
        if self.T > 1:
            self.act.append(int(action))
        self.obs.append(next_obs)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.stack(self.obs), np.array(self.act, np.int64).reshape(len(self.obs) - 1)

    def load(self, obs: np.ndarray, act: np.ndarray) -> None:
        self.obs.clear(), self.act.clear()
        self.obs.extend(list(obs)), self.act.extend(int(a) for a in act)


@torch.no_grad()
def policy_actions(wm, agent, contexts: list[ActingContext], greedy: bool,
                   rng: np.random.Generator) -> np.ndarray:
    """One action per context; contexts of equal length share one batched forward pass. With the prior
    latent an episode's first step has no past to predict from: its action is drawn uniformly from `rng`
    (as in the official code)."""
    out = np.zeros(len(contexts), np.int64)
    by_len: dict[int, list[int]] = collections.defaultdict(list)
    for i, c in enumerate(contexts):
        by_len[len(c.obs)].append(i)
    for T, idx in sorted(by_len.items()):
        if T == 1 and wm.cfg.policy_latent == "prior":
            out[idx] = rng.integers(wm.n_actions, size=len(idx))
            continue
        obs, act = zip(*(contexts[i].arrays() for i in idx))
        obs_t = torch.from_numpy(np.stack(obs)).to(wm.device)           # (B, T, 64, 64, 3) uint8
        act_t = torch.from_numpy(np.stack(act)).to(wm.device)           # (B, T-1)
        s = wm.policy_state(obs_t, act_t)                               # (B, latent + d)
        out[idx] = agent.act(s, greedy=greedy).cpu().numpy()
    return out


@dataclass
class EvalResult:
    """Evaluation episodes: returns and lengths (agent steps) in the order they ended, and how often
    each action was taken over all of them."""
    returns: list[float]
    lengths: list[int]
    action_counts: list[int]

    @property
    def mean(self) -> float:
        return mean_or_nan(self.returns)

    def action_fractions(self) -> list[float]:
        n = sum(self.action_counts)
        return [c / n for c in self.action_counts] if n else []


def evaluate(wm, agent, make, n_episodes: int, n_envs: int, mcfg, greedy: bool, seed: int,
             progress: str | None = None) -> EvalResult:
    """`n_episodes` full games (life loss ends nothing, and does not cut an action repeat short: the
    official code's evaluation env), run `n_envs` at a time (no bias to short episodes).

    Runs under its own torch RNG (fork_rng + manual_seed) and with the actor-input statistics frozen, so
    evaluating never changes what training does afterwards and the same model + seed gives the same scores.
    progress: a label for a progress bar of finished games and env steps (None: no bar).
    """
    if n_episodes <= 0:
        return EvalResult([], [], [0] * wm.n_actions)
    n_envs = max(1, min(n_envs, n_episodes))
    res = EvalResult([], [], [0] * wm.n_actions)
    rng = np.random.default_rng([seed, 2])
    with torch.random.fork_rng(devices=[wm.device] if wm.device.type == "cuda" else []), \
            agent.frozen_input_stats():
        torch.manual_seed(seed)
        envs = [make(seed + i) for i in range(n_envs)]
        ctxs = [ActingContext.for_model(mcfg) for _ in envs]
        for e, c in zip(envs, ctxs):
            obs, _ = e.reset()
            c.reset(obs)
        started, live = n_envs, [True] * n_envs
        bar = _eval_bar(progress, n_episodes)
        while any(live):
            ids = [i for i, ok in enumerate(live) if ok]
            acts = policy_actions(wm, agent, [ctxs[i] for i in ids], greedy, rng)
            for i, a in zip(ids, acts):
                res.action_counts[int(a)] += 1
                obs, r, term, trunc, info = envs[i].step(int(a))
                if term or trunc:
                    res.returns.append(float(info["episode_return"]))
                    res.lengths.append(int(info["episode_step"]))
                    bar.update(1)
                    bar.set_postfix_str(f"last={res.returns[-1]:.1f}", refresh=False)
                    if started < n_episodes:
                        obs, _ = envs[i].reset()
                        ctxs[i].reset(obs)
                        started += 1
                    else:
                        live[i] = False
                else:
                    ctxs[i].push(int(a), obs)
        bar.close()
        for e in envs:
            e.close()
    return res


def _eval_bar(label: str | None, n_episodes: int):
    from tqdm import tqdm
    return tqdm(total=n_episodes, desc=label or "", unit="game", disable=label is None, file=sys.stderr,
                dynamic_ncols=True, leave=False)

