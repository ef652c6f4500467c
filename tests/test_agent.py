"""Actor-critic: λ-returns by hand, percentile return normalisation, acting, the slow critic, and a
one-step bandit in imagination that the actor must learn."""
import copy
import math

import pytest
import torch

from wmbench.agent import Agent, ReturnNormalizer, lambda_return
from wmbench.world_model.config import get_preset
from wmbench.world_model import Imagination


def test_lambda_return_hand_case():
    g, l = 0.5, 0.5
    r = torch.tensor([[1.0, 2.0, 3.0]])
    c = torch.tensor([[1.0, 0.0, 1.0]])            # the episode ends after step 1
    v = torch.tensor([[10.0, 20.0, 30.0, 40.0]])   # V(s_0..s_3)
    # dreamerv3: R3 = 40; R2 = 3 + .5(.5*40 + .5*40) = 23; R1 = 2 + 0 = 2; R0 = 1 + .5(.5*20 + .5*2) = 6.5
    assert torch.allclose(lambda_return(r, c, v, g, l), torch.tensor([[6.5, 2.0, 23.0]]))
    # storm (code): V(s_t) instead of V(s_{t+1}): R2 = 3 + .5(.5*30 + .5*40) = 20.5; R1 = 2;
    # R0 = 1 + .5(.5*10 + .5*2) = 4
    assert torch.allclose(lambda_return(r, c, v, g, l, "storm"), torch.tensor([[4.0, 2.0, 20.5]]))
    # λ = 0 is one-step TD, λ = 1 is the discounted Monte-Carlo return bootstrapped at the end
    ones = torch.ones(1, 3)
    assert torch.allclose(lambda_return(r, ones, v, g, 0.0), r + g * v[:, 1:])
    monte_carlo = 1 + .5 * 2 + .25 * 3 + .125 * 40
    assert torch.allclose(lambda_return(r, ones, v, g, 1.0)[:, 0], torch.tensor([monte_carlo]))
    with pytest.raises(ValueError):
        lambda_return(r, c, v[:, :3], g, l)


def test_percentile_normalisation():
    norm = ReturnNormalizer((5.0, 95.0), decay=0.99)
    x = torch.arange(101.0)                         # P5 = 5, P95 = 95
    s = norm.update(x)
    assert math.isclose(norm.lo.item(), 0.05, rel_tol=1e-5) and math.isclose(norm.hi.item(), 0.95, rel_tol=1e-5)
    assert s.item() == 1.0                          # max(1, 0.9)
    for _ in range(99):
        s = norm.update(x)
    assert math.isclose(s.item(), 90 * (1 - 0.99 ** 100), rel_tol=1e-4)   # EMA from 0, no bias correction


def test_act_shapes_and_validation():
    cfg = get_preset("tiny")
    ag = Agent(cfg, 4)
    s = torch.randn(7, cfg.state_dim)
    a = ag.act(s)
    assert a.shape == (7,) and a.dtype == torch.long and ((0 <= a) & (a < 4)).all()
    assert torch.equal(ag.act(s, greedy=True), ag.actor(s).argmax(-1))
    with pytest.raises(ValueError, match="state_dim"):
        ag.act(torch.randn(7, cfg.state_dim + 1))


def bandit_rollout(ag, cfg, B=32, H=4):
    """Imagined rollout where action 0 pays 1 and every other action pays 0."""
    s = torch.randn(B, H + 1, cfg.state_dim)
    a = ag.act(s[:, :-1].reshape(-1, cfg.state_dim)).view(B, H)
    return Imagination(z=s[..., :cfg.latent_dim], h=s[..., cfg.latent_dim:], actions=a,
                       rewards=(a == 0).float(), terminations=torch.zeros(B, H))


def test_update_learns_a_bandit_and_moves_slow_critic():
    torch.manual_seed(0)
    cfg = get_preset("tiny", ac_lr=3e-3, ac_warmup=0, entropy=0.0)
    ag = Agent(cfg, 3)
    slow0 = [p.clone() for p in ag.slow_critic.parameters()]
    out = ag.update(bandit_rollout(ag, cfg))
    assert all(math.isfinite(v) for v in out.values())
    # slow <- 0.98 slow + 0.02 critic
    for p0, ps, pc in zip(slow0, ag.slow_critic.parameters(), ag.critic.parameters()):
        assert torch.allclose(ps, 0.98 * p0 + 0.02 * pc, atol=1e-6)
    for _ in range(40):
        ag.update(bandit_rollout(ag, cfg))
    probe = torch.randn(256, cfg.state_dim)
    assert (ag.act(probe) == 0).float().mean() > 0.8     # started near 1/3
    assert ag.value(probe).mean() > 0.5                  # returns are > 1 per state


@pytest.mark.parametrize("critic_target", ["dreamerv3", "storm"])
def test_update_matches_the_losses_written_out(critic_target):
    """The update's losses and gradient norm against the module docstring's equations, computed with a
    separate critic pass for every value (the update shares one pass between returns and loss)."""
    torch.manual_seed(1)
    cfg = get_preset("tiny", critic_target=critic_target, entropy=3e-4)
    ag = Agent(cfg, 3)
    with torch.no_grad():                            # values that differ from state to state (init: v = 0)
        for p in [*ag.critic.parameters(), *ag.slow_critic.parameters()]:
            p.normal_(0.0, 0.3)
    ag.update(bandit_rollout(ag, cfg))               # moves the return-scale EMAs off 0
    im = bandit_rollout(ag, cfg)
    ref = copy.deepcopy(ag)
    out = ag.update(im)

    s = torch.cat([im.z, im.h], -1)
    r, c = im.rewards, 1.0 - im.terminations.float()
    with torch.no_grad():
        v = ref.value(s)
        R = lambda_return(r, c, v, cfg.gamma, cfg.lam, cfg.lambda_return)
        v_slow = ref.value(s, slow=True)
        target = v_slow[:, :-1] if critic_target == "dreamerv3" else lambda_return(
            r, c, v_slow, cfg.gamma, cfg.lam, cfg.lambda_return)
        lo = ref.return_norm.decay * ref.return_norm.lo + (1 - ref.return_norm.decay) * torch.quantile(R, 0.05)
        hi = ref.return_norm.decay * ref.return_norm.hi + (1 - ref.return_norm.decay) * torch.quantile(R, 0.95)
        scale = torch.clamp(hi - lo, min=1.0)
    logp = ref.logprobs(s[:, :-1])
    logp_a = logp.gather(-1, im.actions.long().unsqueeze(-1)).squeeze(-1)
    policy = -(logp_a * (R - v[:, :-1]) / scale).mean()
    entropy = -(logp.exp() * logp).sum(-1).mean()
    critic = ref.critic(s[:, :-1])
    value = ref.twohot.loss(critic, R) + ref.twohot.loss(critic, target)
    loss = policy - cfg.entropy * entropy + value
    loss.backward()
    grads = [p.grad for p in [*ref.actor.parameters(), *ref.critic.parameters()]]
    gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    for key, want in [("ac_loss", loss), ("policy_loss", policy), ("value_loss", value),
                      ("entropy", entropy), ("return_scale", scale), ("value_mean", v.mean()),
                      ("ac_grad_norm", gnorm)]:
        assert out[key] == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6), key


def test_non_finite_agent_loss_raises():
    cfg = get_preset("tiny")
    ag = Agent(cfg, 3)
    im = bandit_rollout(ag, cfg)
    im.rewards[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="actor-critic"):
        ag.update(im)
