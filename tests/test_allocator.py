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
