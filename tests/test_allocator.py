"""The malloc mode switch (wmbench/core/allocator.py): applied, reverted, recorded, and bad input refused."""
import ctypes.util
import platform

import pytest
import torch

from wmbench.core import allocator
from wmbench.core.records import environment

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="keep, system"):
        allocator.configure("jemalloc")


def test_env_var_selects_the_mode(monkeypatch):
    before = allocator.active()
    try:
        monkeypatch.setenv("WMBENCH_MALLOC", "system")
        assert allocator.configure() == "system"
        monkeypatch.setenv("WMBENCH_MALLOC", "bogus")
        with pytest.raises(ValueError, match="WMBENCH_MALLOC"):
            allocator.configure()
    finally:
        allocator.configure(before)


@pytest.mark.skipif(not glibc or ctypes.util.find_library("c") is None, reason="needs glibc mallopt")
def test_keep_and_system_switch_and_are_recorded():
    before = allocator.active()
    try:
        assert allocator.configure("keep") == "keep"
        assert environment()["malloc"] == "keep"
        # large tensors still allocate, free and compute correctly under the kept heap
        for _ in range(3):
            x = torch.ones(64, 2**20)           # 256 MB, above glibc's largest mmap threshold
            assert x.sum().item() == 64 * 2**20
            del x
        assert allocator.configure("system") == "system"
        assert environment()["malloc"] == "system"
    finally:
        allocator.configure(before)


def test_auto_is_tcmalloc_only_where_installed(monkeypatch):
    monkeypatch.delenv("WMBENCH_MALLOC", raising=False)
    monkeypatch.setattr(allocator, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator._wanted(None) == "keep"
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    assert allocator._wanted(None) == "tcmalloc"


def test_tcmalloc_asked_for_but_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    with pytest.raises(ValueError, match="no tcmalloc library is installed"):
        allocator.configure("tcmalloc")


def test_tcmalloc_not_preloaded_falls_back_to_keep(monkeypatch):
    """A library call (no re-exec possible) asks for tcmalloc: it gets the kept glibc heap instead."""
    before = allocator.active()
    monkeypatch.setattr(allocator, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    try:
        assert allocator.configure("tcmalloc") in ("keep", "system")   # system where mallopt is missing
    finally:
        allocator.configure(before)


def _bench_record(tmp_path, env):
    import json
    import os
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "bench", "--backbones", "gru", "--len", "16",
                        "--batch", "2", "--iters", "1", "--contexts", "8", "--no-progress", "--runs-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert p.returncode == 0, p.stderr
    return json.loads(open(p.stdout.strip().splitlines()[-1].split("record: ")[1]).read())


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc is not installed here")
def test_the_command_runs_under_tcmalloc_where_installed(tmp_path):
    rec = _bench_record(tmp_path, {"WMBENCH_MALLOC": ""})
    assert rec["environment"]["malloc"] == "tcmalloc"


def test_no_reexec_when_already_tried(tmp_path):
    """The flag left by one re-exec stops a second (no loop), and the mode falls back to the kept heap."""
    rec = _bench_record(tmp_path, {"WMBENCH_MALLOC": "", "WMBENCH_MALLOC_PRELOADED": "1", "LD_PRELOAD": ""})
    assert rec["environment"]["malloc"] in ("keep", "system")
