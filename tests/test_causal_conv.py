"""The channels-last causal depthwise conv (backbones/ops/causal_conv.py) against torch's Conv1d."""
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmbench.backbones.ops.causal_conv import causal_conv1d


def reference(x, w, b):
    """nn.Conv1d semantics: (B, C, L) layout, left zero padding K-1, keep the first L outputs."""
    L, K = x.shape[1], w.shape[1]
    return F.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=K - 1, groups=w.shape[0])[..., :L].transpose(1, 2)


@given(B=st.integers(1, 3), L=st.integers(1, 12), C=st.integers(1, 6), K=st.integers(1, 5),
       bias=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_conv1d_values_and_gradients(B, L, C, K, bias, strided, seed):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(B, L, 2 * C, generator=g, dtype=torch.float64)
    x0 = big[..., :C] if strided else big[..., :C].contiguous()     # a slice of a wider buffer, like in_proj's
    w0 = torch.randn(C, K, generator=g, dtype=torch.float64)
    b0 = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(B, L, C, generator=g, dtype=torch.float64)

    def run(fn):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        b = None if b0 is None else b0.clone().requires_grad_(True)
        y = fn(x, w, b)
        y.backward(dy)
        return y.detach(), x.grad, w.grad, None if b is None else b.grad

    ours, ref = run(causal_conv1d), run(reference)
    for a, r in zip(ours, ref):
        assert (a is None) == (r is None)
        if a is not None:
            assert a.shape == r.shape and (a - r).abs().max().item() < 1e-12


def test_history_is_zero_and_output_is_causal():
    x = torch.zeros(1, 6, 2, dtype=torch.float64)
    x[0, 3] = 1.0                                                     # an impulse at t = 3
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    y = causal_conv1d(x, w, torch.zeros(2, dtype=torch.float64))
    # the impulse reaches t = 3, 4, 5 with taps w[:, 2], w[:, 1], w[:, 0]; nothing before t = 3
    assert y[0, :3].abs().max() == 0
    assert y[0, 3].tolist() == [3.0, 6.0] and y[0, 4].tolist() == [2.0, 5.0] and y[0, 5].tolist() == [1.0, 4.0]
