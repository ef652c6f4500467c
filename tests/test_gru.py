"""GRU backbone: the mixer against a naive recurrence written here, and shared weights between paths."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import wmbench
from wmbench.backbones.gru import GRUMixer


def naive_gru(rnn: torch.nn.GRU, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRU equations, one time step at a time. x (B, L, D), h (B, D) -> y (B, L, D), h_L (B, D)."""
    W_ir, W_iz, W_in = rnn.weight_ih_l0.chunk(3, 0)
    W_hr, W_hz, W_hn = rnn.weight_hh_l0.chunk(3, 0)
    b_ir, b_iz, b_in = rnn.bias_ih_l0.chunk(3, 0)
    b_hr, b_hz, b_hn = rnn.bias_hh_l0.chunk(3, 0)
    ys = []
    for t in range(x.shape[1]):
        x_t = x[:, t]
        r = torch.sigmoid(x_t @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
        z = torch.sigmoid(x_t @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
        n = torch.tanh(x_t @ W_in.T + b_in + r * (h @ W_hn.T + b_hn))
        h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys, 1), h


@given(B=st.integers(1, 4), L=st.integers(1, 12), D=st.integers(1, 12), seed=st.integers(0, 999))
def test_mixer_matches_naive_recurrence(B, L, D, seed):
    torch.manual_seed(seed)
    mix = GRUMixer(D)
    x = torch.randn(B, L, D)
    h0 = torch.randn(B, D)
    with torch.no_grad():
        y_ref, h_ref = naive_gru(mix.rnn, x, torch.zeros(B, D))
        assert (mix(x) - y_ref).abs().max() <= 1e-5
        # prefill from a non-zero state, in both accepted state layouts
        y_ref, h_ref = naive_gru(mix.rnn, x, h0)
        for state in (h0[None], h0):
            y, h = mix.prefill(x, state.clone())
            assert (y - y_ref).abs().max() <= 1e-5 and (h[0] - h_ref).abs().max() <= 1e-5
        # step from the same state
        state = h0[None].clone()
        for t in range(L):
            y_t, state = mix.step(x[:, t], state)
            assert y_t.shape == (B, D) and state.shape == (1, B, D)
            assert (y_t - y_ref[:, t]).abs().max() <= 1e-5


def test_init_state_is_zero_hidden_of_right_shape():
    mix = GRUMixer(6).double()
    s = mix.init_state(5, max_len=None)
    assert s.shape == (1, 5, 6) and s.dtype == torch.float64 and not s.any()


@pytest.mark.parametrize("param", ["weight_hh_l0", "weight_ih_l0", "bias_ih_l0", "bias_hh_l0"])
def test_step_uses_the_same_weights_as_forward(param):
    """Changing one nn.GRU weight changes both paths, and they still agree."""
    torch.manual_seed(0)
    bb = wmbench.create_backbone("gru", d_model=8, n_layers=2).eval()
    x = torch.randn(2, 6, 8)

    def both():
        with torch.no_grad():
            y = bb(x)
            s = bb.init_state(2)
            ys = []
            for t in range(6):
                y_t, s = bb.step(x[:, t], s)
                ys.append(y_t)
            return y, torch.stack(ys, 1)

    y0, ys0 = both()
    with torch.no_grad():
        getattr(bb.blocks[1].mixer.rnn, param).add_(0.5 * torch.randn_like(getattr(bb.blocks[1].mixer.rnn, param)))
    y1, ys1 = both()
    assert (y1 - y0).abs().max() > 1e-3 and (ys1 - ys0).abs().max() > 1e-3
    assert (ys1 - y1).abs().max() <= 1e-5


def test_structure_and_options():
    bb = wmbench.create_backbone("gru", d_model=16, n_layers=2, dropout=0.1, d_intermediate=32)
    assert len(bb.blocks) == 2
    for blk in bb.blocks:
        rnn = blk.mixer.rnn
        assert isinstance(rnn, torch.nn.GRU) and rnn.num_layers == 1 and rnn.batch_first
        assert rnn.input_size == rnn.hidden_size == 16
        assert blk.mlp is not None
    assert bb.config["kernel"] == "auto" and bb.config["dropout"] == 0.1
    with pytest.raises(ValueError, match="valid choices"):
        wmbench.create_backbone("gru", d_model=16, n_layers=1, kernel="triton")
    with pytest.raises(RuntimeError, match="CUDA"):
        wmbench.create_backbone("gru", d_model=16, n_layers=1, kernel="cuda")(torch.randn(1, 3, 16))
    y = wmbench.create_backbone("gru", d_model=16, n_layers=1, kernel="torch")(torch.randn(1, 3, 16))
    assert y.shape == (1, 3, 16)


def test_backward_through_steps():
    """The recurrent path is differentiable too (the GRU state is not updated in place)."""
    bb = wmbench.create_backbone("gru", d_model=8, n_layers=1)
    x = torch.randn(2, 4, 8)
    s = bb.init_state(2)
    out = 0
    for t in range(4):
        y_t, s = bb.step(x[:, t], s)
        out = out + y_t.square().sum()
    out.backward()
    assert bb.blocks[0].mixer.rnn.weight_hh_l0.grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_forward_matches_cell_step_on_gpu():
    bb = wmbench.create_backbone("gru", d_model=32, n_layers=2).eval().cuda()
    x = torch.randn(3, 10, 32, device="cuda")
    # cuDNN may run fp32 RNNs in TF32 (torch.backends.cudnn.allow_tf32 defaults to True): compare in true fp32
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = bb(x)
        s = bb.init_state(3)
        ys = []
        for t in range(10):
            y_t, s = bb.step(x[:, t], s)
            ys.append(y_t)
    assert (torch.stack(ys, 1) - y).abs().max() <= 1e-4
    bb_torch = wmbench.create_backbone("gru", d_model=32, n_layers=2, kernel="torch").eval().cuda()
    bb_torch.load_state_dict(bb.state_dict())
    with torch.no_grad():
        assert (bb_torch(x) - y).abs().max() <= 1e-4  # torch's own CUDA GRU, cuDNN switched off
