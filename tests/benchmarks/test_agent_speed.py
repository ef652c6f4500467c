"""The Drama agent's update, phase by phase, at the `cpu` size (the default on a CPU) for each backbone
(pytest-benchmark; not in the default run). `wmbench bench --agent` measures the same phases with peak
memory and FLOPs, one process per backbone, and writes a record.

    pytest tests/benchmarks --benchmark-only -k agent
"""
import pytest
import torch

from wmbench.agent import ActorCritic
from wmbench.agent.estimate import random_batches
from wmbench.world_model import WorldModel, get_preset

N_ACTIONS = 18


@pytest.fixture(scope="module", params=["mamba2", "mamba", "gru", "transformer"])
def agent(request):
    torch.manual_seed(0)
    m = get_preset("cpu", backbone=request.param)
    wm, ac = WorldModel(m, N_ACTIONS), ActorCritic(m, N_ACTIONS)
    batch, ctx = random_batches(m, (m.image_size, m.image_size, m.image_channels), N_ACTIONS, 1.0)
    return wm, ac, batch, ctx


def test_world_model_update(benchmark, agent):
    wm, _, batch, _ = agent
    out = benchmark.pedantic(wm.train_step, args=(batch,), rounds=5, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(out["loss"]))


def test_imagination(benchmark, agent):
    wm, ac, _, (obs, act) = agent
    img = benchmark.pedantic(wm.imagine, args=(obs, act, ac), rounds=5, warmup_rounds=1)
    assert img.rewards.shape == (obs.shape[0], wm.cfg.imag_horizon)


def test_actor_critic_update(benchmark, agent):
    wm, ac, _, (obs, act) = agent
    img = wm.imagine(obs, act, ac)
    out = benchmark.pedantic(ac.update, args=(img,), rounds=5, warmup_rounds=1)
    assert out["entropy"] > 0
