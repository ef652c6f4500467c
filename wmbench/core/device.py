"""Device names from the command line, checked once for every command."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N' -> torch.device; ValueError in one line if the
    name is unknown or the device is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def max_threads() -> int:
    """The most torch CPU threads a command accepts: 4x the cores. More only oversubscribes the CPU, and
    far more crashes the process (it cannot start that many threads)."""
    import os
    return 4 * (os.cpu_count() or 1)


def check_threads(threads, flag: str = "--threads") -> None:
    """ValueError in one line unless `threads` is an integer in [0, max_threads()] (0: automatic)."""
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= max_threads():
        raise ValueError(f"{flag} must be an integer in [0, {max_threads()}] (up to 4x this machine's "
                         f"{max_threads() // 4} cores; 0: automatic), got {threads!r}")
