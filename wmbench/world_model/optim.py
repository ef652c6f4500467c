"""Optimisation shared by the world model and the actor-critic: LaProp (Ziyin et al. 2020, the official
code's optimiser) or AdamW with linear warm-up, finite-loss checks, bf16 autocast, and the resumable
training state (weights, optimiser, schedule)."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn

from wmbench.world_model.config import DramaConfig


class LaProp(torch.optim.Optimizer):
    """Adam with the order of momentum and normalisation swapped: m <- b1 m + (1-b1) lr g / sqrt(v_hat).

    weight_decay_mode 'unscaled' applies p <- p (1 - wd) every step (the official code's LaProp);
    'decoupled' applies p <- p (1 - lr wd) (AdamW's convention).
    """

    def __init__(self, params, lr=4e-5, betas=(0.9, 0.999), eps=1e-20, weight_decay=0.0,
                 weight_decay_mode="unscaled"):
        if weight_decay_mode not in ("unscaled", "decoupled"):
            raise ValueError(f"weight_decay_mode must be 'unscaled' or 'decoupled', got {weight_decay_mode!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      weight_decay_mode=weight_decay_mode))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                    st["lr_avg"] = 0.0   # EMA of lr, for bias correction with a changing lr (warm-up)
                st["step"] += 1
                st["lr_avg"] = b1 * st["lr_avg"] + (1 - b1) * lr
                m, v, g = st["m"], st["v"], p.grad
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** st["step"])).sqrt_().add_(group["eps"])
                m.mul_(b1).addcdiv_(g, denom, value=(1 - b1) * lr)
                if wd:
                    p.mul_(1 - (wd if group["weight_decay_mode"] == "unscaled" else lr * wd))
                p.sub_(m, alpha=lr / st["lr_avg"])   # m / bias-correction (= lr_avg / lr)
        return loss


def make_optimizer(module: nn.Module, kind: str, lr: float, eps: float, weight_decay: float = 0.0,
                   weight_decay_mode: str = "unscaled", warmup: int = 0, decay_all: bool = False):
    """Optimiser + linear-warm-up scheduler. Parameters flagged `_no_weight_decay` (A_log, D, dt_bias:
    mamba-ssm's convention) are not decayed unless `decay_all` (the official code decays everything)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if getattr(p, "_no_weight_decay", False) and not decay_all else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    groups = [g for g in groups if g["params"]]
    if kind == "laprop":
        opt = LaProp(groups, lr=lr, eps=eps, weight_decay_mode=weight_decay_mode)
    elif kind == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, eps=max(eps, 1e-8))
    else:
        raise ValueError(f"unknown optimizer {kind!r}; valid choices: laprop, adamw")
    w = max(int(warmup), 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / w) if w else 1.0)
    return opt, sched


def check_finite(losses: Mapping[str, torch.Tensor], where: str) -> dict:
    """Tensor losses -> floats (one sync); raise FloatingPointError naming any non-finite one."""
    names = list(losses)
    values = torch.stack([losses[k].detach().float().reshape(()) for k in names]).tolist()
    out = dict(zip(names, values))
    bad = [f"{k}={v}" for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{where}: non-finite {', '.join(bad)}; parameters were not updated")
    return out


class TrainState:
    """Mixin: everything needed to resume training (weights, buffers, optimiser, warm-up schedule),
    as plain tensors / numbers, loadable with torch.load(weights_only=True)."""

    def training_state(self) -> dict:
        return {"model": self.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_training_state(self, state: Mapping) -> None:
        missing = {"model", "optimizer", "scheduler"} - set(state)
        if missing:
            raise ValueError(f"training state lacks {', '.join(sorted(missing))}")
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def autocast(cfg: DramaConfig, device: torch.device):
    """bf16 autocast when cfg.amp (the official code trains in bf16), else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(cfg.amp))
