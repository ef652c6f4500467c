"""Benchmarks measure the machine, so they use all its cores (tests/conftest.py pins tests to one)."""
import os
import sys

import torch

torch.set_num_threads(int(os.environ.get("WMBENCH_BENCH_THREADS", os.cpu_count() or 1)))

# the same malloc mode as the `wmbench` commands (see wmbench/core/allocator.py), so numbers agree: when
# benchmarks are to run, pytest restarts itself once with tcmalloc preloaded where it is installed (a
# pytest process on glibc's heap page-faults on large fresh tensors: one conv's input gradient at XS
# took 387 ms there against 94 ms under tcmalloc)
from wmbench.core import allocator  # noqa: E402

allocator.configure()


def pytest_configure(config):
    if any(a in ("--benchmark-only", "--benchmark-enable") for a in sys.argv[1:]):
        # pytest has redirected stdout/stderr into its capture files by now: hand the terminal back first,
        # or the restarted process would write its report there
        capman = config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)
        allocator.reexec_with_tcmalloc(sys.argv[1:], module="pytest")
        if capman is not None:                      # not restarted (no tcmalloc, or already under it)
            capman.resume_global_capture()
