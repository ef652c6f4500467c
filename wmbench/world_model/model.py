"""The Drama world model (Wang et al., ICLR 2025, section 2.2 and appendix A.4) over ANY backbone.

    O_t --Encoder--> post logits --unimix, ST sample--> z_t                 (32 x 32 one-hot)
    [z_t, onehot(a_t)] --Linear, RMSNorm, SiLU--> x_t --backbone--> d_t    (the paper's d, our h)
    d_t --prior head--> ẑ_{t+1}        d_t --reward head--> r̂_t        d_t --termination head--> ê_t
    z_t --Decoder--> Ô_t               (from the posterior, not from d_t; Figure 1)

The sequence model is any registered backbone (`wmbench.create_backbone`), so the same shell compares
Mamba, Mamba-2, GRU and Transformer. Training is fully parallel over time: the posterior z_t depends on
O_t only, so the backbone runs once over the whole (b, l) batch. Imagination `prefill`s real contexts,
then rolls out with the backbone's O(1)-per-token `step`, with no state resets at episode ends.

Its pieces live beside it: networks.py (encoder, decoder, MLPs), distributions.py (latents, two-hot,
KL), optim.py (LaProp, warm-up, training state), config.py (sizes and the paper-vs-code options).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmbench.backbones.base import RMSNorm
from wmbench.world_model.config import DramaConfig
from wmbench.world_model.distributions import (TwoHot, categorical_kl, free_bits_kl, sample_onehot_st,
                                               unimix_logprobs)
from wmbench.world_model.networks import Decoder, Encoder, rms_mlp, trunc_normal_init
from wmbench.world_model.optim import TrainState, autocast, check_finite, make_optimizer


ENCODE_CHUNK = 512   # frames per encoder call without autograd: bounds the memory of encoding contexts


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would build with, or None."""
    import os
    import shutil
    return next((c for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c and shutil.which(c)), None)


def check_compile(device: torch.device) -> None:
    """Refuse --compile on a CPU without a C++ compiler in one line, instead of failing at the first
    imagined step."""
    if torch.device(device).type == "cpu" and cxx_compiler() is None:
        raise ValueError("--compile on a CPU needs a C++ compiler (g++ or clang++) for torch.compile; "
                         "install one or leave --compile off")


@dataclass
class Imagination:
    """An imagined rollout of horizon H from b_img starting points.

    z (B, H+1, latent_dim), h (B, H+1, d): policy states s_t = [z_t, h_t], t = 0..H (h_t is the
    backbone output that preceded z_t, so s_t holds everything known before choosing a_t);
    actions (B, H) long; rewards (B, H); terminations (B, H) in {0, 1}; continues = 1 - terminations.
    """
    z: torch.Tensor
    h: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    terminations: torch.Tensor

    @property
    def continues(self) -> torch.Tensor:
        return 1.0 - self.terminations

    @property
    def states(self) -> torch.Tensor:
        return torch.cat([self.z, self.h], -1)


def _pick(batch: Mapping, *names):
    for n in names:
        if n in batch:
            return batch[n]
    raise ValueError(f"batch is missing {names[0]!r} (accepted keys: {', '.join(names)})")


# ----------------------------------------------------------------------------------------------
# the world model

