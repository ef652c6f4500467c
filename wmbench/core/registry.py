"""Name -> factory registries for backbones and tasks (timm / gymnasium style).

Built-ins register themselves when `wmbench.backbones` / `wmbench.tasks` are imported; third-party
packages register through the entry-point groups `wmbench.backbones` and `wmbench.tasks`, whose
entry points resolve to a factory `f(d_model, n_layers, **options) -> nn.Module` (backbones) or
any object (tasks).
"""
from __future__ import annotations

import importlib
import numbers
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable


class Registry:
    def __init__(self, kind: str, group: str, builtin_module: str):
        self.kind = kind
        self.group = group
        self.builtin_module = builtin_module
        self._factories: dict[str, Callable[..., Any]] = {}
        self._loaded = False

    def register(self, name: str, factory: Callable[..., Any] | None = None):
        """Register `factory` under `name`; usable as a decorator."""
        def deco(f):
            key = name.lower()
            if key in self._factories and self._factories[key] is not f:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[key] = f
            return f
        return deco(factory) if factory is not None else deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self.builtin_module)
        for ep in entry_points(group=self.group):
            if ep.name.lower() in self._factories:
                continue
            try:
                self._factories[ep.name.lower()] = ep.load()
            except Exception as e:  # a broken plug-in must not break the built-ins
                warnings.warn(f"could not load {self.kind} plug-in {ep.name!r} ({ep.value}): {e}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
        key = str(name).lower()
        if key not in self._factories:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}")
        return self._factories[key]


# The built-in backbones in the order tables, plots and default benchmarks list them: Drama's Mamba-2
# first, the 2023-2024 baselines, then the 2026 delta-rule and gated linear recurrences.
BUILTIN_BACKBONES = ("mamba2", "mamba", "gru", "transformer", "gated_deltanet", "mlstm", "rwkv7", "mamba3")

BACKBONES = Registry("backbone", "wmbench.backbones", "wmbench.backbones")
TASKS = Registry("task", "wmbench.tasks", "wmbench.tasks")

register_backbone = BACKBONES.register
register_task = TASKS.register


def list_backbones() -> list[str]:
    return BACKBONES.names()


def create_backbone(name: str, d_model: int = 512, n_layers: int = 2, **options):
    """Build a registered backbone: a torch.nn.Module with forward / init_state / prefill / step."""
    for k, v in (("d_model", d_model), ("n_layers", n_layers)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:   # not 3.5, "64" or True
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    return BACKBONES.get(name)(d_model=int(d_model), n_layers=int(n_layers), **options)


def list_tasks() -> list[str]:
    return TASKS.names()


def get_task(name: str):
    return TASKS.get(name)
