"""Keep freed memory inside the process, so that big CPU tensors do not page-fault on every step.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and
gives it back with `munmap` when freed. A training step allocates and frees the same large
activations again and again, so each step touches fresh pages: on our 2-core CPU a SiLU over a
(16, 1664, 1024) fp32 tensor takes 33 ms into a new tensor and 6 ms into an existing one. That is
why PyTorch's CPU tuning guide recommends jemalloc or tcmalloc. Those are not pip packages, so we
tune glibc instead. With M_MMAP_MAX = 0 large blocks come from the heap, and with a huge
M_TRIM_THRESHOLD freed blocks stay mapped for reuse. The process keeps its high-water mark; it
does not give it back until it exits.

Measured on the XS agent update (2-core AMD EPYC, 2 threads, `wmbench bench --agent --size XS`, a full
100k-frame replay buffer in memory): glibc kept ('keep') 24.6 s and 7.9 GB peak, glibc defaults
('system') 28.4 s and 5.3 GB, jemalloc 31.4 s and 4.7 GB, tcmalloc 20.1 s and 5.8 GB. Kept pages
avoid the faults, but big and small blocks fragment one heap; tcmalloc reuses its pages without that
cost. So the `wmbench` command runs under tcmalloc when the library is installed
(`apt install libtcmalloc-minimal4`, conda's `gperftools`): it re-executes itself once with
LD_PRELOAD set, before anything else is imported. Without the library it tunes glibc ('keep').

`configure()` is called by the `wmbench` commands. `WMBENCH_MALLOC` picks a mode: tcmalloc (an error if
the library is missing), keep, or system (malloc left alone). Run records name the mode in use
(`environment.malloc`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MODES = ("tcmalloc", "keep", "system")
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")       # gperftools' libraries, minimal first
_REEXEC_FLAG = "WMBENCH_MALLOC_PRELOADED"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4      # from glibc's malloc.h
_active = "system"


def active() -> str:
    """The malloc mode this process runs with: 'tcmalloc', 'keep' or 'system'."""
    return _active


def find_tcmalloc() -> str | None:
    """The name of an installed tcmalloc library the dynamic loader can preload, or None."""
    for name in TCMALLOC_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def tcmalloc_loaded() -> bool:
    """Whether tcmalloc serves this process's malloc (it was preloaded)."""
    try:
        with open("/proc/self/maps") as f:
            return "libtcmalloc" in f.read()
    except OSError:
        return False


def _wanted(mode: str | None) -> str:
    mode = (mode or os.environ.get("WMBENCH_MALLOC") or "auto").strip().lower()
    if mode == "auto":
        return "tcmalloc" if tcmalloc_loaded() or find_tcmalloc() else "keep"
    if mode not in MODES:
        raise ValueError(f"unknown WMBENCH_MALLOC mode {mode!r}; valid choices: auto, {', '.join(MODES)}")
    return mode


def reexec_with_tcmalloc(argv: list[str], module: str = "wmbench.cli") -> None:
    """If this process should run under tcmalloc and does not yet, replace it with `python -m MODULE ARGV`
    with tcmalloc preloaded (once: a flag in the environment stops a second try). Returns only when
    nothing needs doing or the library cannot be found (then `configure` explains or falls back). The
    benchmark suite calls it with module "pytest", so that it measures what the commands run."""
    if os.environ.get(_REEXEC_FLAG) or tcmalloc_loaded():
        return
    try:
        if _wanted(None) != "tcmalloc":
            return
    except ValueError:
        return                                      # configure() reports the bad mode in one line
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ, **{_REEXEC_FLAG: "1"})
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
    except OSError:
        return                                      # could not exec: carry on with glibc


def configure(mode: str | None = None) -> str:
    """Apply `mode` (default: $WMBENCH_MALLOC, else 'auto': tcmalloc when it is loaded or installed, else
    'keep'); returns the mode now in effect.

    'tcmalloc' takes effect only in a process started with it preloaded (`reexec_with_tcmalloc`); asked
    for explicitly without the library installed it is an error, and in a process that could not preload
    it (a library call rather than the command) the mode falls back to 'keep'. 'keep' needs glibc's
    `mallopt`; elsewhere (macOS, musl) the mode stays 'system'.
    """
    global _active
    explicit = (mode or os.environ.get("WMBENCH_MALLOC") or "auto").strip().lower() == "tcmalloc"
    mode = _wanted(mode)
    if mode == "tcmalloc":
        if tcmalloc_loaded():
            _active = "tcmalloc"
            return _active
        if explicit and find_tcmalloc() is None:
            raise ValueError("WMBENCH_MALLOC=tcmalloc but no tcmalloc library is installed "
                             "(apt install libtcmalloc-minimal4, or conda's gperftools); or use keep")
        mode = "keep"
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
