"""Transformer backbone: attention against a naive reference written here, and the KV cache."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import wmbench
from wmbench.backbones.transformer import KVCache, TransformerMixer


def naive_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE as a complex rotation: (x_i + j x_{i+d/2}) * exp(j p theta_i), theta_i = base^(-2i/d)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    rot = torch.polar(torch.ones(len(positions), d // 2, dtype=torch.float64),
                      positions.double()[:, None] * theta[None])
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * rot
    return torch.cat((z.real, z.imag), -1).to(x.dtype)


def naive_attention(mix: TransformerMixer, x: torch.Tensor, start: int = 0, ctx_k=None, ctx_v=None):
    """Per-head softmax attention with an explicit loop-built causal mask. x (B, L, D) at [start, start+L)."""
    B, L, D = x.shape
    H, Dh = mix.n_heads, mix.head_dim
    Wq, Wk, Wv = mix.qkv.weight.chunk(3, 0)
    pos = torch.arange(start, start + L)

    def heads(t):
        return t.view(B, L, H, Dh).transpose(1, 2)

    q, k, v = heads(x @ Wq.T), heads(x @ Wk.T), heads(x @ Wv.T)
    if mix.pos == "rope":
        q, k = naive_rope(q, pos, mix.rope_base), naive_rope(k, pos, mix.rope_base)
    if ctx_k is not None:
        k, v = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)
    mask = torch.full((L, start + L), float("-inf"))
    for i in range(L):
        mask[i, : start + i + 1] = 0.0
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh) + mask, -1)
    y = (att @ v).transpose(1, 2).reshape(B, L, D)
    return y @ mix.out_proj.weight.T, k, v


@given(B=st.integers(1, 3), L=st.integers(1, 12), H=st.integers(1, 3), half=st.integers(1, 4),
       pos=st.sampled_from(["rope", "learned"]), seed=st.integers(0, 999))
def test_mixer_matches_naive_attention(B, L, H, half, pos, seed):
    torch.manual_seed(seed)
    D = H * 2 * half
    mix = TransformerMixer(D, H, pos=pos).eval()
    x = torch.randn(B, L, D)
    with torch.no_grad():
        y_ref, k_ref, v_ref = naive_attention(mix, x)
        assert (mix(x) - y_ref).abs().max() <= 1e-5
        # the cache holds the projected keys (RoPE applied) and values
        state = mix.init_state(B, max_len=L + 3)
        y, state = mix.prefill(x, state)
        assert (y - y_ref).abs().max() <= 1e-5
        assert state.pos == L
        assert (state.k[:, :, :L] - k_ref).abs().max() <= 1e-5
        assert (state.v[:, :, :L] - v_ref).abs().max() <= 1e-5
        assert not state.k[:, :, L:].any()
        # a second chunk after the first: explicit chunk-vs-cache mask
        x2 = torch.randn(B, 3, D)
        y2_ref, _, _ = naive_attention(mix, x2, start=L, ctx_k=k_ref, ctx_v=v_ref)
        y2, state = mix.prefill(x2, state)
        assert (y2 - y2_ref).abs().max() <= 1e-5


def _steps(bb, x, state, start):
    ys = []
    for t in range(start, x.shape[1]):
        y_t, state = bb.step(x[:, t], state)
        ys.append(y_t[:, None])
    return ys, state


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_step_after_prefill_after_prefill(pos):
    bb = wmbench.create_backbone("transformer", d_model=32, n_layers=2, n_heads=4, pos=pos, max_len=40,
                                 dropout=0.1, attn_dropout=0.1).eval()
    x = torch.randn(3, 16, 32)
    with torch.no_grad():
        y = bb(x)
        state = bb.init_state(3)  # default length: the backbone's max_len
        assert state[0].max_len == 40
        ya, state = bb.prefill(x[:, :5], state)
        yb, state = bb.prefill(x[:, 5:12], state)
        ys, state = _steps(bb, x, state, 12)
    assert (torch.cat([ya, yb] + ys, 1) - y).abs().max() <= 1e-4
    assert all(s.pos == 16 for s in state)


@pytest.mark.parametrize("pos", ["rope", "learned"])
@given(L=st.integers(1, 17), data=st.data())
def test_contract_for_both_position_schemes(pos, L, data, backbone_contract):
    split = data.draw(st.integers(1, L))
    split2 = data.draw(st.integers(split, L))
    bb = wmbench.create_backbone("transformer", d_model=24, n_layers=2, n_heads=3, pos=pos, max_len=24,
                                 dropout=0.2, attn_dropout=0.2).eval()
    backbone_contract(bb, torch.randn(2, L, 24), split, split2)


def test_kv_cache_is_preallocated_and_appended_in_place():
    bb = wmbench.create_backbone("transformer", d_model=16, n_layers=2, n_heads=2).eval()
    state = bb.init_state(2, max_len=10)
    for s in state:
        assert isinstance(s, KVCache)
        assert s.k.shape == s.v.shape == (2, 2, 10, 8) and s.pos == 0
    ptrs = [(s.k.data_ptr(), s.v.data_ptr()) for s in state]
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        _, state = bb.prefill(x[:, :4], state)
        for t in range(4, 9):
            before = [s.k[:, :, :t].clone() for s in state]
            _, state = bb.step(x[:, t], state)
            assert [(s.k.data_ptr(), s.v.data_ptr()) for s in state] == ptrs
            # earlier keys are neither re-projected nor moved
            assert all(torch.equal(b, s.k[:, :, :t]) for b, s in zip(before, state))
            assert all(s.pos == t + 1 for s in state)


def test_large_default_cache_warns():
    mix = TransformerMixer(64, 1, max_len=2048).to(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning comes first: raising it skips the 2 GiB allocation
        with pytest.raises(UserWarning, match="max_len"):
            mix.init_state(1100)  # 2 x 1100 x 2048 x 64 x 8 bytes > 1 GiB
    mix.init_state(1100, max_len=8)  # explicit lengths never warn


def test_cache_overflow_raises_and_leaves_state_usable():
    bb = wmbench.create_backbone("transformer", d_model=16, n_layers=1, n_heads=2).eval()
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        state = bb.init_state(1, max_len=4)
        _, state = bb.prefill(x[:, :3], state)
        with pytest.raises(ValueError, match="max_len"):
            bb.prefill(x[:, 3:5], state)
        assert state[0].pos == 3  # nothing was written
        _, state = bb.step(x[:, 3], state)
        with pytest.raises(ValueError, match="max_len"):
            bb.step(x[:, 4], state)


def test_learned_positions():
    kw = dict(d_model=16, n_layers=2, n_heads=2)
    rope = wmbench.create_backbone("transformer", **kw)
    learned = wmbench.create_backbone("transformer", pos="learned", max_len=8, **kw)
    # one table for the whole backbone (added once to the input), not one per layer
    assert learned.n_params - rope.n_params == 8 * 16
    assert learned.pos_emb.weight.shape == (8, 16)
    with pytest.raises(ValueError, match="max_len"):
        learned(torch.randn(1, 9, 16))
    state = learned.init_state(1, max_len=32)  # a longer cache cannot outrun the table
    with torch.no_grad():
        _, state = learned.prefill(torch.randn(1, 8, 16), state)
        with pytest.raises(ValueError, match="max_len"):
            learned.step(torch.randn(1, 16), state)
    with pytest.raises(ValueError, match="max_len"):
        wmbench.create_backbone("transformer", pos="learned", **kw)


def test_options_and_defaults():
    bb = wmbench.create_backbone("transformer", d_model=128, n_layers=2)
    mix = bb.blocks[0].mixer
    assert mix.n_heads == 2 and mix.head_dim == 64  # default d_model // 64
    assert bb.blocks[0].mlp.fc1.out_features == 4 * 128
    assert mix.qkv.bias is None and mix.qkv.out_features == 3 * 128
    assert bb.config["pos"] == "rope" and bb.config["max_len"] == 2048
    # odd sizes get a width that divides d_model and is even for RoPE
    assert wmbench.create_backbone("transformer", d_model=200, n_layers=1).blocks[0].mixer.n_heads == 2
    assert wmbench.create_backbone("transformer", d_model=16, n_layers=1,
                                   d_intermediate=0).blocks[0].mlp is None
    with pytest.raises(ValueError, match="divisible"):
        wmbench.create_backbone("transformer", d_model=64, n_layers=1, n_heads=3)
    with pytest.raises(ValueError, match="even head dim"):
        wmbench.create_backbone("transformer", d_model=6, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="valid choices"):
        wmbench.create_backbone("transformer", d_model=16, n_layers=1, pos="sinusoidal")
    with pytest.raises(ValueError, match="valid choices"):
        wmbench.create_backbone("transformer", d_model=16, n_layers=1, kernel="triton")


def test_attention_dropout_active_in_training_only():
    bb = wmbench.create_backbone("transformer", d_model=16, n_layers=1, n_heads=2, attn_dropout=0.5)
    x = torch.randn(2, 8, 16)
    bb.train()
    assert not torch.equal(bb(x), bb(x))
    bb.eval()
    assert torch.equal(bb(x), bb(x))


def test_kernel_cuda_needs_cuda_tensors():
    bb = wmbench.create_backbone("transformer", d_model=16, n_layers=1, n_heads=2, kernel="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        bb(torch.randn(1, 4, 16))


def test_bf16_autocast_step_with_fp32_cache():
    bb = wmbench.create_backbone("transformer", d_model=32, n_layers=1, n_heads=2).eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        y = bb(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state = bb.init_state(2, max_len=8)
            _, state = bb.prefill(x[:, :3], state)
            ys, state = _steps(bb, x, state, 3)
    assert state[0].k.dtype == torch.float32
    assert (torch.cat(ys, 1).float() - y[:, 3:]).abs().max() < 0.1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_half_precision_training_pass_runs():
    bb = wmbench.create_backbone("transformer", d_model=64, n_layers=2, n_heads=2).eval()
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        y_cpu = bb(x)
        bb_gpu, x_gpu = bb.cuda(), x.cuda()
        assert (bb_gpu(x_gpu).cpu() - y_cpu).abs().max() <= 1e-3
        state = bb_gpu.init_state(2, max_len=20)
        _, state = bb_gpu.prefill(x_gpu[:, :12], state)
        ys, _ = _steps(bb_gpu, x_gpu, state, 12)
        assert (torch.cat(ys, 1).cpu() - y_cpu[:, 12:]).abs().max() <= 1e-3
        # the training pass in bf16 (flash-attn when installed, SDPA otherwise)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y_bf16 = bb_gpu(x_gpu)
        assert (y_bf16.float().cpu() - y_cpu).abs().max() < 0.1
