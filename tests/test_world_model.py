"""World-model shell: shapes/finite losses for every backbone, parameter counts, imagination,
prefill+step consistency, two-hot, free bits, KL, LaProp, presets and input validation."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wmbench.backbones  # noqa: F401  (registers the built-in backbones)
from wmbench import list_backbones
from wmbench.agent import Agent
from wmbench.world_model import WorldModel
from wmbench.world_model.config import get_preset, list_presets
from wmbench.world_model.distributions import (TwoHot, categorical_kl, free_bits_kl, symexp, symlog,
                                               unimix_logprobs)
from wmbench.world_model.optim import LaProp, make_optimizer

BACKBONES = list_backbones()
N_ACTIONS = 5


def tiny(backbone="gru", **kw):
    return get_preset("tiny", backbone=backbone, **kw)


def fake_batch(B=2, L=8, n_actions=N_ACTIONS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randint(0, 256, (B, L, 64, 64, 3), dtype=torch.uint8, generator=g),
                action=torch.randint(0, n_actions, (B, L), generator=g),
                reward=torch.randn(B, L, generator=g),
                termination=(torch.rand(B, L, generator=g) < 0.2).float())


# ------------------------------------------------------------------------------------------------
# every backbone in the shell

@pytest.mark.parametrize("backbone", BACKBONES)
def test_train_step_and_imagination_every_backbone(backbone):
    torch.manual_seed(0)
    cfg = tiny(backbone)
    wm, agent = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    batch = fake_batch()
    before = [p.detach().clone() for p in wm.parameters()]
    out = wm.train_step(batch)
    assert {"loss", "recon", "reward", "termination", "dyn", "rep", "kl", "grad_norm"} <= set(out)
    assert all(math.isfinite(v) for v in out.values())
    assert out["dyn"] >= cfg.free_bits and out["rep"] >= cfg.free_bits
    assert any(not torch.equal(b, p) for b, p in zip(before, wm.parameters()))   # it did learn something
    # imagination: B contexts of l_img, H steps
    B, T, H = 3, cfg.imag_context, 5
    obs = fake_batch(B, T)["obs"]
    im = wm.imagine(obs, torch.randint(0, N_ACTIONS, (B, T)), agent, horizon=H)
    assert im.z.shape == (B, H + 1, cfg.latent_dim) and im.h.shape == (B, H + 1, cfg.d_model)
    assert im.states.shape == (B, H + 1, cfg.state_dim)
    assert im.actions.shape == (B, H) and im.actions.dtype == torch.long
    assert im.rewards.shape == im.terminations.shape == im.continues.shape == (B, H)
    assert set(im.terminations.unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(im.states).all() and torch.isfinite(im.rewards).all()
    assert torch.allclose(im.z.view(B, H + 1, cfg.n_latents, cfg.n_classes).sum(-1), torch.ones(()))
    assert wm.training   # imagine restores the mode it found
    ac = agent.update(im)
    assert all(math.isfinite(v) for v in ac.values())


@pytest.mark.parametrize("start,latent", [("paper", "prior"), ("code", "prior"), ("paper", "posterior")])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_imagination_equals_forward_recomputation(backbone, start, latent):
    """prefill(context) + step(imagined tokens) == one forward pass over the concatenated sequence, and
    the first policy state is [prior sample after the context, d] (s2.3), or the last frame's posterior."""
    torch.manual_seed(1)
    cfg = tiny(backbone, imagine_start=start, policy_latent=latent)
    wm, agent = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    wm.train_step(fake_batch())     # move BatchNorm statistics away from their initial values
    B, T, H = 3, cfg.imag_context, 6
    obs, acts = fake_batch(B, T, seed=3)["obs"], torch.randint(0, N_ACTIONS, (B, T))
    n = T - 1 if start == "paper" else T                 # prefilled steps
    n_enc = T if latent == "posterior" else n            # frames imagine() encodes
    wm.eval()
    torch.manual_seed(7)            # replay imagine()'s random draws: posteriors, then the first prior
    with torch.no_grad():
        _, z_ctx = wm.encode(obs[:, :n_enc])
        h_ctx = wm.backbone(wm.embed(z_ctx[:, :n], acts[:, :n]))
        z_first = z_ctx[:, -1] if latent == "posterior" else wm.sample_prior(h_ctx[:, -1])
    wm.train()
    torch.manual_seed(7)
    im = wm.imagine(obs, acts, agent, horizon=H)
    assert torch.allclose(im.z[:, 0], z_first, atol=1e-5)   # prefill vs forward: float rounding only
    wm.eval()
    with torch.no_grad():
        x = torch.cat([wm.embed(z_ctx[:, :n], acts[:, :n]), wm.embed(im.z[:, :H], im.actions)], 1)
        h = wm.backbone(x)                               # (B, n + H, d)
        assert torch.allclose(im.h, h[:, n - 1:], atol=1e-4)
        assert torch.allclose(im.rewards, wm.reward(h[:, n:]), atol=1e-4)
        assert torch.equal(im.terminations, wm.termination(h[:, n:]))


