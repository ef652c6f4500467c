"""The backbone contract (DESIGN.md), checked for EVERY registered backbone.

forward(x) == token-by-token step == prefill(prefix) + step(rest) == prefill(a) + prefill(b) + step(rest)
in fp32 to 1e-4, in eval mode with dropout configured; shapes; n_params; inputs left untouched; gradients
reach every parameter in the training pass. Sizes vary with hypothesis (lengths that are not a multiple
of any chunk size, splits anywhere).
"""
from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import wmbench
from wmbench.core.registry import BACKBONES

NAMES = wmbench.list_backbones()


def test_builtins_are_registered():
    from wmbench.core.registry import BUILTIN_BACKBONES
    assert set(BUILTIN_BACKBONES) <= set(NAMES) and len(BUILTIN_BACKBONES) == 8


def _accepts(name: str) -> set[str] | None:
    """Keyword options the factory accepts, or None if it takes **kwargs."""
    params = inspect.signature(BACKBONES.get(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _only_accepted(name: str, options: dict) -> dict:
    ok = _accepts(name)
    return options if ok is None else {k: v for k, v in options.items() if k in ok}


@st.composite
def sizes_and_options(draw, name: str):
    """(d_model, options) valid for backbone `name`, small enough to keep the test fast."""
    opts: dict = {"dropout": 0.1}
    accepted = _accepts(name)
    takes = (lambda k: accepted is None or k in accepted)
    if name == "transformer":
        pos = draw(st.sampled_from(["rope", "learned"]))
        n_heads = draw(st.integers(1, 3))
        head_dim = 2 * draw(st.integers(1, 4))  # even: RoPE rotates pairs
        d_model = n_heads * head_dim
        opts.update(n_heads=n_heads, pos=pos, attn_dropout=0.1, max_len=64)
    elif name == "mamba2":
        if takes("headdim"):
            d_model = draw(st.integers(2, 12))
            d_inner = 2 * d_model  # expand = 2
            k = draw(st.sampled_from([k for k in (1, 2, 3, 4) if d_inner % k == 0]))  # heads
            opts["headdim"] = d_inner // k
            opts["ngroups"] = draw(st.sampled_from([g for g in (1, 2) if k % g == 0]))
        else:
            d_model = 32  # d_inner 64 = one default head of 64
        opts.update(d_state=draw(st.sampled_from([4, 8])), chunk_size=draw(st.sampled_from([None, 2, 4, 8])))
    elif name == "mamba":
        d_model = draw(st.integers(2, 16))
        opts.update(d_state=draw(st.sampled_from([4, 8])), chunk_size=draw(st.sampled_from([None, 2, 4, 8])))
    elif name == "mlstm":
        d_model = draw(st.integers(2, 16))
        heads = draw(st.sampled_from([1, 2, 4]))
        opts.update(num_heads=heads, round_to=8 * heads,   # heads of a multiple of 8 channels: 4x4 qkv blocks
                    conv_size=draw(st.integers(1, 4)), chunk_size=draw(st.sampled_from([2, 3, 64])))
    elif name == "gated_deltanet":
        d_model = draw(st.integers(2, 16))
        opts.update(num_heads=draw(st.sampled_from([None, 1, 2, 3])), expand_v=draw(st.sampled_from([1, 2])),
                    conv_size=draw(st.integers(1, 4)), chunk_size=draw(st.sampled_from([None, 1, 3, 4, 8])))
    elif name == "rwkv7":
        d_model = draw(st.integers(2, 16))
        opts.update(head_size=draw(st.sampled_from([None] + [h for h in (1, 2, 4, 8) if d_model % h == 0])),
                    ffn_dim=draw(st.sampled_from([None, 3, 16])), chunk_size=draw(st.sampled_from([None, 1, 2, 4])))
    elif name == "mamba3":
        d_model = draw(st.integers(2, 12))
        d_inner = 2 * d_model
        k = draw(st.sampled_from([k for k in (1, 2, 3, 4) if d_inner % k == 0]))   # heads
        opts.update(headdim=d_inner // k, ngroups=draw(st.sampled_from([g for g in (1, 2) if k % g == 0])),
                    d_state=draw(st.sampled_from([4, 6, 8])), rope_fraction=draw(st.sampled_from([0.5, 1.0])),
                    chunk_size=draw(st.sampled_from([None, 2, 4, 8])), outproj_norm=draw(st.booleans()))
    else:  # gru, and third-party backbones with only the uniform options
        d_model = draw(st.integers(2, 16))
    return d_model, _only_accepted(name, opts)


def _build(name: str, d_model: int, n_layers: int, opts: dict) -> torch.nn.Module:
    return wmbench.create_backbone(name, d_model=d_model, n_layers=n_layers, **opts)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_parallel_and_recurrent_paths_agree(name, data, backbone_contract):
    d_model, opts = data.draw(sizes_and_options(name), label="d_model, options")
    n_layers = data.draw(st.integers(1, 2), label="n_layers")
    B = data.draw(st.integers(1, 3), label="batch")
    L = data.draw(st.integers(1, 19), label="length")
    split = data.draw(st.integers(1, L), label="split")
    split2 = data.draw(st.integers(split, L), label="split2")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))

    bb = _build(name, d_model, n_layers, opts).eval()  # eval: dropout (configured > 0) is off
    assert bb.n_params == sum(p.numel() for p in bb.parameters())
    x = torch.randn(B, L, d_model)
    backbone_contract(bb, x, split, split2)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    d_model, opts = _fixed_sizes(name)
    bb = _build(name, d_model, 2, opts).train()
    x = torch.randn(2, 11, d_model, requires_grad=True)
    y = bb(x)
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in bb.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    assert x.grad is not None and x.grad.abs().sum() > 0


def _fixed_sizes(name: str) -> tuple[int, dict]:
    opts = {"transformer": {"n_heads": 2, "max_len": 32, "dropout": 0.1},
            "mamba2": {"headdim": 8, "d_state": 8, "chunk_size": 4},
            "mamba": {"d_state": 8, "chunk_size": 4},
            "mlstm": {"round_to": 16, "chunk_size": 4},
            "gated_deltanet": {"chunk_size": 4},
            "rwkv7": {"chunk_size": 4},
            "mamba3": {"headdim": 8, "d_state": 8, "chunk_size": 4}}.get(name, {})
    return 16, _only_accepted(name, opts)


@pytest.mark.parametrize("name", NAMES)
def test_state_dtype_device_and_batch(name):
    """init_state gives a state for exactly the requested batch; steps keep dtype and batch."""
    d_model, opts = _fixed_sizes(name)
    bb = _build(name, d_model, 1, opts).eval()
    with torch.no_grad():
        for B in (1, 4):
            state = bb.init_state(B, max_len=8)
            x = torch.randn(B, 3, d_model)
            y, state = bb.prefill(x, state)
            y_t, state = bb.step(torch.randn(B, d_model), state)
            assert y.shape == (B, 3, d_model) and y_t.shape == (B, d_model)
            assert y.dtype == y_t.dtype == torch.float32
