"""`wmbench run` end to end: a tiny grid-world cell writes a valid record; bad input writes none."""
import json
import subprocess
import sys

import pytest

from wmbench.core.records import validate_record


def _wmbench(*args):
    return subprocess.run([sys.executable, "-m", "wmbench.cli", *args], capture_output=True, text=True)


def test_run_tiny_writes_valid_record(tmp_path):
    p = _wmbench("run", "--backbone", "gru", "--task", "gridworld", "--len", "52", "--seeds", "0,1",
                 "--steps", "3", "--batch", "2", "--d-model", "16", "--layers", "1", "--eval-sequences", "4",
                 "--runs-dir", str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stderr
    recs = sorted(tmp_path.glob("*.json"))
    assert len(recs) == 2                                   # one record per seed
    rec = json.loads(recs[0].read_text())
    validate_record(rec)
    assert rec["kind"] == "gridworld" and rec["status"] == "ok"
    assert rec["config"]["backbone"] == "gru" and rec["config"]["seq_len"] == 52
    for name in ("train_ms_per_step", "peak_memory", "tokens_per_s", "error_pct", "oracle_error_pct",
                 "imagine_ms_per_token"):
        assert rec["metrics"][name]["unit"], name
    assert "error" in p.stdout and "record:" in p.stdout


@pytest.mark.parametrize("args, needle", [
    (["--len", "1000"], "nearest valid lengths: 988, 1014"),
    (["--backbone", "lstm"], "valid choices"),
    (["--task", "chess"], "valid choices"),
    (["--preset", "huge"], "valid choices"),
])
def test_run_bad_input_one_line_no_record(tmp_path, args, needle):
    p = _wmbench("run", *args, "--runs-dir", str(tmp_path), "--no-progress")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
    assert not list(tmp_path.glob("*.json"))