def test_imagination_from_the_prior_ignores_the_last_context_frame():
    """Paper start + prior latent: the l_img-th frame only marks where the rollout starts."""
    cfg = tiny("gru")
    wm, agent = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    obs, acts = fake_batch(2, cfg.imag_context, seed=4)["obs"], torch.randint(0, N_ACTIONS, (2, cfg.imag_context))
    other = obs.clone()
    other[:, -1] = 255 - other[:, -1]
    torch.manual_seed(3)
    a = wm.imagine(obs, acts, agent, horizon=3)
    torch.manual_seed(3)
    b = wm.imagine(other, acts, agent, horizon=3)
    assert torch.equal(a.z, b.z) and torch.equal(a.h, b.h)


def test_imagination_reward_alignment_code_option():
    torch.manual_seed(2)
    cfg = tiny("gru", reward_alignment="code")
    wm, agent = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    obs = fake_batch(2, cfg.imag_context)["obs"]
    im = wm.imagine(obs, torch.zeros(2, cfg.imag_context, dtype=torch.long), agent, horizon=4)
    wm.eval()
    with torch.no_grad():   # the code attaches to step i the reward predicted from d before a_i
        assert torch.allclose(im.rewards, wm.reward(im.h[:, :-1]), atol=1e-5)


@pytest.mark.parametrize("latent", ["prior", "posterior"])
def test_policy_state_layout(latent):
    torch.manual_seed(0)
    cfg = tiny("gru", policy_latent=latent)
    wm = WorldModel(cfg, N_ACTIONS)
    b = fake_batch(2, 4)
    s = wm.policy_state(b["obs"], b["action"][:, :3])
    assert s.shape == (2, cfg.state_dim)
    with pytest.raises(ValueError, match="T-1"):
        wm.policy_state(b["obs"], b["action"])
    # d_{t-1} from the 3 past (frame, action) pairs, as in training
    wm.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        _, z = wm.encode(b["obs"] if latent == "posterior" else b["obs"][:, :3])
        h = wm.backbone(wm.embed(z[:, :3], b["action"][:, :3]))[:, -1]
        z_t = z[:, -1] if latent == "posterior" else wm.sample_prior(h)
    torch.manual_seed(5)
    s = wm.policy_state(b["obs"], b["action"][:, :3])
    assert torch.allclose(s, torch.cat([z_t, h], -1), atol=1e-5)
    if latent == "posterior":
        s1 = wm.policy_state(b["obs"][:, :1], b["action"][:, :0])
        assert torch.equal(s1[:, cfg.latent_dim:], torch.zeros(2, cfg.d_model))
    else:   # the prior never looks at the current frame, and needs a past one
        other = b["obs"].clone()
        other[:, -1] = 255 - other[:, -1]
        torch.manual_seed(5)
        assert torch.equal(wm.policy_state(other, b["action"][:, :3]), s)
        with pytest.raises(ValueError, match="past frame"):
            wm.policy_state(b["obs"][:, :1], b["action"][:, :0])


# ------------------------------------------------------------------------------------------------
# parameter counts