class WorldModel(TrainState, nn.Module):
    """Drama's world model over any backbone. See the module docstring for the data flow."""

    def __init__(self, cfg: DramaConfig, n_actions: int, backbone: nn.Module | None = None):
        super().__init__()
        if not isinstance(n_actions, int) or n_actions < 1:
            raise ValueError(f"n_actions must be a positive integer, got {n_actions!r}")
        self.cfg, self.n_actions = cfg, n_actions
        K, C, D = cfg.n_latents, cfg.n_classes, cfg.d_model
        self.encoder = Encoder(cfg)
        self.post_head = nn.Linear(self.encoder.out_dim, K * C)        # q(z_t | O_t)
        self.decoder = Decoder(cfg, self.encoder.out_shape)
        # stem: [z, onehot(a)] -> x (official: Linear(bias) -> RMSNorm -> SiLU, dropout on its output)
        self.stem = nn.Sequential(nn.Linear(K * C + n_actions, D), RMSNorm(D, eps=1e-5), nn.SiLU(),
                                  nn.Dropout(cfg.dropout))
        if backbone is None:
            from wmbench.core.registry import create_backbone
            backbone = create_backbone(cfg.backbone, cfg.d_model, cfg.n_layers, **cfg.backbone_kwargs())
        self.backbone = backbone
        self.prior_head = nn.Linear(D, K * C)                            # p(ẑ_{t+1} | d_t)
        self.reward_head = rms_mlp(D, cfg.head_hidden, cfg.reward_bins, cfg.head_layers)
        self.term_head = rms_mlp(D, cfg.head_hidden, 1, cfg.head_layers)
        if cfg.init == "code":   # the official code: truncated normal on the conv nets and the heads
            for m in (self.encoder, self.decoder, self.reward_head, self.term_head):
                m.apply(trunc_normal_init)
        else:
            nn.init.zeros_(self.reward_head[-1].weight)   # DreamerV3: start by predicting reward 0
            nn.init.zeros_(self.reward_head[-1].bias)
        self.twohot = TwoHot(cfg.reward_bins)
        self.optimizer, self.scheduler = make_optimizer(
            self, cfg.wm_optimizer, cfg.wm_lr, cfg.wm_eps, cfg.wm_weight_decay, cfg.weight_decay_mode,
            cfg.wm_warmup, decay_all=cfg.decay_ssm_params)
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    def compile_rollout(self) -> None:
        """torch.compile the backbone's recurrent `step` (imagination's rollout: h x b_img tokens per update,
        many small element-wise ops it fuses). Weights and state dicts are unchanged. If the backend cannot
        build here (it compiles at the first call), the step falls back to eager with one warning."""
        import warnings
        eager = self.backbone.step
        compiled = [torch.compile(eager, dynamic=False)]

        def step(x_t, state):
            if compiled[0] is not None:
                try:
                    return compiled[0](x_t, state)
                except Exception as e:   # noqa: BLE001  (inductor raises many types; eager always works)
                    compiled[0] = None
                    msg = " ".join(str(e).split())[:200]
                    warnings.warn(f"torch.compile of the rollout step failed ({type(e).__name__}: {msg}); "
                                  "imagination runs eagerly", RuntimeWarning, stacklevel=2)
            return eager(x_t, state)
        self.backbone.step = step

    # --- parameter accounting ---
    def param_counts(self) -> dict:
        """Parameters per component (the official code's grouping; 'sequence_model' = stem + backbone),
        the total, and the backbone's own count."""
        n = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())
        parts = {"encoder": n(self.encoder), "dist_heads": n(self.post_head, self.prior_head),
                 "decoder": n(self.decoder), "reward_head": n(self.reward_head),
                 "termination_head": n(self.term_head), "sequence_model": n(self.stem, self.backbone)}
        parts["total"] = sum(parts.values())
        parts["backbone"] = n(self.backbone)      # of which the backbone alone (the count presets match)
        return parts

    @property
    def device(self) -> torch.device:
        return self.prior_head.weight.device

    # --- pieces ---
    def _frames(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 frames (..., H, W, C) or (..., C, H, W) -> float (N, C, H', W') in [0, 1]
        (H' = H / obs_pool: the encoder's input and the decoder's target)."""
        cfg = self.cfg
        obs = torch.as_tensor(obs, device=self.device)
        size, ch = cfg.image_size, cfg.image_channels
        p, s = cfg.obs_pool, size // cfg.obs_pool
        if obs.shape[-3:] == (size, size, ch):          # HWC (the replay layout)
            x = obs.reshape(-1, size, size, ch).float()
            if p > 1:   # p x p mean pooling as two strided sums (faster than avg_pool2d on this layout)
                x = x.view(-1, s, p, s, p * ch).sum(2).view(-1, s, s, p, ch).sum(3) / (p * p)
            x = x.permute(0, 3, 1, 2)                    # channels-last view, no copy
        elif obs.shape[-3:] == (ch, size, size):
            x = obs.reshape(-1, ch, size, size).float()
            x = F.avg_pool2d(x, p) if p > 1 else x
        else:
            raise ValueError(f"observations must end in ({size}, {size}, {ch}) or ({ch}, {size}, {size}), "
                             f"got shape {tuple(obs.shape)}")
        return x * (1.0 / 255.0) if obs.dtype == torch.uint8 else x

    def encode(self, obs: torch.Tensor, conv_amp: bool = False):
        """obs (B, L, ...frame) -> posterior log-probs (B, L, K, C) and ST one-hot sample z (B, L, K*C).

        Without autograd (imagination contexts: 1024 x 8 frames at XS) the frames go through the encoder
        ENCODE_CHUNK at a time, so its float copies and activations stay small and reused instead of
        gigabytes of fresh pages; one sample is drawn over all of them, as unchunked. There `conv_amp`
        runs the conv encoder under the config's bf16 autocast (cfg.amp), as the official code encodes
        imagination contexts, while the posterior head and the sampling stay in fp32."""
        B, L = obs.shape[:2]
        n = B * L
        if torch.is_grad_enabled():
            return self._encode_frames(self._frames(obs), B, L)
        flat = torch.as_tensor(obs, device=self.device).reshape(n, *obs.shape[2:])
        with autocast(self.cfg, self.device) if conv_amp else contextlib.nullcontext():
            feats = torch.cat([self.encoder(self._frames(flat[i:i + ENCODE_CHUNK]))
                               for i in range(0, n, ENCODE_CHUNK)])
        return self._latents(feats.float() if conv_amp else feats, B, L)

    def _encode_frames(self, x: torch.Tensor, B: int, L: int):
        return self._latents(self.encoder(x), B, L)

    def _latents(self, feats: torch.Tensor, B: int, L: int):
        logits = self.post_head(feats).float().view(B, L, self.cfg.n_latents, self.cfg.n_classes)
        logp = unimix_logprobs(logits, self.cfg.unimix)
        return logp, sample_onehot_st(logp).flatten(-2)

    def prior(self, h: torch.Tensor):
        """h (..., d) -> prior log-probs (..., K, C) over ẑ_{t+1}.

        The heads' logits go to fp32 before any softmax: CUDA autocast (the official code's) runs softmax
        in fp32, CPU autocast would keep it in bf16."""
        logits = self.prior_head(h).float().unflatten(-1, (self.cfg.n_latents, self.cfg.n_classes))
        return unimix_logprobs(logits, self.cfg.unimix)

    def sample_prior(self, h: torch.Tensor) -> torch.Tensor:
        return sample_onehot_st(self.prior(h)).flatten(-2)

    def _check_actions(self, a) -> torch.Tensor:
        a = torch.as_tensor(a, device=self.device).long()
        if a.numel() and (a.min() < 0 or a.max() >= self.n_actions):
            raise ValueError(f"actions must be in [0, {self.n_actions}), got range [{a.min()}, {a.max()}]")
        return a

    def embed(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x = stem([z, onehot(a)]): z (..., K*C), a (...) long -> (..., d)."""
        return self.stem(torch.cat([z, F.one_hot(a, self.n_actions).to(z.dtype)], -1))

    def reward(self, h: torch.Tensor) -> torch.Tensor:
        return self.twohot.decode(self.reward_head(h).float())

    def termination(self, h: torch.Tensor) -> torch.Tensor:
        """Hard termination flag {0, 1} (logit > 0, as in the code and DreamerV3's mode)."""
        return (self.term_head(h).squeeze(-1) > 0).to(h.dtype)

    # --- training ---
    def loss(self, obs, actions, rewards, terminations):
        """Eq. 6-7 on a (B, L) batch. Returns (total loss, dict of named loss tensors)."""
        cfg = self.cfg
        B, L = actions.shape[:2]
        target = self._frames(obs)                                      # (B*L, C, H, W) in [0, 1]
        post_logp, z = self._encode_frames(target, B, L)                # (B,L,K,C), (B,L,K*C)
        recon = self.decoder(z.flatten(0, 1))                           # (B*L, C, H, W)
        # reconstruction: squared error summed over pixels, averaged over (b, l) (code; eq. 6's sum)
        l_rec = (recon - target).pow(2).sum((1, 2, 3)).mean()
        h = self.backbone(self.embed(z, actions))                       # (B, L, d)
        l_rew = self.twohot.loss(self.reward_head(h).float(), rewards.float())
        l_term = F.binary_cross_entropy_with_logits(self.term_head(h).squeeze(-1), terminations.float())
        # d_t predicts z_{t+1}: posterior of steps 1..L-1 against prior from steps 0..L-2
        prior_logp = self.prior(h[:, :-1])
        post_next = post_logp[:, 1:]
        kl_dyn = categorical_kl(post_next.detach(), prior_logp)         # trains the prior / sequence model
        kl_rep = categorical_kl(post_next, prior_logp.detach())         # trains the encoder
        l_dyn = free_bits_kl(kl_dyn, cfg.free_bits, cfg.free_bits_mode)
        l_rep = free_bits_kl(kl_rep, cfg.free_bits, cfg.free_bits_mode)
        total = l_rec + l_rew + l_term + cfg.dyn_scale * l_dyn + cfg.rep_scale * l_rep
        return total, {"loss": total, "recon": l_rec, "reward": l_rew, "termination": l_term,
                       "dyn": l_dyn, "rep": l_rep, "kl": kl_dyn.mean().detach()}

    def train_step(self, batch: Mapping) -> dict:
        """One optimiser step on a replay batch {obs (B,L,64,64,3) uint8, action (B,L), reward (B,L),
        termination (B,L)}. Returns float losses; raises FloatingPointError (and leaves the parameters
        untouched) if any loss or the gradient norm is not finite."""
        obs = _pick(batch, "obs", "observations", "observation")
        dev = self.device
        actions = self._check_actions(_pick(batch, "action", "actions"))
        rewards = torch.as_tensor(_pick(batch, "reward", "rewards"), device=dev)
        terms = torch.as_tensor(_pick(batch, "termination", "terminations", "terminal", "done"), device=dev)
        if actions.dim() != 2 or rewards.shape != actions.shape or terms.shape != actions.shape:
            raise ValueError(f"action, reward, termination must all be (B, L); got {tuple(actions.shape)}, "
                             f"{tuple(rewards.shape)}, {tuple(terms.shape)}")
        if tuple(obs.shape[:2]) != tuple(actions.shape) or actions.shape[1] < 2:
            raise ValueError(f"obs must be (B, L, ...) with L >= 2 matching action {tuple(actions.shape)}, "
                             f"got {tuple(obs.shape)}")
        self.train()
        with autocast(self.cfg, self.device):
            total, parts = self.loss(obs, actions, rewards, terms)
        out = check_finite(parts, "world-model loss")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.cfg.wm_grad_clip)
        out.update(check_finite({"grad_norm": gnorm}, "world-model gradient"))
        self.optimizer.step()
        self.scheduler.step()
        self.n_updates += 1
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    # --- imagination and acting ---
    @property
    def rollout_amp(self) -> bool:
        """Whether imagination's prefill and rollout run under the bf16 autocast (only with cfg.amp). The
        official code rolls out in fp32 where it captures a CUDA graph (its default on a GPU) and under bf16
        autocast without one; `rollout_precision` "auto" does the same per device: fp32 on CUDA, bf16
        elsewhere (a CPU has no CUDA graphs)."""
        mode = self.cfg.rollout_precision
        return bool(self.cfg.amp) and (mode == "amp" or (mode == "auto" and self.device.type != "cuda"))

    @torch.no_grad()
    def imagine(self, context_obs, context_actions, actor, horizon: int | None = None) -> Imagination:
        """Roll out `horizon` steps from b_img real contexts of length l_img (section 2.3, Algorithm 1).

        context_obs (B, l_img, ...frame) uint8, context_actions (B, l_img) long; `actor` is an object
        with `.act(states) -> (B,) long` or such a callable.
        - imagine_start='paper' (Alg. 1): the first l_img-1 steps are `prefill`ed (one parallel pass) and
          the rollout starts at step l_img; 'code': all l_img steps are prefilled and the rollout starts
          one step beyond the context.
        - The first policy state is [ẑ, d] with ẑ sampled from the prior after the prefilled context
          (s2.3: the policy's latent is the prior). policy_latent='posterior' with the paper start uses
          the last context frame's posterior instead.
        Each imagined step is one backbone `step`. No state is reset where an episode ends.
        """
        cfg = self.cfg
        H = cfg.imag_horizon if horizon is None else int(horizon)
        if H < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        policy: Callable = actor.act if hasattr(actor, "act") else actor
        actions_ctx = self._check_actions(context_actions)
        B, T = actions_ctx.shape
        if tuple(context_obs.shape[:2]) != (B, T):
            raise ValueError(f"context_obs {tuple(context_obs.shape)} and context_actions "
                             f"{tuple(actions_ctx.shape)} must share (B, l_img)")
        n_prefill = T - 1 if cfg.imagine_start == "paper" else T
        if n_prefill < 1:
            raise ValueError(f"l_img must be >= {2 if cfg.imagine_start == 'paper' else 1}, got {T}")
        start_on_posterior = cfg.imagine_start == "paper" and cfg.policy_latent == "posterior"
        n_encode = T if start_on_posterior else n_prefill   # frames whose posterior is used
        was_training = self.training
        self.eval()   # BatchNorm running statistics, no dropout (as in the code)
        try:
            # the context frames' conv encoder runs under the bf16 autocast (cfg.amp), the posterior head
            # and sampling in fp32; the prefill and rollout in the precision `rollout_amp` says
            with torch.autocast(self.device.type, enabled=False):
                _, z_ctx = self.encode(context_obs[:, :n_encode], conv_amp=bool(cfg.amp))  # (B, n_encode, K*C)
            with autocast(cfg, self.device) if self.rollout_amp else torch.autocast(self.device.type, enabled=False):
                state = self.backbone.init_state(B, max_len=n_prefill + H)
                x_ctx = self.embed(z_ctx[:, :n_prefill], actions_ctx[:, :n_prefill])
                h_ctx, state = self.backbone.prefill(x_ctx, state)       # (B, n_prefill, d): one pass
                h_prev = h_ctx[:, -1]
                z_t = z_ctx[:, -1] if start_on_posterior else self.sample_prior(h_prev)
                zs, hs, acts, rews, terms = [z_t], [h_prev], [], [], []
                for _ in range(H):
                    a_t = torch.as_tensor(policy(torch.cat([z_t, h_prev], -1)), device=self.device).long()
                    h_t, state = self.backbone.step(self.embed(z_t, a_t), state)    # d_t after (z_t, a_t)
                    h_out = h_t if cfg.reward_alignment == "paper" else h_prev       # code: one step late
                    rews.append(self.reward(h_out))
                    terms.append(self.termination(h_out))
                    z_t = self.sample_prior(h_t)                                      # ẑ_{t+1} ~ p(. | d_t)
                    h_prev = h_t
                    zs.append(z_t), hs.append(h_t), acts.append(a_t)
        finally:
            self.train(was_training)
        f32 = lambda xs: torch.stack(xs, 1).float()
        return Imagination(z=f32(zs), h=f32(hs), actions=torch.stack(acts, 1), rewards=f32(rews),
                           terminations=f32(terms))

    @torch.no_grad()
    def policy_state(self, obs, actions) -> torch.Tensor:
        """The state to act on in the real environment, from a short window of real experience.

        obs (B, T, ...frame): the last T frames, the current one last; actions (B, T-1): the actions taken
        after the first T-1 of them. d_{t-1} comes from running the backbone over the T-1 past
        (frame, action) pairs (the official code: no recurrent cache in the real env). Returns
        (B, latent_dim + d), the layout of imagination states:
        - policy_latent='prior' (s2.3, the code): [ẑ_t ~ p(. | d_{t-1}), d_{t-1}]; the current frame is
          not looked at. Needs T >= 2 (the caller acts at random on an episode's first step, as the code).
        - 'posterior': [z_t (posterior of the current frame), d_{t-1}] (d = 0 when T == 1).
        """
        actions = self._check_actions(actions)
        B, T = obs.shape[:2]
        if tuple(actions.shape) != (B, T - 1):
            raise ValueError(f"actions must be (B, T-1) = ({B}, {T - 1}), got {tuple(actions.shape)}")
        prior = self.cfg.policy_latent == "prior"
        if prior and T < 2:
            raise ValueError("policy_latent='prior' needs at least one past frame (T >= 2)")
        was_training = self.training
        self.eval()
        try:
            with autocast(self.cfg, self.device):
                _, z = self.encode(obs[:, :-1] if prior else obs)
                if T > 1:
                    h = self.backbone(self.embed(z[:, :T - 1], actions))[:, -1]
                else:
                    h = z.new_zeros(B, self.cfg.d_model)
                z_t = self.sample_prior(h) if prior else z[:, -1]
        finally:
            self.train(was_training)
        return torch.cat([z_t, h], -1).float()
