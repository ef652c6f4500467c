"""Replay sampling speed at the paper's scale (pytest-benchmark; not in the default run).

    pytest tests/benchmarks --benchmark-only -k replay

A full, wrapped 100k buffer of 64x64x3 frames: drawing the window starts (sampler + counters) and
gathering the frames, for a 16 x 128 world-model batch and a 1024 x 8 imagination batch, per sampler.
"""
import numpy as np
import pytest

from wmbench.agent.replay import ReplayBuffer

CAPACITY = 100_000
BATCHES = {"wm": (16, 128, False), "img": (1024, 8, True)}


@pytest.fixture(scope="module", params=["dfs", "uniform"])
def full_buffer(request):
    rb = ReplayBuffer(CAPACITY, sampler=request.param)
    rb.obs[:] = (np.arange(CAPACITY, dtype=np.int64) % 251).astype(np.uint8)[:, None, None, None]
    rb.size, rb.ptr, rb.n_added = CAPACITY, CAPACITY // 3, 2 * CAPACITY   # full and wrapped
    return rb


@pytest.mark.parametrize("batch", list(BATCHES))
def test_sample_indices(benchmark, full_buffer, batch):
    B, L, img = BATCHES[batch]
    idx = benchmark(full_buffer.sample_indices, B, L, img)
    assert idx.shape == (B, L)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_gather_into_reused_buffer(benchmark, full_buffer, batch):
    B, L, img = BATCHES[batch]
    idx = full_buffer.sample_indices(B, L, img)
    out = np.empty((B, L) + full_buffer.obs_shape, np.uint8)
    got = benchmark(full_buffer.gather, idx, out)
    assert np.array_equal(got["obs"][:, :, 0, 0, 0], (idx % 251).astype(np.uint8))   # slot i holds i % 251