def test_xs_component_counts_match_official_code():
    """Official code, Pong (|A| = 6): encoder 232,272; dist heads 1,574,912; decoder 1,281,811;
    reward head 197,119; termination head 131,841 (drama-official-code.md section 10)."""
    wm = WorldModel(get_preset("XS"), 6, backbone=torch.nn.Identity())
    c = wm.param_counts()
    assert (c["encoder"], c["dist_heads"], c["decoder"], c["reward_head"], c["termination_head"]) == \
        (232_272, 1_574_912, 1_281_811, 197_119, 131_841)
    assert c["sequence_model"] == (1024 + 6) * 512 + 512 + 512     # the stem only: Linear + RMSNorm


@pytest.mark.skipif("mamba2" not in BACKBONES, reason="mamba2 backbone not registered")
def test_xs_total_parameter_count_mamba2():
    """XS with Mamba-2 on Pong (6 actions): 7,155,459 with the code's headdim 64 (= the official count),
    7,147,219 with the paper's headdim 128 (8 heads: 8,240 fewer in_proj rows / per-head params)."""
    assert WorldModel(get_preset("XS", headdim=64), 6).param_counts()["total"] == 7_155_459
    assert WorldModel(get_preset("XS"), 6).param_counts()["total"] == 7_147_219


@pytest.mark.skipif("mamba" not in BACKBONES, reason="mamba backbone not registered")
def test_xs_total_parameter_count_mamba1():
    """The official code's Mamba (v1) option on Pong: 7,337,315 (drama-official-code.md section 10)."""
    assert WorldModel(get_preset("XS", backbone="mamba"), 6).param_counts()["total"] == 7_337_315


def test_s_preset_doubles_filters_and_state():
    xs, s = get_preset("XS"), get_preset("S")
    assert s.enc_filters == tuple(2 * f for f in xs.enc_filters) and s.d_state == 2 * xs.d_state


# ------------------------------------------------------------------------------------------------
# losses and their pieces

@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False))
def test_twohot_round_trip(x):
    th = TwoHot(255)
    w = th.encode(torch.tensor([x]))
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and (w > 0).sum() <= 2 and (w >= 0).all()
    back = th.decode(torch.log(w)).item()
    assert math.isclose(back, x, rel_tol=1e-4, abs_tol=1e-4)


def test_twohot_hand_case_and_loss():
    th = TwoHot(n_bins=5, low=-2.0, high=2.0)       # bins -2, -1, 0, 1, 2 in symlog space
    x = symexp(torch.tensor(0.25))                  # symlog(x) = 0.25: 3/4 on bin 0, 1/4 on bin 1
    assert torch.allclose(th.encode(x), torch.tensor([0, 0, 0.75, 0.25, 0]))
    assert torch.allclose(symlog(symexp(torch.tensor([-3.0, 0.0, 5.0]))), torch.tensor([-3.0, 0.0, 5.0]))
    logits = torch.zeros(5)
    assert math.isclose(th.loss(logits, x).item(), math.log(5), rel_tol=1e-6)   # CE vs uniform


def test_free_bits_hand_case():
    kl = torch.tensor([0.5, 2.0], requires_grad=True)
    step = free_bits_kl(kl, 1.0, "step")            # paper: mean(max(1, KL_t)) = (1 + 2) / 2
    assert math.isclose(step.item(), 1.5)
    step.backward()
    assert kl.grad.tolist() == [0.0, 0.5]           # no gradient below the free bits
    kl.grad = None
    batch = free_bits_kl(kl, 1.0, "batch")          # code: max(1, mean KL) = max(1, 1.25)
    assert math.isclose(batch.item(), 1.25)
    assert math.isclose(free_bits_kl(torch.tensor([0.2, 0.4]), 1.0, "batch").item(), 1.0)


def test_categorical_kl_and_unimix():
    torch.manual_seed(0)
    lp = unimix_logprobs(torch.randn(4, 32, 32) * 5, 0.01)
    lq = unimix_logprobs(torch.randn(4, 32, 32) * 5, 0.01)
    assert lp.exp().min() >= 0.01 / 32 - 1e-7
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=lp),
                                            torch.distributions.Categorical(logits=lq)).sum(-1)
    assert torch.allclose(categorical_kl(lp, lq), ref, atol=1e-4)
    assert torch.allclose(categorical_kl(lp, lp), torch.zeros(4), atol=1e-6)


