"""`wmbench atari --backbone NAME` at the `cpu` size, past the warm-up, for each 2026 backbone.

The `cpu` model at its real shapes (64x64 frames pooled to 16x16, d_model 128, batch 16 x 32, imagination
128 x 16) on the pixel grid world `gridgoal`, whose episodes are short enough for a final evaluation in
seconds; the Atari games run the same model. Ten world-model and actor-critic updates each, then the
record: its losses are finite and it names the backbone and its parameter count.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

NEW = ["gated_deltanet", "mlstm", "rwkv7", "mamba3"]


@pytest.mark.parametrize("backbone", NEW)
def test_atari_command_trains_each_new_backbone_at_cpu_size(backbone, tmp_path):
    run, rec = tmp_path / "run", tmp_path / "rec"
    cmd = [sys.executable, "-m", "wmbench.cli", "atari", "--game", "gridgoal", "--backbone", backbone,
           "--size", "cpu", "--steps", "530", "--warmup", "520", "--eval-every", "0",
           "--final-eval-episodes", "1", "--threads", "1", "--no-progress", "--no-estimate",
           "--run-dir", str(run), "--runs-dir", str(rec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [ln for ln in lines if ln.get("type") == "train" and ln.get("updates", 0) > 0]
    assert trained and trained[-1]["updates"] >= 10
    for key in ("loss", "recon", "dyn", "ac_loss"):
        assert math.isfinite(trained[-1][key]), (key, trained[-1])
    (record,) = rec.glob("*.json")
    r = json.loads(record.read_text())
    assert r["config"]["backbone"] == backbone and r["config"]["size"] == "cpu"
    assert 0 < r["parameters"]["backbone"] < r["parameters"]["sequence_model"]
