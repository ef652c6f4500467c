"""Distributions of the world model and the critic: symlog two-hot scalars (DreamerV3), categorical
latents with unimix, straight-through one-hot sampling, KL with free bits (eq. 7)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


class TwoHot(nn.Module):
    """Scalar <-> distribution over `n_bins` equally spaced bins in symlog space ([-20, 20])."""

    def __init__(self, n_bins: int = 255, low: float = -20.0, high: float = 20.0):
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        self.register_buffer("bins", torch.linspace(low, high, n_bins), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (...) -> two-hot weights (..., n_bins) on symlog(x); weights of the 2 nearest bins sum to 1."""
        y = symlog(x).clamp(self.bins[0], self.bins[-1])
        k = torch.bucketize(y, self.bins, right=True).clamp(1, len(self.bins) - 1)  # bins[k-1] <= y < bins[k]
        lo, hi = self.bins[k - 1], self.bins[k]
        w_hi = (y - lo) / (hi - lo)
        out = torch.zeros(*y.shape, len(self.bins), device=y.device, dtype=y.dtype)
        out.scatter_(-1, (k - 1).unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
        out.scatter_add_(-1, k.unsqueeze(-1), w_hi.unsqueeze(-1))
        return out

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., n_bins) -> expected value, symexp(E[bin])."""
        return symexp(torch.softmax(logits, -1) @ self.bins)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits (..., n_bins) against two-hot(target (...)), averaged."""
        return -(self.encode(target.detach()) * F.log_softmax(logits, -1)).sum(-1).mean()


def unimix_logprobs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """log((1 - u) softmax(logits) + u / C): keeps every class probability >= u / C (KL stays finite)."""
    probs = torch.softmax(logits, -1)
    if unimix > 0:
        probs = (1 - unimix) * probs + unimix / logits.shape[-1]
    return torch.log(probs)


def sample_onehot_st(logprobs: torch.Tensor) -> torch.Tensor:
    """One-hot sample with straight-through gradients: sample + p - sg(p)."""
    probs = logprobs.exp()
    # inverse-CDF sampling: one uniform per variable (torch.multinomial draws one per class, ~10x slower)
    cdf = probs.cumsum(-1)
    u = torch.rand(*cdf.shape[:-1], 1, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    onehot = F.one_hot(idx, probs.shape[-1]).to(probs.dtype)
    return onehot + probs - probs.detach()


def categorical_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) for (..., K, C) log-probabilities, summed over the K categorical variables -> (...)."""
    return (logp.exp() * (logp - logq)).sum((-1, -2))


def free_bits_kl(kl: torch.Tensor, free_bits: float, mode: str) -> torch.Tensor:
    """max(free_bits, KL): per step then averaged (paper eq. 7, DreamerV3) or on the batch mean (code)."""
    if mode == "step":
        return kl.clamp(min=free_bits).mean()
    return kl.mean().clamp(min=free_bits)