def test_non_finite_loss_raises_and_keeps_parameters():
    cfg = tiny("gru")
    wm = WorldModel(cfg, N_ACTIONS)
    batch = fake_batch()
    batch["reward"][0, 3] = float("nan")
    before = [p.detach().clone() for p in wm.parameters()]
    with pytest.raises(FloatingPointError, match="reward"):
        wm.train_step(batch)
    assert all(torch.equal(b, p) for b, p in zip(before, wm.parameters()))


def test_bad_inputs_are_value_errors():
    wm = WorldModel(tiny("gru"), N_ACTIONS)
    b = fake_batch()
    with pytest.raises(ValueError, match="observations"):
        wm.train_step(dict(b, obs=b["obs"][..., :32, :]))
    with pytest.raises(ValueError, match="actions must be in"):
        wm.train_step(dict(b, action=b["action"] + N_ACTIONS))
    with pytest.raises(ValueError, match="missing"):
        wm.train_step({"obs": b["obs"]})
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("XL")
    with pytest.raises(ValueError, match="unknown config field"):
        get_preset("XS", d_modle=3)
    with pytest.raises(ValueError, match="free_bits_mode"):
        get_preset("XS", free_bits_mode="sometimes")


def test_presets_are_found_case_insensitively():
    assert list_presets() == ["XS", "S", "tiny", "cpu"]
    for name in list_presets():
        assert get_preset(name.upper()) == get_preset(name.lower())
    assert get_preset("xs", backbone="gru").backbone_kwargs() == {"dropout": 0.1}
    assert get_preset("XS").backbone_kwargs() == {"dropout": 0.1, "d_state": 16, "headdim": 128}


# ------------------------------------------------------------------------------------------------
# optimiser

def test_laprop_first_step_is_lr_times_sign_and_decay_modes():
    # step 1: v = (1-b2) g^2 -> v_hat = g^2; m = (1-b1) lr g/|g|; m / bias-corr = lr sign(g)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = LaProp([p], lr=0.1, eps=1e-20)
    p.grad = torch.tensor([0.5, -4.0, 0.0])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([0.9, -1.9, 3.0]))
    for mode, factor in (("unscaled", 1 - 0.01), ("decoupled", 1 - 0.1 * 0.01)):
        q = torch.nn.Parameter(torch.tensor([2.0]))
        opt = LaProp([q], lr=0.1, weight_decay=0.01, weight_decay_mode=mode)
        q.grad = torch.tensor([0.0])
        opt.step()
        assert math.isclose(q.item(), 2.0 * factor, rel_tol=1e-6)


def test_no_weight_decay_params_are_excluded():
    m = torch.nn.Linear(3, 3)
    m.bias._no_weight_decay = True
    opt, sched = make_optimizer(m, "laprop", lr=1e-3, eps=1e-20, weight_decay=0.1, warmup=10)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(m.weight) in decayed and id(m.bias) not in decayed
    assert math.isclose(opt.param_groups[0]["lr"], 1e-4)   # warm-up: (t+1)/10 of the lr at t = 0


def test_onehot_sampling_frequencies_and_straight_through():
    from wmbench.world_model.distributions import sample_onehot_st
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.1, 0.0, 0.6, 0.3])).expand(20000, 1, 4).clone().requires_grad_(True)
    z = sample_onehot_st(logits)
    freq = z.detach().mean((0, 1))
    assert freq[1] == 0 and torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.015)
    assert torch.equal(z.detach().sum(-1), torch.ones(20000, 1))
    (z * torch.arange(4.0)).sum().backward()       # gradient flows through the probabilities
    assert logits.grad.abs().sum() > 0


