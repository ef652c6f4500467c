"""wmbench.agent.checkpoint: atomic, pickle-free checkpoints; corruption refused in one line; config diffs."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from wmbench.agent import checkpoint as ckpt


def _payload(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {"model": {"w": torch.randn(3, 4, generator=g), "n": torch.tensor(5)},
             "opt": {"state": {0: {"step": 3, "m": torch.ones(2)}},
                     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99)}]},
             "rng": torch.get_rng_state()}
    arrays = {"obs": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3), "count": np.array([1, 2, 3])}
    meta = {"episodes": [{"step": 10, "return": 1.5}], "big": 2 ** 100}
    return state, arrays, meta


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip(tmp_path):
    state, arrays, meta = _payload()
    assert ckpt.load_checkpoint(tmp_path) is None
    path = ckpt.save_checkpoint(tmp_path, 7, state, arrays, meta)
    c = ckpt.load_checkpoint(tmp_path)
    assert c.path == path and c.step == 7
    assert torch.equal(c.state["model"]["w"], state["model"]["w"])
    assert c.state["opt"]["state"][0]["step"] == 3 and c.state["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(c.state["rng"], state["rng"])
    for k in arrays:
        assert np.array_equal(c.arrays[k], arrays[k]) and c.arrays[k].dtype == arrays[k].dtype
    assert c.meta["episodes"] == meta["episodes"] and c.meta["big"] == 2 ** 100


def test_keep_prunes_old_checkpoints_and_latest_moves(tmp_path):
    state, arrays, meta = _payload()
    for s in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, s, state, arrays, meta, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_000000003", "step_000000004"]
    assert ckpt.load_checkpoint(tmp_path).step == 4


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    state, arrays, meta = _payload()
    ckpt.save_checkpoint(tmp_path, 1, state, arrays, meta)
    before = _snapshot(tmp_path)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, state, arrays, meta)
    assert _snapshot(tmp_path) == before          # no temp folder left, `latest` unchanged
    assert ckpt.load_checkpoint(tmp_path).step == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest", "pointer", "pointer_empty"])
def test_corrupt_checkpoint_refused_in_one_line(tmp_path, damage):
    state, arrays, meta = _payload()
    path = ckpt.save_checkpoint(tmp_path, 3, state, arrays, meta)
    f = path / "state.pt"
    if damage == "flip":
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x01
        f.write_bytes(bytes(b))
    elif damage == "truncate":
        (path / "arrays.npz").write_bytes((path / "arrays.npz").read_bytes()[:50])
    elif damage == "delete":
        (path / "meta.json").unlink()
    elif damage == "manifest":
        (path / "manifest.json").write_text("{not json")
    elif damage == "pointer":
        (tmp_path / "checkpoints" / "latest").write_text("step_000000099\n")
    else:
        (tmp_path / "checkpoints" / "latest").write_text("")
    before = _snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and ("corrupt" in msg or "missing" in msg)
    assert _snapshot(tmp_path) == before          # loading never writes


class _Evil:
    ran = False

    def __reduce__(self):
        return (_set_ran, ())


def _set_ran():
    _Evil.ran = True
    return "pwned"


def test_pickled_code_is_never_executed(tmp_path):
    """A state.pt holding a pickled callable (with a valid manifest) is refused, not run."""
    state, arrays, meta = _payload()
    state["evil"] = _Evil()
    ckpt.save_checkpoint(tmp_path, 1, state, arrays, meta)   # torch.save pickles it; the manifest matches
    _Evil.ran = False
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(tmp_path)
    assert not _Evil.ran


def test_object_arrays_are_rejected_on_save(tmp_path):
    state, arrays, meta = _payload()
    arrays["bad"] = np.array([{"a": 1}], dtype=object)
    with pytest.raises(TypeError, match="object"):
        ckpt.save_checkpoint(tmp_path, 1, state, arrays, meta)
    assert ckpt.load_checkpoint(tmp_path) is None and not (tmp_path / "checkpoints" / "latest").exists()


def test_config_diff_names_fields():
    a = {"seed": 0, "backbone": "mamba2", "filters": (1, 2), "steps": 10}
    b = {"seed": 1, "backbone": "mamba2", "filters": [1, 2], "steps": 20, "new": True}
    assert ckpt.config_diff(a, b, ignore={"steps"}) == ["new: '<unset>' -> True", "seed: 0 -> 1"]
    assert ckpt.config_diff(a, dict(a)) == []


def test_rng_state_helpers_round_trip_through_json():
    random.seed(3)
    np.random.seed(4)
    g = np.random.default_rng(5)
    s_py = json.loads(json.dumps(ckpt.python_rng_state()))
    s_np = json.loads(json.dumps(ckpt.numpy_global_rng_state()))
    s_g = json.loads(json.dumps(ckpt.generator_state(g)))
    want = (random.random(), np.random.rand(), g.random())
    random.seed(0), np.random.seed(0)
    ckpt.set_python_rng_state(s_py)
    ckpt.set_numpy_global_rng_state(s_np)
    g2 = ckpt.generator_from_state(s_g)
    assert (random.random(), np.random.rand(), g2.random()) == want
