"""`wmbench bench` and `wmbench list` end to end on tiny sizes; bad input -> one line, exit 2."""
import json
import subprocess
import sys

import pytest


def _wmbench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "wmbench.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_bench_tiny_writes_record(tmp_path):
    runs = tmp_path / "runs"
    p = _wmbench("bench", "--backbones", "gru,mamba2", "--len", "16,32", "--batch", "2", "--d-model", "64",
                 "--layers", "1", "--iters", "1", "--warmup", "0", "--contexts", "4,8", "--runs-dir", str(runs),
                 "--no-progress")
    assert p.returncode == 0, p.stderr
    recs = list(runs.glob("*.json"))
    assert len(recs) == 1
    rec = json.loads(recs[0].read_text())
    assert rec["kind"] == "bench" and rec["schema_version"] == 1
    assert rec["environment"]["torch"] and rec["environment"]["cpu_model"]
    cell = rec["metrics"]["cells"]["mamba2"]["32"]
    assert cell["fwd_bwd_time"]["unit"] == "ms" and cell["fwd_bwd_time"]["value"] > 0
    assert cell["peak_memory"]["method"] == "rss_sampler"
    assert cell["model_flops"]["value"] > cell["linear_flops"]["value"] / 10
    assert set(cell["step_latency"]["value"]) == {"4", "8"}
    assert "mamba2" in p.stdout and "gru" in p.stdout


@pytest.mark.parametrize("args, needle", [
    (["bench", "--backbones", "lstm"], "valid choices"),
    (["bench", "--backbones", "mamba2", "--d-model", "100", "--len", "8"], "headdim"),
    (["bench", "--batch", "0"], "--batch"),
])
def test_bench_bad_input_one_line(tmp_path, args, needle):
    p = _wmbench(*args, "--runs-dir", str(tmp_path))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
    assert not list(tmp_path.glob("*.json"))


def test_list():
    p = _wmbench("list")
    assert p.returncode == 0, p.stderr
    for name in ("mamba", "mamba2", "gru", "transformer"):
        assert name in p.stdout