def test_frame_pooling_hwc_equals_chw():
    wm = WorldModel(tiny("gru", obs_pool=4), N_ACTIONS)
    obs = fake_batch(1, 3)["obs"]                                   # (1, 3, 64, 64, 3) uint8
    hwc = wm._frames(obs)
    chw = wm._frames(obs.movedim(-1, -3))
    ref = torch.nn.functional.avg_pool2d(obs[0].movedim(-1, 1).float() / 255, 4)
    assert hwc.shape == (3, 3, 16, 16)
    assert torch.allclose(hwc, ref, atol=1e-6) and torch.allclose(chw, ref, atol=1e-6)


def test_training_state_resume_gives_identical_next_losses():
    import io
    torch.manual_seed(0)
    cfg = tiny("mamba2" if "mamba2" in BACKBONES else "gru")
    wm, ag = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    b = fake_batch()
    wm.train_step(b)
    ag.update(wm.imagine(b["obs"][:, :4], b["action"][:, :4], ag))
    buf = io.BytesIO()
    torch.save({"wm": wm.training_state(), "ag": ag.training_state()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)          # no pickled code needed
    wm2, ag2 = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    wm2.load_training_state(saved["wm"])
    ag2.load_training_state(saved["ag"])
    outs = []
    for w, a in ((wm, ag), (wm2, ag2)):
        torch.manual_seed(5)
        lw = w.train_step(b)
        la = a.update(w.imagine(b["obs"][:, :4], b["action"][:, :4], a))
        outs.append((lw, la))
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="lacks"):
        wm2.load_training_state({"model": saved["wm"]["model"]})


def test_bf16_autocast_option_runs():
    torch.manual_seed(0)
    cfg = tiny("gru", amp=True)
    wm, ag = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    b = fake_batch()
    out = wm.train_step(b)
    assert all(math.isfinite(v) for v in out.values())
    im = wm.imagine(b["obs"][:, :4], b["action"][:, :4], ag)
    assert im.states.dtype == torch.float32
    assert all(math.isfinite(v) for v in ag.update(im).values())


def test_imagination_does_not_reset_at_predicted_terminations():
    """The rollout runs through predicted episode ends on the same backbone state (section 2.3)."""
    torch.manual_seed(0)
    cfg = tiny("gru")
    wm, agent = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    with torch.no_grad():
        wm.term_head[-1].bias.fill_(50.0)           # every step predicts 'terminated'
    obs = fake_batch(2, cfg.imag_context)["obs"]
    im = wm.imagine(obs, torch.zeros(2, cfg.imag_context, dtype=torch.long), agent, horizon=6)
    assert im.terminations.eq(1).all() and im.continues.eq(0).all()
    # states keep evolving from the previous one (a reset would restart from the zero state each step)
    assert not torch.allclose(im.h[:, 2], im.h[:, 3])
    fresh, _ = wm.backbone.step(wm.embed(im.z[:, 2], im.actions[:, 2]), wm.backbone.init_state(2))
    assert not torch.allclose(im.h[:, 3], fresh, atol=1e-4)


def test_chunked_context_encoding_matches_one_pass(monkeypatch):
    """Without autograd the encoder sees ENCODE_CHUNK frames at a time; the latents and the sample
    drawn from them are those of one pass over every frame."""
    import wmbench.world_model.model as model_mod
    wm = WorldModel(get_preset("tiny"), 4).eval()
    obs = torch.randint(0, 256, (5, 3, 64, 64, 3), dtype=torch.uint8)
    outs = []
    for chunk in (10**9, 4):
        monkeypatch.setattr(model_mod, "ENCODE_CHUNK", chunk)
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(wm.encode(obs))
    (lp1, z1), (lp2, z2) = outs
    assert torch.allclose(lp1, lp2, atol=1e-6) and torch.equal(z1, z2)


