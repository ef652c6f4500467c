"""Gated DeltaNet mixer and backbone: the contract, a float64 token-by-token reference written from the
paper's equations, causality, gradients, option errors, sizes and the parameter budget."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import wmbench.backbones.gated_deltanet  # noqa: F401  (registers "gated_deltanet")
from wmbench import create_backbone
from wmbench.backbones.gated_deltanet import GatedDeltaNetMixer, gated_deltanet

F64 = torch.float64


def _randomise(module):
    """Non-trivial norm weights, and decays alpha_t spread over about (0.3, 1): every term matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-1.5, 1.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-2.0, 0.0)
            elif name.endswith("A_log"):
                p.uniform_(math.log(0.1), 0.0)


# ------------------------------------------------------------------------------------------------
# the contract: forward == step by step == prefill + step == prefill + prefill + step
# ------------------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_contract_over_sizes(data, backbone_contract):
    d_model = data.draw(st.integers(2, 16), label="d_model")
    opts = {}
    if data.draw(st.booleans(), label="explicit heads"):
        opts["num_heads"] = data.draw(st.integers(1, 3), label="num_heads")
        opts["head_dim"] = data.draw(st.integers(1, 4), label="head_dim")
    opts["expand_v"] = data.draw(st.sampled_from([1, 2, 1.5]), label="expand_v")
    if opts["expand_v"] == 1.5:
        opts["head_dim"] = 2
    opts["conv_size"] = data.draw(st.integers(1, 4), label="conv_size")
    opts["chunk_size"] = data.draw(st.sampled_from([None, 1, 3, 4, 8]), label="chunk_size")
    n_layers = data.draw(st.integers(1, 2), label="n_layers")
    B = data.draw(st.integers(1, 3), label="batch")
    L = data.draw(st.integers(1, 19), label="length")
    split = data.draw(st.integers(1, L), label="split")
    split2 = data.draw(st.integers(split, L), label="split2")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    bb = gated_deltanet(d_model, n_layers, dropout=0.1, **opts).eval()
    _randomise(bb)
    backbone_contract(bb, torch.randn(B, L, d_model), split, split2)


# ------------------------------------------------------------------------------------------------
# an independent reference: the whole mixer, token by token, in float64, from the paper
# ------------------------------------------------------------------------------------------------

