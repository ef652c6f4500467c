"""Actor-critic trained in imagination (Drama section 2.3, Table 8; DreamerV3's recipe).

    s_t = [ẑ_t, d_t]                         policy state from the world model (Imagination.states)
    actor  π(a | s): n x [Linear, RMSNorm, SiLU] (256 units) -> action logits
    critic v(s):     n x [Linear, RMSNorm, SiLU] (512 units) -> 255-bin symlog two-hot logits
    R^λ_t = r_t + γ c_t ((1 - λ) v(s_{t+1}) + λ R^λ_{t+1}),   R^λ_H = v(s_H)
    S = EMA(P95(R^λ)) - EMA(P5(R^λ))                           (return scale, decay 0.99)
    L_actor  = -mean(log π(a_t | s_t) sg((R^λ_t - v(s_t)) / max(1, S))) - η mean(H[π(. | s_t)])
    L_critic = CE(v(s_t), twohot(sg(R^λ_t))) + CE(v(s_t), twohot(sg(v_slow(s_t))))
    v_slow <- 0.98 v_slow + 0.02 v after every update
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.world_model.config import DramaConfig
from wmbench.world_model.distributions import TwoHot
from wmbench.world_model.model import Imagination
from wmbench.world_model.networks import rms_mlp
from wmbench.world_model.optim import TrainState, check_finite, make_optimizer


def lambda_return(rewards: torch.Tensor, continues: torch.Tensor, values: torch.Tensor,
                  gamma: float, lam: float, mode: str = "dreamerv3") -> torch.Tensor:
    """λ-returns (B, H) from rewards, continues (B, H) and values (B, H+1) of states s_0..s_H.

    mode 'dreamerv3': R_t = r_t + γ c_t ((1-λ) V_{t+1} + λ R_{t+1}), R_H = V_H.
    mode 'storm' (the official code): the bootstrap term uses V_t instead of V_{t+1}.
    """
    if mode not in ("dreamerv3", "storm"):
        raise ValueError(f"mode must be 'dreamerv3' or 'storm', got {mode!r}")
    H = rewards.shape[1]
    if values.shape[1] != H + 1 or continues.shape != rewards.shape:
        raise ValueError(f"need rewards/continues (B, H) and values (B, H+1); got {tuple(rewards.shape)}, "
                         f"{tuple(continues.shape)}, {tuple(values.shape)}")
    boot = values[:, 1:] if mode == "dreamerv3" else values[:, :-1]
    R = values[:, -1]
    out = []
    for t in reversed(range(H)):
        R = rewards[:, t] + gamma * continues[:, t] * ((1 - lam) * boot[:, t] + lam * R)
        out.append(R)
    return torch.stack(out[::-1], 1)


class ReturnNormalizer(nn.Module):
    """EMA of the lo/hi percentiles of the λ-returns; scale = max(1, hi - lo) (DreamerV3).

    Both EMAs start at 0 without bias correction, as in the code; the max(1, .) hides the start-up.
    """

    def __init__(self, percentiles=(5.0, 95.0), decay: float = 0.99):
        super().__init__()
        self.q = (percentiles[0] / 100.0, percentiles[1] / 100.0)
        self.decay = decay
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> torch.Tensor:
        x = returns.detach().float().flatten()
        lo, hi = torch.quantile(x, torch.tensor(self.q, device=x.device))
        self.lo.mul_(self.decay).add_((1 - self.decay) * lo)
        self.hi.mul_(self.decay).add_((1 - self.decay) * hi)
        return self.scale()

    def scale(self) -> torch.Tensor:
        return torch.clamp(self.hi - self.lo, min=1.0)


class RunningNorm(nn.Module):
    """The official code's actor-input normalisation (`VecNormalize`): (x - mean) / sqrt(var + eps),
    clipped at ±clip, with mean and var the running moments of every input it has seen (batch moments
    merged by Chan et al.'s parallel update; count starts at 1e-4, var at 1).

    Unlike the code, the moments are buffers (checkpointed, so a resumed run is exact) and they are
    frozen while `frozen` is set (evaluation then leaves training untouched)."""

    def __init__(self, dim: int, eps: float = 1e-8, clip: float = 10.0):
        super().__init__()
        self.eps, self.clip, self.frozen = eps, clip, False
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        b_mean, b_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = b_mean - self.mean
        w = float(n / total)
        m2 = self.var * float(self.count) + b_var * n + delta.square() * float(self.count * n / total)
        self.mean.add_(delta * w)
        self.var.copy_(m2 / float(total))
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            self.update(x)
        return ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


def orthogonal_init(mlp: nn.Sequential, out_gain: float) -> None:
    """The official code's `layer_init`: orthogonal weights (gain sqrt(2) for hidden layers, `out_gain`
    for the output layer), zero biases."""
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    for i, m in enumerate(linears):
        nn.init.orthogonal_(m.weight, out_gain if i == len(linears) - 1 else math.sqrt(2))
        nn.init.zeros_(m.bias)


class ActorCritic(TrainState, nn.Module):
    def __init__(self, cfg: DramaConfig, n_actions: int, state_dim: int | None = None):
        super().__init__()
        if not isinstance(n_actions, int) or n_actions < 1:
            raise ValueError(f"n_actions must be a positive integer, got {n_actions!r}")
        self.cfg, self.n_actions = cfg, n_actions
        self.state_dim = cfg.state_dim if state_dim is None else state_dim
        self.actor = rms_mlp(self.state_dim, cfg.actor_hidden, n_actions, cfg.ac_layers)
        self.critic = rms_mlp(self.state_dim, cfg.critic_hidden, cfg.reward_bins, cfg.ac_layers)
        if cfg.init == "code":
            orthogonal_init(self.actor, 0.001)
            orthogonal_init(self.critic, 0.001)
        else:
            nn.init.zeros_(self.critic[-1].weight)     # start from v = 0 (DreamerV3)
            nn.init.zeros_(self.critic[-1].bias)
            with torch.no_grad():                      # near-uniform initial policy
                self.actor[-1].weight.mul_(0.01)
                self.actor[-1].bias.zero_()
        # the code's actor sees normalised states; its critic does not
        self.input_norm = RunningNorm(self.state_dim) if cfg.actor_input_norm else None
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.twohot = TwoHot(cfg.reward_bins)
        self.return_norm = ReturnNormalizer(cfg.return_percentiles, cfg.return_norm_decay)
        # the optimiser covers actor + critic (not the slow copy), one gradient clip for both (code)
        self.optimizer, self.scheduler = make_optimizer(
            nn.ModuleList([self.actor, self.critic]), cfg.ac_optimizer, cfg.ac_lr, cfg.ac_eps,
            warmup=cfg.ac_warmup)
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    @property
    def device(self) -> torch.device:
        return self.critic[-1].weight.device

    def _check_states(self, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, device=self.device)
        if s.shape[-1] != self.state_dim:
            raise ValueError(f"states must end in state_dim={self.state_dim} ([z, d]), got {tuple(s.shape)}")
        return s.float()

    @contextlib.contextmanager
    def frozen_input_stats(self):
        """Evaluate without moving the actor-input statistics (a no-op without actor_input_norm)."""
        if self.input_norm is None:
            yield
            return
        old, self.input_norm.frozen = self.input_norm.frozen, True
        try:
            yield
        finally:
            self.input_norm.frozen = old

    def logprobs(self, states: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            states = self.input_norm(states)
        with torch.autocast(states.device.type, torch.bfloat16, enabled=bool(self.cfg.amp)):
            logits = self.actor(states)
        logp = F.log_softmax(logits.float(), -1)
        u = self.cfg.actor_unimix
        if u > 0:
            logp = torch.log((1 - u) * logp.exp() + u / self.n_actions)
        return logp

    def critic_logits(self, states: torch.Tensor, slow: bool = False) -> torch.Tensor:
        with torch.autocast(states.device.type, torch.bfloat16, enabled=bool(self.cfg.amp)):
            return (self.slow_critic if slow else self.critic)(states).float()

    def value(self, states: torch.Tensor, slow: bool = False) -> torch.Tensor:
        return self.twohot.decode(self.critic_logits(states, slow))

    @torch.no_grad()
    def act(self, states: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """states (B, state_dim) = [z, d] -> actions (B,) long (sampled, or argmax if greedy)."""
        logp = self.logprobs(self._check_states(states))
        if greedy:
            return logp.argmax(-1)
        return torch.multinomial(logp.exp(), 1).squeeze(-1)

    def update(self, imagined: Imagination) -> dict:
        """One actor-critic step on an imagined rollout. Returns float metrics; raises
        FloatingPointError (parameters untouched) if a loss or the gradient norm is not finite."""
        cfg = self.cfg
        s = self._check_states(imagined.states).detach()             # (B, H+1, S)
        s_t = s[:, :-1].contiguous()   # (B, H, S): a strided slice would make each linear a broadcast bmm
        a = torch.as_tensor(imagined.actions, device=self.device).long()
        r = torch.as_tensor(imagined.rewards, device=self.device).float()
        c = torch.as_tensor(imagined.continues, device=self.device).float()
        self.train()
        # one critic pass with gradient over s_0..s_{H-1}; its detached values serve the returns, so only
        # v(s_H) needs a pass of its own (a second full forward was ~20% of this update's FLOPs)
        critic_logits = self.critic_logits(s_t)                        # (B, H, bins)
        with torch.no_grad():
            v = torch.cat([self.twohot.decode(critic_logits.detach()),
                           self.value(s[:, -1:])], 1)                  # (B, H+1)
            R = lambda_return(r, c, v, cfg.gamma, cfg.lam, cfg.lambda_return)        # (B, H)
            if cfg.critic_target == "dreamerv3":
                slow_target = self.value(s_t, slow=True)
            else:
                slow_target = lambda_return(r, c, self.value(s, slow=True), cfg.gamma, cfg.lam,
                                            cfg.lambda_return)
            # check before the return-scale EMAs see a non-finite value (they are part of the state)
            check_finite({"return_mean": R.mean(), "slow_target_mean": slow_target.mean()}, "actor-critic loss")
            scale = self.return_norm.update(R)
            adv = (R - v[:, :-1]) / scale
        logp = self.logprobs(s_t)                                      # (B, H, A)
        logp_a = logp.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        policy_loss = -(logp_a * adv).mean()
        entropy_loss = -cfg.entropy * entropy.mean()
        value_loss = self.twohot.loss(critic_logits, R) + self.twohot.loss(critic_logits, slow_target)
        loss = policy_loss + entropy_loss + value_loss
        out = check_finite({"ac_loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
                            "entropy": entropy.mean(), "return_mean": R.mean(), "return_scale": scale,
                            "value_mean": v.mean(), "adv_abs_mean": adv.abs().mean(),
                            "imag_reward_mean": r.mean()}, "actor-critic loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([*self.actor.parameters(), *self.critic.parameters()],
                                               cfg.ac_grad_clip)
        out.update(check_finite({"ac_grad_norm": gnorm}, "actor-critic gradient"))
        self.optimizer.step()
        self.scheduler.step()
        self._update_slow_critic()
        self.n_updates += 1
        return out

    @torch.no_grad()
    def _update_slow_critic(self):
        mix = 1.0 - self.cfg.slow_critic_decay
        for ps, p in zip(self.slow_critic.parameters(), self.critic.parameters()):
            ps.lerp_(p, mix)

Agent = ActorCritic  # the name the training loop uses
