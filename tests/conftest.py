"""Shared test set-up: deterministic seeds, a CI-friendly hypothesis profile, the backbone contract check.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE=...):
  ci   (default)  derandomized, so CI runs are reproducible; few examples, no deadline (CPU timing is noisy)
  dev             random, more examples, for hunting bugs locally
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests check behaviour on tiny tensors, where a second intra-op thread only adds synchronisation
# and, on a shared machine, can slow tiny ops down by 10x or more. Benchmarks set their own threads.
torch.set_num_threads(int(os.environ.get("WMBENCH_TEST_THREADS", "1")))


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pytest_runtest_setup(item):
    # a hook rather than an autouse fixture: hypothesis rejects function-scoped fixtures in @given tests
    seed_everything(0)
    # each test measures its automatic choices afresh (wmbench/core/choices.py), never the user's cache
    os.environ["WMBENCH_CACHE_DIR"] = os.path.join(_CACHE_ROOT, item.nodeid.replace("/", "_")[-200:])


_CACHE_ROOT = tempfile.mkdtemp(prefix="wmbench-test-cache-")


# --------------------------------------------------------------------------------------------
# the backbone contract (DESIGN.md): used by test_backbone_contract.py and the per-backbone tests
# --------------------------------------------------------------------------------------------

TOL = 1e-4  # fp32 max abs error allowed between the parallel and the recurrent paths


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_backbone_contract(bb: torch.nn.Module, x: torch.Tensor, split: int, split2: int | None = None) -> None:
    """Check forward == step-by-step == prefill(x[:split]) + steps == prefill(a) + prefill(b) [+ steps].

    bb must be in eval mode; x (B, L, D) fp32; 0 < split < L when L > 1; split <= split2 <= L.
    The inputs must come out unmodified, shapes and dtypes must follow the contract.
    """
    B, L, D = x.shape
    x0 = x.clone()
    with torch.no_grad():
        y = bb(x)
        assert y.shape == (B, L, D) and y.dtype == x.dtype
        assert torch.isfinite(y).all()

        # token by token from an empty state (max_len = L: the cache may be exactly full)
        state = bb.init_state(B, max_len=L)
        ys = []
        for t in range(L):
            y_t, state = bb.step(x[:, t], state)
            assert y_t.shape == (B, D) and y_t.dtype == x.dtype
            ys.append(y_t)
        err = _max_err(torch.stack(ys, 1), y)
        assert err <= TOL, f"step-by-step vs forward: max abs err {err:.2e}"

        # prefill a prefix, step the rest
        state = bb.init_state(B, max_len=L)
        y_pre, state = bb.prefill(x[:, :split], state)
        assert y_pre.shape == (B, split, D)
        ys = [y_pre]
        for t in range(split, L):
            y_t, state = bb.step(x[:, t], state)
            ys.append(y_t[:, None])
        err = _max_err(torch.cat(ys, 1), y)
        assert err <= TOL, f"prefill({split}) + step vs forward: max abs err {err:.2e}"

        # two prefills (the second continues from a non-empty state), then steps
        s2 = L if split2 is None else split2
        state = bb.init_state(B, max_len=L)
        ya, state = bb.prefill(x[:, :split], state)
        parts = [ya]
        if s2 > split:
            yb, state = bb.prefill(x[:, split:s2], state)
            assert yb.shape == (B, s2 - split, D)
            parts.append(yb)
        for t in range(s2, L):
            y_t, state = bb.step(x[:, t], state)
            parts.append(y_t[:, None])
        err = _max_err(torch.cat(parts, 1), y)
        assert err <= TOL, f"prefill({split}) + prefill({s2 - split}) + step vs forward: max abs err {err:.2e}"

    assert torch.equal(x, x0), "the backbone modified its input"


@pytest.fixture(scope="session")
def backbone_contract():
    """The contract check as a fixture (session-scoped, so it is allowed inside @given tests)."""
    return check_backbone_contract


# --------------------------------------------------------------------------------------------
# gradients of the scan ops against their naive recurrences
# --------------------------------------------------------------------------------------------

def grads_of_random_projection(fn, inputs, seed: int = 1):
    """d/d inputs of sum(out * W) over every output of fn(*inputs) (an output and a state, the state a
    tensor or a tuple of them), W fixed random weights: one scalar that reaches every output. W is drawn
    in float64 and cast, so inputs of any dtype get the same projection."""
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    out, state = fn(*inputs)
    outs = (out, *state) if isinstance(state, (tuple, list)) else (out, state)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


@pytest.fixture(scope="session")
def grads():
    """grads(fn, inputs): grads_of_random_projection, for the scan ops' gradient tests."""
    return grads_of_random_projection
