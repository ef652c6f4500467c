"""Run records: atomic writes, environment, validation, corrupt files skipped; memory sampler."""
import json
import os

import numpy as np
import pytest

from wmbench.core import allocator
from wmbench.core.measure import PeakMemory, median, metric, time_calls
from wmbench.core.records import atomic_write_text, environment, load_records, make_record, write_record


def test_record_roundtrip(tmp_path):
    rec = make_record("bench", {"a": 1}, {"t": metric(1.5, "ms", "median")})
    path = write_record(rec, tmp_path, name="r1")
    loaded = load_records(tmp_path)
    assert len(loaded) == 1 and loaded[0]["config"] == {"a": 1}
    assert loaded[0]["metrics"]["t"] == {"value": 1.5, "unit": "ms", "method": "median"}
    assert path.name == "r1.json"
    env = loaded[0]["environment"]
    for key in ("wmbench_version", "git_commit", "torch", "device", "cpu_model", "torch_threads"):
        assert key in env


def test_corrupt_and_foreign_records_skipped(tmp_path):
    write_record(make_record("bench", {}, {}), tmp_path, name="good")
    (tmp_path / "truncated.json").write_text('{"schema_version": 1, "kind": "be')
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": 1}))
    with pytest.warns(UserWarning, match="skipping"):
        recs = load_records(tmp_path)
    assert [r["kind"] for r in recs] == ["bench"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_peak_memory_sees_numpy_allocation():
    # under the kept heap (left on by an in-process CLI test) the 64 MiB could reuse pages that are
    # already resident, and RSS would not move: measure with glibc's own behaviour
    before = allocator.active()
    allocator.configure("system")
    try:
        with PeakMemory("cpu") as pm:
            a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
            a += 1
            del a
    finally:
        allocator.configure(before)
    assert pm.method == "rss_sampler"
    assert 48 * 2**20 < pm.peak_bytes < 256 * 2**20


def test_time_calls_counts_iters():
    calls = []
    ts = time_calls(lambda: calls.append(1), warmup=2, iters=3)
    assert len(ts) == 3 and len(calls) == 5 and median(ts) >= 0


def test_environment_cpu():
    env = environment("cpu")
    assert env["device"] == "cpu" and env["device_name"] == env["cpu_model"]


def test_records_of_the_same_second_never_replace_each_other(tmp_path):
    """Two runs that finish in the same second with the same name both keep their record."""
    from wmbench.core.records import write_record
    a = write_record({"kind": "x", "v": 1}, tmp_path, name="same")
    b = write_record({"kind": "x", "v": 2}, tmp_path, name="same")
    assert a.name == "same.json" and b.name == "same-2.json"
    assert json.loads(a.read_text())["v"] == 1 and json.loads(b.read_text())["v"] == 2
    c = write_record({"kind": "x", "v": 3}, tmp_path, name="same", overwrite=True)
    assert c == a and json.loads(a.read_text())["v"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same-2.json", "same.json"]   # no temp files left
