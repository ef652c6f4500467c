"""`wmbench doctor`: what this machine has and what wmbench will use on it, in a dozen lines.

Device and its bf16 support, the precision `--precision auto` picks (from the choice cache, or measured
now and cached), threads, the allocator, and each optional CUDA kernel: installed, importable, and
whether it will be used (only for CUDA tensors). Nothing here changes a setting; it only looks.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform

import torch

# the optional `cuda` extra: (import name, what it accelerates)
KERNELS = (("mamba_ssm", "Mamba / Mamba-2 selective scan and SSD"), ("causal_conv1d", "the short causal conv"),
           ("flash_attn", "the Transformer's attention"), ("fla", "Gated DeltaNet and RWKV-7 (flash-linear-attention)"),
           ("mlstm_kernels", "the mLSTM's chunkwise kernel"))


def kernel_status(name: str, cuda: bool) -> str:
    """'not installed', 'installed, imports ...' or 'installed, fails to import (reason)'. find_spec first:
    an absent package is never imported."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "not installed (pip install 'wmbench[cuda]' on a CUDA machine)"
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure means unusable, as in backbones/ops/cuda.py
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"installed, fails to import ({first}); the PyTorch path is used"
    return "installed, imports; used for CUDA tensors" if cuda else "installed, imports; unused here (no CUDA)"


def doctor_lines() -> list[str]:
    from wmbench.agent.config import bf16_native, resolve_precision
    from wmbench.agent.estimate import usable_cores
    from wmbench.core import allocator
    from wmbench.core.choices import cache_path
    from wmbench.core.device import max_threads
    from wmbench.core.records import _git_commit, device_name
    from wmbench.core.version import __version__

    git = _git_commit()
    lines = [f"wmbench {__version__}" + (f" (git {git['git_commit'][:10]}{', modified' if git['git_dirty'] else ''})"
                                        if git["git_commit"] else "")
             + f", Python {platform.python_version()}, torch {torch.__version__}"]
    cpu = torch.device("cpu")
    lines.append(f"cpu:        {device_name(cpu)}, {usable_cores()} cores usable of {os.cpu_count()}, "
                 f"native bf16: {'yes' if bf16_native(cpu) else 'no (bf16 would be emulated)'}")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            d = torch.device("cuda", i)
            lines.append(f"cuda:{i}:     {device_name(d)}, CUDA {torch.version.cuda}, "
                         f"native bf16: {'yes' if bf16_native(d) else 'no'}")
    else:
        why = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
        lines.append(f"cuda:       not available ({why}); `--device auto` runs on the CPU")
    lines.append(f"threads:    torch uses {torch.get_num_threads()}; `--threads` accepts 0 (automatic) to "
                 f"{max_threads()}")
    mode = allocator.configure()
    lib = allocator.find_tcmalloc()
    lines.append(f"allocator:  {mode}" + ("" if lib or mode == "tcmalloc" else
                                          " (tcmalloc not installed: apt install libtcmalloc-minimal4)"))
    device = torch.device("cuda") if cuda else cpu
    precision, why = resolve_precision(device, {})
    lines.append(f"precision:  --precision auto -> {precision} on {device.type}: {why}")
    for name, what in KERNELS:
        lines.append(f"kernel:     {name} ({what}): {kernel_status(name, cuda)}")
    lines.append(f"choices:    cached in {cache_path()} (delete it to measure again)")
    return lines
