"""Keep freed memory inside the process, so that big CPU tensors do not page-fault on every step.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and
gives it back with `munmap` when freed. A training step allocates and frees the same large
activations again and again, so each step touches fresh pages: on our 2-core CPU a SiLU over a
(16, 1664, 1024) fp32 tensor takes 33 ms into a new tensor and 6 ms into an existing one. That is
why PyTorch's CPU tuning guide recommends jemalloc or tcmalloc. Those are not pip packages, so we
tune glibc instead. With M_MMAP_MAX = 0 large blocks come from the heap, and with a huge
M_TRIM_THRESHOLD freed blocks stay mapped for reuse. The process keeps its high-water mark; it
does not give it back until it exits.

`configure()` is called by the `wmbench` commands. Set `WMBENCH_MALLOC=system` to leave malloc
alone. Run records name the mode in use (`environment.malloc`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

MODES = ("keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4      # from glibc's malloc.h
_active = "system"


def active() -> str:
    """The malloc mode this process runs with: 'keep' or 'system'."""
    return _active


def configure(mode: str | None = None) -> str:
    """Apply `mode` (default: $WMBENCH_MALLOC, else 'keep'); returns the mode now in effect.

    'keep' needs glibc's `mallopt`. Elsewhere (macOS, musl) the mode stays 'system'.
    """
    global _active
    mode = (mode or os.environ.get("WMBENCH_MALLOC") or "keep").strip().lower()
    if mode not in MODES:
        raise ValueError(f"unknown WMBENCH_MALLOC mode {mode!r}; valid choices: {', '.join(MODES)}")
    if mode == _active:
        return _active
    # 'system' restores glibc's defaults: at most 65536 mmapped blocks, trim above 128 KiB
    mmap_max, trim = (0, 2**31 - 1) if mode == "keep" else (65536, 128 * 1024)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    except (OSError, AttributeError):
        ok = False
    if ok and mode == "system":
        libc.malloc_trim(0)                  # hand back what 'keep' was holding
    if ok:
        _active = mode
    return _active
