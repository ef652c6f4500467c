"""Benchmarks measure the machine, so they use all its cores (tests/conftest.py pins tests to one)."""
import os

import torch

torch.set_num_threads(int(os.environ.get("WMBENCH_BENCH_THREADS", os.cpu_count() or 1)))

# the same malloc mode as the `wmbench` commands (see wmbench/core/allocator.py), so numbers agree
from wmbench.core import allocator  # noqa: E402

allocator.configure()