def naive_mixer(m: GatedDeltaNetMixer, x: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet, eq. (10) of the paper, one token at a time, with S (d_v, d_k) as in the paper.

    x (B, L, D) float64 -> y (B, L, D). The in_proj rows are [W_q; W_k; W_v; W_gate; w_beta; w_alpha].
    """
    H, dk, dv = m.num_heads, m.head_k_dim, m.head_v_dim
    W = m.in_proj.weight.to(F64)
    rows = [H * dk, H * dk, H * dv, H * dv, H, H]
    Wq, Wk, Wv, Wg, Wb, Wa = torch.split(W, rows, dim=0)
    conv_w = m.conv1d.weight.to(F64)                              # (2 H dk + H dv, K)
    K = conv_w.shape[1]
    A = torch.exp(m.A_log.to(F64))
    dt_bias = m.dt_bias.to(F64)
    w_norm, eps = m.norm.weight.to(F64), m.norm.eps
    Wo = m.out_proj.weight.to(F64)
    B, L, _ = x.shape
    S = torch.zeros(B, H, dv, dk, dtype=F64)
    hist = torch.zeros(B, K, conv_w.shape[0], dtype=F64)          # the last K pre-conv inputs
    ys = []
    for t in range(L):
        xt = x[:, t]
        hist = torch.cat([hist[:, 1:], (xt @ torch.cat([Wq, Wk, Wv]).T)[:, None]], dim=1)
        c = F.silu(torch.einsum("bkc,ck->bc", hist, conv_w))
        q, k, v = torch.split(c, rows[:3], dim=-1)
        q = q.view(B, H, dk)
        k = k.view(B, H, dk)
        v = v.view(B, H, dv)
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        beta = torch.sigmoid(xt @ Wb.T)                               # (B, H)
        alpha = torch.exp(-A * F.softplus(xt @ Wa.T + dt_bias))       # (B, H)
        eye = torch.eye(dk, dtype=F64)
        kkT = k[..., :, None] * k[..., None, :]                       # (B, H, dk, dk)
        # S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T
        S = S @ (alpha[..., None, None] * (eye - beta[..., None, None] * kkT)) \
            + beta[..., None, None] * v[..., :, None] * k[..., None, :]
        o = (S @ q[..., None])[..., 0] / math.sqrt(dk)                # (B, H, dv)
        o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps) * w_norm
        o = o * F.silu((xt @ Wg.T).view(B, H, dv))
        ys.append(o.reshape(B, H * dv) @ Wo.T)
    return torch.stack(ys, 1)


@pytest.mark.parametrize("d_model,opts", [
    (16, {}),                                                   # 6 heads of (2, 4)
    (24, dict(num_heads=2, chunk_size=4)),                      # 2 heads of (9, 18), several chunks
    (8, dict(num_heads=3, head_dim=2, expand_v=1, conv_size=3, chunk_size=5)),
])
def test_matches_the_papers_recurrence_in_float64(d_model, opts):
    torch.manual_seed(0)
    m = GatedDeltaNetMixer(d_model, **opts).double()
    _randomise(m)
    x = torch.randn(2, 13, d_model, dtype=F64)
    ref = naive_mixer(m, x)
    with torch.no_grad():
        y = m(x)
        state = m.init_state(2)
        y_step = torch.stack([m.step(x[:, t], state)[0] for t in range(x.shape[1])], 1)
    assert (y - ref).abs().max() <= 1e-10
    assert (y_step - ref).abs().max() <= 1e-10


# ------------------------------------------------------------------------------------------------
# causality, gradients, autocast
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 6, 13])
def test_causal(t):
    torch.manual_seed(1)
    bb = gated_deltanet(12, 2, chunk_size=4).double()
    x = torch.randn(2, 17, 12, dtype=F64)
    x2 = x.clone()
    x2[:, t:] = torch.randn_like(x2[:, t:])
    with torch.no_grad():
        y, y2 = bb(x), bb(x2)
    assert torch.equal(y[:, :t], y2[:, :t])
    assert not torch.allclose(y[:, t:], y2[:, t:])


def test_gradient_reaches_every_parameter():
    torch.manual_seed(2)
    bb = gated_deltanet(16, 2, chunk_size=4).train()
    x = torch.randn(2, 11, 16, requires_grad=True)
    y = bb(x)
    (y * torch.randn_like(y)).sum().backward()
    names = {n for n, _ in bb.named_parameters()}
    assert {"blocks.0.mixer.A_log", "blocks.0.mixer.dt_bias", "blocks.0.mixer.conv1d.weight",
            "blocks.1.mixer.norm.weight", "blocks.1.mixer.out_proj.weight"} <= names
    for name, p in bb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_float64_gradients_match_the_reference():
    torch.manual_seed(3)
    m = GatedDeltaNetMixer(8, num_heads=2, chunk_size=3).double()
    _randomise(m)
    x = torch.randn(2, 7, 8, dtype=F64)
    w = torch.randn(2, 7, 8, dtype=F64)
    params = list(m.parameters())
    g1 = torch.autograd.grad((m(x) * w).sum(), params)
    g2 = torch.autograd.grad((naive_mixer(m, x) * w).sum(), params)
    for (name, _), a, b in zip(m.named_parameters(), g1, g2):
        assert (a - b).abs().max() <= 1e-9 * (1 + b.abs().max()), name


def test_bf16_autocast_forward_backward_and_step():
    torch.manual_seed(4)
    bb = gated_deltanet(32, 2, chunk_size=8)
    x = torch.randn(2, 20, 32)
    y32 = bb(x)
    xb = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = bb(xb)
        state = bb.init_state(2)
        y_t, state = bb.step(x[:, 0], state)
    yb.float().sum().backward()
    assert torch.isfinite(xb.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bb.parameters())
    assert (yb.float() - y32).abs().max() < 0.1 * y32.abs().max()
    assert (y_t.float() - y32[:, 0]).abs().max() < 0.1 * y32.abs().max()
    assert state[0][1].dtype == torch.float32                     # the delta-rule state stays fp32


def test_cuda_kernel_requested_on_cpu_is_an_error():
    bb = gated_deltanet(16, 1, kernel="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        bb(torch.randn(1, 4, 16))


# ------------------------------------------------------------------------------------------------
# sizes, initialisation, options
# ------------------------------------------------------------------------------------------------

def test_default_sizes_follow_the_paper():
    m = GatedDeltaNetMixer(512)
    assert (m.num_heads, m.head_k_dim, m.head_v_dim) == (6, 64, 128)
    assert (m.key_dim, m.value_dim) == (384, 768)                  # 0.75 d_model, 2 x key width
    assert m.in_proj.weight.shape == (384 + 384 + 768 + 768 + 6 + 6, 512)
    assert m.out_proj.weight.shape == (512, 768)
    assert m.conv1d.bias is None and m.norm.weight.shape == (128,)
    # d_model not a multiple of 8: key width rounded to a multiple of the heads; tiny: fewer heads
    assert (GatedDeltaNetMixer(100).num_heads, GatedDeltaNetMixer(100).head_k_dim) == (6, 13)
    for d in range(1, 17):
        m = GatedDeltaNetMixer(d)
        assert m.num_heads >= 1 and m.head_k_dim >= 1 and m.head_v_dim == 2 * m.head_k_dim


def test_initialisation_and_no_weight_decay_flags():
    torch.manual_seed(0)
    m = GatedDeltaNetMixer(256, num_heads=64)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    A = torch.exp(m.A_log)
    assert A.min() >= 0.0 and A.max() <= 16.0 and A.max() > 8.0
    assert m.A_log._no_weight_decay and m.dt_bias._no_weight_decay


@pytest.mark.parametrize("opts,match", [
    (dict(num_heads=0), "num_heads"),
    (dict(head_dim=2.5), "head_dim"),
    (dict(expand_v=0), "expand_v"),
    (dict(head_dim=3, expand_v=1.5), "expand_v"),
    (dict(conv_size=0), "conv_size"),
    (dict(chunk_size=-1), "chunk_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(kernel="triton"), "kernel"),
    (dict(bogus=1), "unknown gated_deltanet option"),
])
def test_bad_options_raise_value_error(opts, match):
    with pytest.raises(ValueError, match=match):
        gated_deltanet(64, 2, **opts)


def test_registered_and_config():
    bb = create_backbone("gated_deltanet", d_model=64, n_layers=1, num_heads=4, chunk_size=16)
    assert bb.name == "gated_deltanet"
    assert bb.config["num_heads"] == 4 and bb.config["chunk_size"] == 16 and bb.config["kernel"] == "auto"


# the Mamba-2 backbone's counts (d_state 8 and headdim 16 at d_model 32; headdim 16, 32 at 64, 128;
# the defaults at 512)
MAMBA2_COUNTS = {(32, 1): 7_324, (64, 2): 56_368, (128, 1): 105_400, (512, 2): 3_200_880}


@pytest.mark.parametrize("d_model,n_layers", list(MAMBA2_COUNTS))
def test_parameter_budget_matches_mamba2(d_model, n_layers):
    mamba2_params = MAMBA2_COUNTS[d_model, n_layers]
    n = create_backbone("gated_deltanet", d_model=d_model, n_layers=n_layers).n_params
    assert abs(n / mamba2_params - 1) <= 0.10, n
