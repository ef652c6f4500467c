"""RWKV-7 backbone (backbones/rwkv7.py): the contract, a naive float64 token-by-token reference of the
whole layer written from the paper's equations, causality, gradients, options, sizes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import wmbench
import wmbench.backbones.rwkv7  # noqa: F401  (registers "rwkv7")
from wmbench.backbones.rwkv7 import default_ffn_dim, default_head_size, lora_ranks

F64 = torch.float64


def build(d_model, n_layers, **options):
    return wmbench.create_backbone("rwkv7", d_model=d_model, n_layers=n_layers, **options)


@torch.no_grad()
def randomise(bb, scale=0.2):
    """Move every parameter away from its initial value (some start at exact constants) so that every
    term of the layer is exercised; the LoRAs (0.01-sized at init) are scaled up to matter."""
    for name, p in bb.named_parameters():
        if name.split(".")[-1] in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
            p.mul_(8.0)
        p.add_(scale * torch.randn_like(p) * (p.abs().mean() + 0.1))


# ------------------------------------------------------------------------------------------------
# the contract
# ------------------------------------------------------------------------------------------------

@given(data=st.data())
def test_contract(data, backbone_contract):
    d_model = data.draw(st.integers(2, 20), label="d_model")
    divisors = [n for n in range(1, d_model + 1) if d_model % n == 0]
    opts = {"dropout": 0.1}
    head_size = data.draw(st.sampled_from([None, *divisors]), label="head_size")
    if head_size is not None:
        opts["head_size"] = head_size
    chunk = data.draw(st.sampled_from([None, 1, 2, 4, 8]), label="chunk_size")
    if chunk is not None:
        opts["chunk_size"] = chunk
    if data.draw(st.booleans(), label="set ffn_dim"):
        opts["ffn_dim"] = data.draw(st.integers(1, 24), label="ffn_dim")
    n_layers = data.draw(st.integers(1, 2), label="n_layers")
    B = data.draw(st.integers(1, 3), label="batch")
    L = data.draw(st.integers(1, 19), label="length")
    split = data.draw(st.integers(1, L), label="split")
    split2 = data.draw(st.integers(split, L), label="split2")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    bb = build(d_model, n_layers, **opts).eval()
    randomise(bb)
    assert bb.n_params == sum(p.numel() for p in bb.parameters())
    backbone_contract(bb, torch.randn(B, L, d_model), split, split2)


def test_state_layout_and_dtypes():
    bb = build(16, 2, head_size=8, ffn_dim=12)
    state = bb.init_state(3)
    assert isinstance(state, list) and len(state) == 2
    for last, S, c_last in state:
        assert last.shape == c_last.shape == (3, 16) and S.shape == (3, 2, 8, 8)
        assert S.dtype == last.dtype == torch.float32
    with torch.no_grad():
        y, state2 = bb.prefill(torch.randn(3, 5, 16), state)
        y_t, state3 = bb.step(torch.randn(3, 16), state2)
    assert y.shape == (3, 5, 16) and y_t.shape == (3, 16)
    assert [len(s) for s in state3] == [3, 3]


# ------------------------------------------------------------------------------------------------
# an independent reference: the whole backbone token by token in float64, from the equations
# ------------------------------------------------------------------------------------------------

def naive_backbone(bb, x):
    """x (B, L, C) float64 -> y (B, L, C), one token at a time, every equation written out here."""
    B, L, C = x.shape

    def rms(u, norm):
        return u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    layers = []
    for blk in bb.blocks:
        tm = blk.mixer
        H, N = tm.n_heads, tm.head_size
        layers.append(dict(last=torch.zeros(B, C, dtype=F64), c_last=torch.zeros(B, C, dtype=F64),
                           S=[[torch.zeros(N, N, dtype=F64) for _ in range(H)] for _ in range(B)]))
    ys = []
    for t in range(L):
        h = x[:, t]
        v_first = None
        for i, (blk, st_) in enumerate(zip(bb.blocks, layers)):
            tm, cm = blk.mixer, blk.cmix
            H, N = tm.n_heads, tm.head_size
            # ---- time mix
            u = rms(h, blk.norm)
            xx = st_["last"] - u
            st_["last"] = u
            xr, xw, xk = u + xx * tm.x_r, u + xx * tm.x_w, u + xx * tm.x_k
            xv, xa, xg = u + xx * tm.x_v, u + xx * tm.x_a, u + xx * tm.x_g
            r = xr @ tm.receptance.weight.T
            k = xk @ tm.key.weight.T
            v = xv @ tm.value.weight.T
            w_ref = -F.softplus(-(tm.w0 + torch.tanh(xw @ tm.w1) @ tm.w2)) - 0.5
            decay = torch.exp(-torch.exp(w_ref))                               # in (exp(-e^-0.5), 1)
            if i == 0:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(tm.v0 + (xv @ tm.v1) @ tm.v2)
            alpha = torch.sigmoid(tm.a0 + (xa @ tm.a1) @ tm.a2)
            g = torch.sigmoid(xg @ tm.g1) @ tm.g2
            kk = (k * tm.k_k).view(B, H, N)
            kk = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            k = k * (1 + (alpha - 1) * tm.k_a)
            rh, kh, vh = r.view(B, H, N), k.view(B, H, N), v.view(B, H, N)
            ah, bh = -kk, kk * alpha.view(B, H, N)
            o = []
            for b in range(B):
                for hd in range(H):
                    transition = torch.diag(decay.view(B, H, N)[b, hd]) + torch.outer(ah[b, hd], bh[b, hd])
                    S = st_["S"][b][hd] @ transition + torch.outer(vh[b, hd], kh[b, hd])
                    st_["S"][b][hd] = S
                    o.append(S @ rh[b, hd])
            o = torch.stack(o).view(B, H, N)
            mean = o.mean(-1, keepdim=True)
            var = (o - mean).pow(2).mean(-1, keepdim=True)
            on = ((o - mean) / torch.sqrt(var + tm.ln_x.eps)).reshape(B, C) * tm.ln_x.weight + tm.ln_x.bias
            bonus = ((rh * kh * tm.r_k).sum(-1, keepdim=True) * vh).reshape(B, C)
            h = h + ((on + bonus) * g) @ tm.out_proj.weight.T
            # ---- channel mix
            u = rms(h, blk.cmix_norm)
            xk = u + (st_["c_last"] - u) * cm.x_k
            st_["c_last"] = u
            h = h + torch.relu(xk @ cm.key.weight.T).pow(2) @ cm.value.weight.T
            # ---- the stack's optional MLP
            if blk.mlp is not None:
                u = rms(h, blk.norm2)
                h = h + F.gelu(u @ blk.mlp.fc1.weight.T, approximate="tanh") @ blk.mlp.fc2.weight.T
        ys.append(rms(h, bb.norm_f))
    return torch.stack(ys, 1)


@pytest.mark.parametrize("d_model,n_layers,opts", [
    (8, 3, dict(head_size=4, ffn_dim=6, chunk_size=4)),      # 2 heads, value residual in layers 1 and 2
    (6, 2, dict(d_intermediate=5)),                         # one head of 6, the stack's MLP branch
    (5, 1, dict(head_size=1, chunk_size=2)),                # heads of one channel
])
def test_matches_naive_float64(d_model, n_layers, opts):
    torch.manual_seed(0)
    bb = build(d_model, n_layers, **opts).double().eval()
    randomise(bb)
    x = torch.randn(2, 11, d_model, dtype=F64)
    with torch.no_grad():
        y = bb(x)
        y0 = naive_backbone(bb, x)
        # and the recurrent path in float64 (prefill, then steps)
        state = bb.init_state(2)
        ya, state = bb.prefill(x[:, :4], state)
        yb = torch.stack([bb.step(x[:, t], state)[0] for t in range(4, 11)], 1)
    assert y.dtype == F64 and (y - y0).abs().max() <= 1e-10
    assert (torch.cat([ya, yb], 1) - y0).abs().max() <= 1e-10


def test_gradients_match_naive_float64():
    """The hand-written backwards (the op's, the token-shift projections') against autograd through the
    naive reference: every parameter and the input."""
    torch.manual_seed(4)
    bb = build(8, 2, head_size=4, ffn_dim=6, chunk_size=4).double().train()
    randomise(bb)
    x = torch.randn(2, 9, 8, dtype=F64, requires_grad=True)
    proj = torch.randn(2, 9, 8, dtype=F64)
    params = [x, *bb.parameters()]
    got = torch.autograd.grad((bb(x) * proj).sum(), params)
    ref = torch.autograd.grad((naive_backbone(bb, x) * proj).sum(), params)
    names = ["x", *(n for n, _ in bb.named_parameters())]
    for name, g1, g0 in zip(names, got, ref):
        assert (g1 - g0).abs().max() <= 1e-9 * (1 + g0.abs().max()), name


def test_op_in_groups_of_chunks_matches_one_group(monkeypatch):
    """ops.rwkv7 works through the chunks in groups (small temporaries); any grouping gives the same
    outputs, final state and gradients."""
    import wmbench.backbones.ops.rwkv7 as op
    from wmbench.backbones.ops.rwkv7 import rwkv7 as scan
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 37, 2, 4, 3
    r, k = torch.randn(B, T, H, K, generator=gen, dtype=F64), torch.randn(B, T, H, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    w = -torch.rand(B, T, H, K, generator=gen, dtype=F64)
    kk = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=F64), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, K, generator=gen, dtype=F64)
    S0 = torch.randn(B, H, V, K, generator=gen, dtype=F64)
    dO, dS = torch.randn(B, T, H, V, generator=gen, dtype=F64), torch.randn(B, H, V, K, generator=gen, dtype=F64)

    def run():
        ins = [t.clone().requires_grad_(True) for t in (r, w, k, v, a, b, S0)]
        o, S = scan(*ins[:6], ins[6], chunk_size=4)
        return (o, S, *torch.autograd.grad((o * dO).sum() + (S * dS).sum(), ins))

    monkeypatch.setattr(op, "GROUP_ELEMENTS", 1 << 30)
    one = run()
    for elements in (1, 2 * 2 * 4 * 4 * 3, 2 * 2 * 4 * 4 * 4):     # groups of 1, 3 and 4 chunks (10 chunks)
        monkeypatch.setattr(op, "GROUP_ELEMENTS", elements)
        for t1, t0 in zip(run(), one):
            assert (t1 - t0).abs().max() <= 1e-12


def test_hand_written_backwards_gradcheck():
    from wmbench.backbones.rwkv7 import _Readout, _ShiftMix
    gen = torch.Generator().manual_seed(6)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64, requires_grad=True)    # noqa: E731
    # token shift + lerps + projections, with and without a previous token, two weights on one lerp
    x, last, mu = rnd(2, 5, 3), rnd(2, 3), rnd(2, 3)
    Ws = [rnd(3, n) for n in (4, 2, 3)]
    assert torch.autograd.gradcheck(lambda *t: _ShiftMix.apply(t[0], t[1], t[2], (0, 1, 0), *t[3:]),
                                    (x, last, mu, *Ws))
    assert torch.autograd.gradcheck(lambda *t: _ShiftMix.apply(t[0], None, t[1], (1,), *t[2:]), (x, mu, Ws[0]))
    # GroupNorm per head + bonus + gate
    M, H, N = 5, 2, 3
    args = (rnd(M, H, N), rnd(M, H, N), rnd(M, H, N), rnd(M, H, N), rnd(M, H * N), rnd(H * N), rnd(H * N), rnd(H, N))
    assert torch.autograd.gradcheck(lambda *a: _Readout.apply(*a, 1e-3), args)


# ------------------------------------------------------------------------------------------------
# causality, gradients
# ------------------------------------------------------------------------------------------------

def test_causal():
    torch.manual_seed(1)
    bb = build(16, 2, head_size=8, chunk_size=4).eval()
    randomise(bb)
    x = torch.randn(2, 14, 16)
    t0 = 6
    x2 = x.clone()
    x2[:, t0:] = torch.randn(2, 14 - t0, 16)
    with torch.no_grad():
        y, y2 = bb(x), bb(x2)
    assert (y[:, :t0] - y2[:, :t0]).abs().max() <= 1e-6
    assert (y[:, t0:] - y2[:, t0:]).abs().max() > 1e-2
    xg = x.clone().requires_grad_(True)
    bb(xg)[:, t0].sum().backward()
    assert xg.grad[:, t0 + 1:].abs().max() <= 1e-7 * xg.grad.abs().max()
    assert xg.grad[:, t0 - 1].abs().max() > 0          # the token shift reaches back one token


@pytest.mark.parametrize("d_intermediate", [0, 6])
def test_gradient_reaches_every_parameter(d_intermediate):
    torch.manual_seed(2)
    bb = build(16, 2, head_size=8, dropout=0.1, d_intermediate=d_intermediate).train()
    x = torch.randn(2, 11, 16, requires_grad=True)
    y = bb(x)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in bb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_bf16_autocast_keeps_fp32_state_and_stays_close():
    torch.manual_seed(3)
    bb = build(16, 2, head_size=8).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        y = bb(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = bb(x)
            state = bb.init_state(2)
            _, state = bb.prefill(x[:, :5], state)
            y_t, state = bb.step(x[:, 5], state)
    assert torch.isfinite(yb).all() and (yb.float() - y).abs().max() <= 0.1
    assert all(s[1].dtype == torch.float32 for s in state) and torch.isfinite(y_t).all()
    # and a training pass under autocast: the hand-written backwards follow its dtypes
    bb.train()
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = bb(xg)
    (yb.float() * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
               for p in bb.parameters())


# ------------------------------------------------------------------------------------------------
# options and sizes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts,needle", [
    (dict(head_size=3), "head_size 3 must divide d_model 8"),
    (dict(head_size=0), "head_size must be a positive integer, got 0"),
    (dict(ffn_dim=0), "ffn_dim must be a positive integer, got 0"),
    (dict(ffn_dim=2.5), "ffn_dim must be a positive integer, got 2.5"),
    (dict(chunk_size=12), "chunk_size must be a power of two, got 12"),
    (dict(chunk_size=-4), "chunk_size must be a positive integer, got -4"),
    (dict(headdim=4), "unknown rwkv7 option"),
    (dict(kernel="triton"), "unknown kernel 'triton'"),
    (dict(dropout=1.5), "dropout must be in"),
    (dict(d_intermediate=-1), "d_intermediate must be an integer >= 0"),
])
def test_bad_options_are_value_errors(opts, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")) as e:
        build(8, 1, **opts)
    assert "\n" not in str(e.value)


def test_default_sizes():
    assert [default_head_size(c) for c in (2, 16, 63, 64, 67, 96, 128, 200, 512)] == \
        [2, 16, 63, 64, 67, 96, 64, 100, 64]
    assert lora_ranks(512) == {"w": 64, "a": 64, "v": 32, "g": 128}
    assert lora_ranks(32) == {"w": 8, "a": 8, "v": 8, "g": 8} and lora_ranks(2) == {"w": 1, "a": 1, "v": 1, "g": 1}
    assert [default_ffn_dim(c) for c in (2, 3, 32, 64, 128, 512)] == [1, 2, 16, 32, 64, 256]
    bb = build(512, 2)
    tm = bb.blocks[1].mixer
    assert (tm.n_heads, tm.head_size, tm.ln_x.eps) == (8, 64, 64e-5)
    assert bb.blocks[0].cmix.key.out_features == 256 and not hasattr(bb.blocks[0].mixer, "v0")


# Mamba-2's parameter counts at these sizes (from the task statement), and the live ones where they build
MAMBA2_COUNTS = {(32, 1): 7_324, (64, 2): 56_368, (128, 1): 105_400, (512, 2): 3_200_880}


@pytest.mark.parametrize("d_model,n_layers", list(MAMBA2_COUNTS))
def test_parameter_count_close_to_mamba2(d_model, n_layers):
    n = build(d_model, n_layers).n_params
    assert abs(n / MAMBA2_COUNTS[d_model, n_layers] - 1) <= 0.10, n
    m2 = wmbench.create_backbone("mamba2", d_model, n_layers, **({"headdim": 64} if d_model == 32 else {}))
    assert abs(n / m2.n_params - 1) <= 0.10, (n, m2.n_params)


def test_kernels_on_cpu():
    torch.manual_seed(7)
    x = torch.randn(1, 5, 8)
    torch.manual_seed(0)
    y_auto = build(8, 1, kernel="auto").eval()(x)
    torch.manual_seed(0)
    y_torch = build(8, 1, kernel="torch").eval()(x)
    assert torch.equal(y_auto, y_torch)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        build(8, 1, kernel="cuda")(x)


def test_small_models_build_and_run():
    for d in (2, 3, 7):
        bb = build(d, 2)
        assert bb(torch.randn(1, 4, d)).shape == (1, 4, d)
    assert math.isclose(build(8, 1).blocks[0].mixer.ln_x.eps, 8e-5)
