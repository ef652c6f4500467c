"""`wmbench imagine`: true | imagined | error videos from a benchmark cell's record and from an agent's
run dir; the frame layout on a hand-made case; bad input as one line and exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from wmbench.harness.imagine_video import render

ENV = {**os.environ, "WMBENCH_MALLOC": "system"}


def _cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "wmbench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=ENV)


def test_render_layout_hand_made():
    """One window, 2 steps, 1-channel 2x2 frames: columns true | imagined | |error|, gutters white."""
    true = np.zeros((1, 2, 1, 2, 2), np.float32)
    pred = np.full((1, 2, 1, 2, 2), 0.5, np.float32)
    pred[0, 1] = 1.0
    frames = render(true, pred, scale=1)
    assert len(frames) == 2 and frames[0].shape == (2 + 2 + 2, 3 * (2 + 2) + 2, 3)
    f = frames[1]
    assert (f[2:4, 2:4] == 0).all()                       # true: black
    assert (f[2:4, 6:8] == 255).all()                     # imagined: 1.0
    assert (f[2:4, 10:12] == 255).all()                   # |error| = 1.0
    assert (frames[0][2:4, 10:12] == 128).all()           # |error| = 0.5 -> 127.5 rounds to 128
    assert (f[0:2] == 255).all() and (f[:, 0:2] == 255).all()


def _gif(path):
    im = Image.open(path)
    return im.size, im.n_frames


def test_video_from_a_benchmark_record(tmp_path):
    p = _cli("run", "--task", "atari", "--game", "Krull", "--backbone", "gru", "--steps", "2", "--data-steps",
             "3200", "--len", "16", "--eval-sequences", "2", "--threads", "1", "--d-model", "16", "--layers", "1",
             "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    record = p.stdout.strip().splitlines()[-1].split("record: ")[1]
    q = _cli("imagine", "--record", record, "--samples", "2", "--context", "4", "--horizon", "6", "--out",
             str(tmp_path / "v" / "cell"), cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    (w, h), n = _gif(tmp_path / "v" / "cell.gif")
    assert n == 6 and w == 3 * (128 + 2) + 2 and h == 14 + 2 * (128 + 2) + 2
    # the world model named by the record is gone: one line, exit 2
    rec = json.loads(open(record).read())
    os.remove(rec["artifacts"]["world_model"])
    r = _cli("imagine", "--record", record, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "missing" in r.stderr


def test_video_from_an_agent_run_dir(tmp_path):
    run = tmp_path / "agent"
    p = _cli("atari", "--game", "gridgoal", "--preset", "tiny", "--steps", "40", "--warmup", "20", "--eval-every",
             "0", "--final-eval-episodes", "1", "--checkpoint-every", "20", "--threads", "1", "--no-progress",
             "--no-estimate", "--env-option", "episode_length=12", "--run-dir", str(run),
             "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    q = _cli("imagine", "--run-dir", str(run), "--samples", "2", "--context", "3", "--horizon", "4", "--out",
             str(tmp_path / "agent-video"), cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    assert _gif(tmp_path / "agent-video.gif")[1] == 4


@pytest.mark.parametrize("args,needle", [
    (["--record", "/nonexistent.json"], "--record /nonexistent.json does not exist"),
    (["--run-dir", "/nonexistent/run"], "no such run dir"),
    (["--record", "R", "--horizon", "0"], "--horizon must be"),
])
def test_bad_input(tmp_path, args, needle):
    if "R" in args:
        other = tmp_path / "bench.json"
        other.write_text(json.dumps({"kind": "bench"}))
        args = [str(other) if a == "R" else a for a in args]
    p = _cli("imagine", *args, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and needle in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_record_of_another_kind_is_refused(tmp_path):
    other = tmp_path / "bench.json"
    other.write_text(json.dumps({"kind": "bench"}))
    p = _cli("imagine", "--record", str(other), cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "not a `wmbench run --task atari` one" in p.stderr
