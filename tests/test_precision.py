"""`--precision auto`: bf16 autocast only where it was measured faster; explicit choices respected, a
contradiction refused in one line."""
import math
import subprocess
import sys

import pytest
import torch

from wmbench.agent import config as agent_config
from wmbench.agent.config import bf16_speedup, check_config, model_config, resolve_config


def _cfg(**kw):
    return check_config(resolve_config(None, game="gridgoal", device="cpu", compile=False, **kw))


def test_no_native_bf16_stays_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(agent_config, "bf16_native", lambda d: False)
    monkeypatch.setattr(agent_config, "bf16_speedup", lambda d: pytest.fail("measured on an emulating host"))
    cfg = _cfg()
    assert cfg.precision == "fp32" and "no native bf16" in cfg.auto_choices["precision"]
    assert model_config(cfg).amp is False
    assert check_config(cfg) == cfg            # resolving twice changes nothing


@pytest.mark.parametrize("speedup,chosen", [(1.8, "bf16"), (1.1, "fp32"), (0.6, "fp32")])
def test_native_bf16_is_chosen_only_when_measured_faster(monkeypatch, speedup, chosen):
    monkeypatch.setattr(agent_config, "bf16_native", lambda d: True)
    monkeypatch.setattr(agent_config, "bf16_speedup", lambda d: speedup)
    cfg = _cfg()
    assert cfg.precision == chosen and f"{speedup:.2f}x" in cfg.auto_choices["precision"]
    assert model_config(cfg).amp is (chosen == "bf16")


def test_explicit_choices_win():
    assert model_config(_cfg(precision="bf16")).amp is True
    assert model_config(_cfg(precision="fp32")).amp is False
    cfg = _cfg(model_overrides={"amp": True})
    assert cfg.precision == "bf16" and "--set amp" in cfg.auto_choices["precision"]
    # --faithful code takes the code's amp only when the precision is left to auto
    assert model_config(_cfg(precision="bf16", faithful="code")).amp is True


def test_contradiction_is_refused():
    with pytest.raises(ValueError, match="contradicts --set amp"):
        _cfg(precision="fp32", model_overrides={"amp": True})


def test_the_measurement_is_a_real_ratio():
    r = bf16_speedup(torch.device("cpu"), min_time_s=0.05)
    assert math.isfinite(r) and 0.01 < r < 100


def test_bad_precision_is_one_line():
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "atari", "--game", "gridgoal", "--precision", "fp16",
                        "--check"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "precision must be one of" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
