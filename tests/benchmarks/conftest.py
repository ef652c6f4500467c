"""Benchmarks measure the machine, so they use all its cores (tests/conftest.py pins tests to one)."""
import os

import torch

torch.set_num_threads(int(os.environ.get("WMBENCH_BENCH_THREADS", os.cpu_count() or 1)))