@pytest.mark.filterwarnings("ignore:Mismatch dtype")   # the reference path's own warning
def test_rmsnorm_under_bf16_autocast_is_the_composite_on_the_fused_path(monkeypatch):
    """Our RMSNorm under autocast: the fused kernel on the upcast input, bit-equal (values and gradients)
    to torch's own fallback for a bf16 input with an fp32 weight. torch warns (once per process) when
    input and weight dtypes differ, so the kernel's arguments are checked rather than the warning."""
    import torch.nn as nn

    from wmbench.backbones.base import RMSNorm
    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-5), nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(32, 64)
    real, seen = torch.rms_norm, []

    def spy(inp, shape, weight=None, eps=None):
        seen.append((inp.dtype, weight.dtype))
        return real(inp, shape, weight, eps)

    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            if m is ours:
                monkeypatch.setattr(torch, "rms_norm", spy)
            y = m(xi.bfloat16())
            monkeypatch.setattr(torch, "rms_norm", real)
        (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
        outs.append((y, xi.grad, m.weight.grad))
    (y1, gx1, gw1), (y2, gx2, gw2) = outs
    assert y1.dtype == torch.bfloat16 and torch.equal(y1, y2)
    assert torch.equal(gx1, gx2) and torch.allclose(gw1, gw2, rtol=1e-6, atol=1e-6)
    assert seen == [(torch.float32, torch.float32)]


@pytest.mark.parametrize("amp,rollout,rollout_bf16", [(False, "auto", False), (True, "auto", True),
                                                     (True, "fp32", False), (True, "amp", True)])
def test_imagination_precision(amp, rollout, rollout_bf16, monkeypatch):
    """cfg.amp: the context frames' conv encoder runs under bf16 autocast (the official code's), the
    posterior head and its sampling in fp32; the prefill and rollout under bf16 autocast on a CPU ("auto":
    the code without CUDA graphs) or with rollout_precision "amp", in fp32 with "fp32"; without amp
    everything stays fp32. The prior's log-probs are fp32 either way."""
    torch.manual_seed(0)
    cfg = tiny("gru", amp=amp, rollout_precision=rollout)
    wm, ag = WorldModel(cfg, N_ACTIONS), Agent(cfg, N_ACTIONS)
    seen = []

    def spy(name, fn):
        def wrapped(*args):
            out = fn(*args)
            seen.append((name, torch.is_autocast_enabled("cpu"), (out[0] if isinstance(out, tuple) else out).dtype))
            return out
        return wrapped
    monkeypatch.setattr(wm.encoder, "forward", spy("encoder", wm.encoder.forward))
    monkeypatch.setattr(wm.post_head, "forward", spy("post_head", wm.post_head.forward))
    monkeypatch.setattr(wm.backbone, "prefill", spy("prefill", wm.backbone.prefill))
    monkeypatch.setattr(wm.backbone, "step", spy("step", wm.backbone.step))
    monkeypatch.setattr(wm, "prior", spy("prior", wm.prior))
    b = fake_batch()
    im = wm.imagine(b["obs"][:, :4], b["action"][:, :4], ag, horizon=2)
    conv_dtype = torch.bfloat16 if amp else torch.float32
    assert seen[:2] == [("encoder", amp, conv_dtype), ("post_head", False, torch.float32)]
    # (the backbone's output dtype under autocast is its own business: a GRU's fp32 state promotes it)
    rollout = [s[:2] for s in seen if s[0] in ("prefill", "step")]
    assert rollout == [("prefill", rollout_bf16)] + [("step", rollout_bf16)] * 2
    assert [s for s in seen if s[0] == "prior"] == [("prior", rollout_bf16, torch.float32)] * 3
    assert im.z.dtype == im.h.dtype == torch.float32
    assert torch.isfinite(im.h).all()


def test_rollout_precision_auto_follows_the_official_code_per_device():
    """"auto": fp32 where the official code captures a CUDA graph (CUDA), bf16 autocast elsewhere."""
    from types import SimpleNamespace
    rule = WorldModel.rollout_amp.fget
    for device, mode, amp, want in [("cuda", "auto", True, False), ("cpu", "auto", True, True),
                                    ("cuda", "amp", True, True), ("cpu", "fp32", True, False),
                                    ("cpu", "amp", False, False)]:
        cfg = tiny("gru", amp=amp, rollout_precision=mode)
        assert rule(SimpleNamespace(cfg=cfg, device=torch.device(device))) is want, (device, mode, amp)
    with pytest.raises(ValueError, match="rollout_precision must be one of auto, fp32, amp"):
        tiny("gru", rollout_precision="bf16")
