"""`wmbench atari --compile`: the compiled recurrent step imagines what the eager one does; a machine
without a C++ compiler is refused in one line before any work."""
import copy

import pytest
import torch

from wmbench.agent import ActorCritic
from wmbench.agent.estimate import random_batches
from wmbench.world_model import WorldModel, get_preset
from wmbench.world_model.model import check_compile


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mamba2", "gru"])
def test_compiled_step_imagines_like_the_eager_one(backbone):
    m = get_preset("tiny", backbone=backbone)
    torch.manual_seed(0)
    wm, ac = WorldModel(m, 6), ActorCritic(m, 6)
    compiled = copy.deepcopy(wm)
    compiled.compile_rollout()
    _, (obs, act) = random_batches(m, (m.image_size, m.image_size, m.image_channels), 6, 1.0)
    torch.manual_seed(1)
    eager = wm.imagine(obs, act, ac)
    torch.manual_seed(1)
    comp = compiled.imagine(obs, act, ac)
    torch.testing.assert_close(comp.h, eager.h, rtol=1e-4, atol=1e-5)
    assert torch.equal(comp.actions, eager.actions)


def test_no_compiler_is_refused_in_one_line(monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        check_compile(torch.device("cpu"))


def test_compile_is_a_resumable_option():
    from wmbench.agent.config import RESUMABLE_CHANGES, TrainConfig
    assert "compile" in RESUMABLE_CHANGES and TrainConfig().compile is None


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    m = get_preset("tiny")
    torch.manual_seed(0)
    wm, ac = WorldModel(m, 6), ActorCritic(m, 6)

    def broken(fn, **kw):
        def f(*a, **k):
            raise RuntimeError("no compiler backend here")
        return f
    monkeypatch.setattr(torch, "compile", broken)
    eager = copy.deepcopy(wm)
    wm.compile_rollout()
    _, (obs, act) = random_batches(m, (m.image_size, m.image_size, m.image_channels), 6, 1.0)
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match="imagination runs eagerly"):
        out = wm.imagine(obs, act, ac)
    torch.manual_seed(1)
    ref = eager.imagine(obs, act, ac)
    assert torch.equal(out.h, ref.h)


def test_auto_compile_choice():
    from wmbench.agent.config import resolve_compile
    on, why = resolve_compile(torch.device("cpu"), get_preset("cpu"))
    tiny_on, tiny_why = resolve_compile(torch.device("cpu"), get_preset("tiny"))
    assert tiny_on is False and "imagination batch 32" in tiny_why
    import shutil
    assert on == bool(shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")), why
