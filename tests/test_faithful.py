"""Paper vs official code: each of the code's choices as an option, and `--faithful code` setting them all.

Reference values are computed here independently (Welford / Chan moments with numpy, fan-average
standard deviations by hand), never read back from the implementation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wmbench.agent import Agent, RunningNorm
from wmbench.world_model.config import PAPER_VS_CODE, code_choices, get_preset
from wmbench.agent.config import TrainConfig, check_config, resolve_config
from wmbench.world_model import WorldModel
from wmbench.world_model.optim import make_optimizer

N_ACTIONS = 5


# ------------------------------------------------------------------------------------------------
# actor-input normalisation (the code's VecNormalize)

def test_running_norm_matches_the_moments_of_everything_seen():
    torch.manual_seed(0)
    norm = RunningNorm(3, clip=1e9)
    seen = []
    for n in (1, 7, 1, 256, 3):             # acting (1), imagination (B), updates (B x H) interleave
        x = torch.randn(n, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -3.0, 0.5])
        out = norm(x)
        seen.append(x.numpy())
        allx = np.concatenate(seen).astype(np.float64)
        # the prior (mean 0, var 1) with count 1e-4, merged with the data: ~ the data's moments
        c0 = 1e-4
        n_all = len(allx)
        mean = (allx.sum(0) + 0.0 * c0) / (n_all + c0)
        m2 = c0 * 1.0 + ((allx - allx.mean(0)) ** 2).sum(0) + c0 * n_all / (n_all + c0) * allx.mean(0) ** 2
        var = m2 / (n_all + c0)
        assert np.allclose(norm.mean.numpy(), mean, rtol=1e-4, atol=1e-5)
        assert np.allclose(norm.var.numpy(), var, rtol=1e-3, atol=1e-5)
        assert torch.allclose(out, (x - norm.mean) / torch.sqrt(norm.var + 1e-8))
    assert float(norm.count) == pytest.approx(268 + 1e-4)


def test_running_norm_clips_and_freezes():
    norm = RunningNorm(2)
    norm(torch.zeros(100, 2))                                 # var -> ~0: everything else is huge
    y = norm(torch.tensor([[500.0, -500.0]]))
    assert torch.equal(y, torch.tensor([[10.0, -10.0]]))      # clipped at ±10
    before = [b.clone() for b in norm.buffers()]
    norm.frozen = True
    norm(torch.randn(50, 2))
    assert all(torch.equal(a, b) for a, b in zip(before, norm.buffers()))


def test_actor_input_norm_option_is_part_of_the_saved_state():
    cfg = get_preset("tiny", actor_input_norm=True)
    ag = Agent(cfg, N_ACTIONS)
    assert isinstance(ag.input_norm, RunningNorm)
    ag.act(torch.randn(8, cfg.state_dim) * 3 + 1)
    sd = ag.state_dict()
    assert {"input_norm.mean", "input_norm.var", "input_norm.count"} <= set(sd)
    ag2 = Agent(cfg, N_ACTIONS)
    ag2.load_state_dict(sd)
    assert torch.equal(ag2.input_norm.mean, ag.input_norm.mean)
    with ag.frozen_input_stats():                             # evaluation leaves the statistics alone
        ag.act(torch.randn(8, cfg.state_dim))
    assert torch.equal(ag2.input_norm.mean, ag.input_norm.mean) and not ag.input_norm.frozen
    assert Agent(get_preset("tiny"), N_ACTIONS).input_norm is None


# ------------------------------------------------------------------------------------------------
# initialisation

def test_code_init_world_model_truncated_normal_fan_avg():
    torch.manual_seed(0)
    cfg = get_preset("XS", init="code")
    wm = WorldModel(cfg, N_ACTIONS)
    conv = wm.encoder.net[3]                                  # Conv2d(16 -> 32, k5)
    fan_avg = 25 * (16 + 32) / 2
    std = math.sqrt(1 / fan_avg) / 0.87962566103423978
    w = conv.weight.detach()
    assert w.abs().max() <= 2 * std + 1e-7 and torch.all(conv.bias == 0)
    assert float(w.std()) == pytest.approx(std * 0.8796, rel=0.05)   # the truncation's std factor
    head = wm.reward_head[-1]                                 # not zero-initialised under the code's init
    assert head.weight.abs().sum() > 0 and torch.all(head.bias == 0)
    std_h = math.sqrt(2 / (head.in_features + head.out_features)) / 0.87962566103423978
    assert head.weight.abs().max() <= 2 * std_h + 1e-7
    fc = wm.decoder.fc
    assert fc.weight.abs().max() <= 2 * math.sqrt(2 / (fc.in_features + fc.out_features)) / 0.8796 + 1e-6
    # default: DreamerV3's zero reward output
    assert torch.all(WorldModel(get_preset("tiny"), N_ACTIONS).reward_head[-1].weight == 0)


def test_code_init_actor_critic_orthogonal():
    torch.manual_seed(0)
    cfg = get_preset("XS", init="code", ac_layers=3)
    ag = Agent(cfg, N_ACTIONS)
    for net in (ag.actor, ag.critic):
        lin = [m for m in net if isinstance(m, torch.nn.Linear)]
        assert len(lin) == 4
        for m in lin[1:-1]:                                   # square hidden layers: W W^T = 2 I
            w = m.weight.detach()
            assert torch.allclose(w @ w.T, 2 * torch.eye(w.shape[0]), atol=1e-4)
        out = lin[-1].weight.detach()                         # output rows orthonormal x 0.001
        assert torch.allclose(out @ out.T, 1e-6 * torch.eye(out.shape[0]), atol=1e-9)
        assert all(torch.all(m.bias == 0) for m in lin)
    assert torch.equal(ag.slow_critic[0].weight, ag.critic[0].weight)


# ------------------------------------------------------------------------------------------------
# weight decay and bf16

def test_decay_ssm_params_decays_everything():
    m = torch.nn.Linear(3, 3)
    m.bias._no_weight_decay = True
    for decay_all, want in ((False, False), (True, True)):
        opt, _ = make_optimizer(m, "laprop", lr=1e-3, eps=1e-20, weight_decay=0.1, decay_all=decay_all)
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert (id(m.bias) in decayed) == want and id(m.weight) in decayed
    wm = WorldModel(get_preset("tiny", backbone="mamba2", decay_ssm_params=True), N_ACTIONS)
    assert len(wm.optimizer.param_groups) == 1 and wm.optimizer.param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.filterwarnings("ignore:Mismatch dtype")
def test_amp_runs_the_actor_critic_in_bf16():
    cfg = get_preset("tiny", amp=True)
    ag = Agent(cfg, N_ACTIONS)
    seen = []
    ag.actor[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ag.act(torch.randn(4, cfg.state_dim))
    assert seen == [torch.bfloat16]
    assert ag.logprobs(torch.randn(4, cfg.state_dim)).dtype == torch.float32   # losses stay fp32


# ------------------------------------------------------------------------------------------------
# one switch

def test_faithful_code_sets_every_code_choice_and_explicit_values_win():
    cfg = check_config(resolve_config("tiny", game="gridgoal", faithful="code"))
    m = get_preset("tiny", **cfg.model_overrides)
    for field, paper, code, _ in PAPER_VS_CODE:
        if field != "amp":
            assert getattr(m, field) == code, field
    from wmbench.agent.config import bf16_native
    assert m.amp is bf16_native(torch.device("cpu"))   # the code's bf16 only where the CPU has it natively
    assert cfg.dfs_mode == "official" and cfg.stale_reset_frame is True
    # explicit values win over the switch
    cfg2 = check_config(resolve_config("tiny", game="gridgoal", faithful="code", stale_reset_frame=False,
                                       dfs_mode="literal", model_overrides={"headdim": 16}))
    assert cfg2.stale_reset_frame is False and cfg2.dfs_mode == "literal"
    assert cfg2.model_overrides["headdim"] == 16 and cfg2.model_overrides["lambda_return"] == "storm"
    # idempotent (the loop re-checks the config it is given)
    assert check_config(cfg).to_dict() == cfg.to_dict()
    # the default is the paper: nothing overridden, the code's bug not reproduced
    p = check_config(resolve_config("tiny", game="gridgoal"))
    assert p.faithful == "paper" and p.model_overrides == {} and p.stale_reset_frame is False


def test_every_field_the_code_sets_differs_from_the_default_or_is_documented():
    xs = get_preset("XS")
    for field, paper, code, what in PAPER_VS_CODE:
        assert getattr(xs, field) == paper, field            # the table's first column is the default
        assert what
    assert code_choices(bf16=True)["amp"] is True and code_choices(bf16=False)["amp"] is False


@pytest.mark.parametrize("kw, needle", [
    (dict(faithful="codee"), "faithful must be one of paper, code"),
    (dict(dfs_mode="paper"), "'paper' is now called 'literal'"),
    (dict(dfs_mode="temperature"), "dfs_mode must be one of official, literal"),
    (dict(checkpoint_minutes=-1.0), "checkpoint_minutes"),
    (dict(device="foo"), "unknown device 'foo'"),
])
def test_bad_values_are_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        check_config(TrainConfig(game="gridgoal", size="tiny", warmup_steps=100, **kw))
