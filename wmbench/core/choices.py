"""Automatic choices made once per machine, then reused: a choice measured again at every start flips
under load (bf16 measured 0.50-2.68x fp32 on one busy 2-core host), so two seeds of one configuration,
or two starts of one run, could run in different precisions.

The cache is one JSON file, $WMBENCH_CACHE_DIR/choices.json (default ~/.cache/wmbench), keyed by the
choice and the machine (CPU or GPU model, device type, torch version). Delete it to measure again.
It is a cache: an unreadable file is measured over, never an error.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Callable

import torch

ENV = "WMBENCH_CACHE_DIR"


def cache_path() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "wmbench") / "choices.json"


def machine_key(device: torch.device) -> str:
    from wmbench.core.records import device_name
    return f"{device.type}|{device_name(device)}|torch {torch.__version__}"


def _load() -> dict:
    from wmbench.core.readback import read_json_object
    try:
        return read_json_object(cache_path(), "choice cache") if cache_path().exists() else {}
    except ValueError:
        return {}


def lookup(choice: str, device: torch.device) -> tuple | None:
    """(value, why) of `choice` on this machine if the cache holds it, else None."""
    entry = _load().get(f"{choice}|{machine_key(device)}")
    if isinstance(entry, dict) and "value" in entry and isinstance(entry.get("why"), str):
        return entry["value"], f"{entry['why']} (cached {entry.get('at', '?')}, {cache_path()})"
    return None


def remember(choice: str, device: torch.device, value, why: str) -> None:
    """Store a measured choice; a cache that cannot be written is not an error (the choice still stands)."""
    from wmbench.core.records import atomic_write_text
    table = _load()
    table[f"{choice}|{machine_key(device)}"] = {
        "value": value, "why": why, "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        atomic_write_text(cache_path(), json.dumps(table, indent=1))
    except OSError:
        pass          # a read-only home: the choice is still made, only not remembered


def cached(choice: str, device: torch.device, measure: Callable[[], tuple]) -> tuple:
    """(value, why) of `choice` on this machine: from the cache, or `measure()`d and stored."""
    hit = lookup(choice, device)
    if hit is not None:
        return hit
    value, why = measure()
    remember(choice, device, value, why)
    return value, why
