"""The package layout as the README draws it: imports run one way (cli -> harness -> agent -> world-model
shell -> backbones / tasks -> core; report -> core), no circle between modules, and a run's state is saved
whole (every field of `Run` is either checkpointed or derived from the config)."""
from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# room -> the rooms it may import from (besides itself)
ALLOWED = {
    "core": set(),
    "backbones": {"core"},
    "tasks": {"core"},
    "world_model": {"core", "backbones"},
    "agent": {"core", "backbones", "tasks", "world_model"},
    "harness": {"core", "backbones", "tasks", "world_model", "agent"},   # the agent bench measures the agent
    "report": {"core", "tasks"},
    "sweep": {"core", "tasks", "package"},     # it runs the commands as processes, never imports them
    "cli": {"core", "backbones", "tasks", "world_model", "agent", "harness", "report", "sweep", "package"},
    "package": {"core"},   # wmbench/__init__.py: the public names
}


def _modules() -> dict[str, Path]:
    """Installed module name -> file, for wmbench/, backbones/ and tasks/ (package-dir mapping)."""
    out = {}
    for folder, prefix in (("wmbench", "wmbench"), ("backbones", "wmbench.backbones"), ("tasks", "wmbench.tasks")):
        for f in (ROOT / folder).rglob("*.py"):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] == "cli":
        return "cli"
    return parts[1]


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative import
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}   # `from pkg import module`
    return {m for m in out if m == "wmbench" or m.startswith("wmbench.")}


def test_every_room_imports_only_downward():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        src = _room(mod)
        for target in _imports(mod, path, top_level_only=False):
            if target not in mods:
                continue   # `from wmbench.x import name`: the module itself is also in the set
            dst = _room(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{mod} ({src}) imports {target} ({dst})")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    """Module-level imports form a DAG (function-level imports are allowed to defer a cost, not a cycle:
    the room rule above covers them)."""
    mods = _modules()
    graph = {m: {t for t in _imports(m, p, top_level_only=True) if t in mods and t != m} for m, p in mods.items()}
    # a package imports its own submodules through __init__; that edge is not a circle by itself
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if m.startswith(t + "."):
                continue   # a submodule importing its parent package's public names
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_layout_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker is not vacuous: an upward import planted in a copy of the tree is reported."""
    import shutil
    for folder in ("wmbench", "backbones", "tasks"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    f = tmp_path / "wmbench" / "world_model" / "optim.py"
    f.write_text(f.read_text() + "\nfrom wmbench.agent.replay import ReplayBuffer\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="world_model.optim .world_model. imports wmbench.agent.replay"):
        test_every_room_imports_only_downward()


def test_run_state_is_saved_whole():
    """Resume cannot forget a field: each field of Run is either in SAVED (checkpointed) or DERIVED
    (rebuilt from the config or the clock), never both, never neither; Progress is saved as a whole."""
    from wmbench.agent.run import Progress, Run
    names = {f.name for f in dataclasses.fields(Run)}
    saved, derived = set(Run.SAVED), set(Run.DERIVED)
    assert not saved & derived
    assert names == saved | derived, f"unclassified: {names - saved - derived}; stale: {(saved | derived) - names}"
    assert "progress" in saved and dataclasses.is_dataclass(Progress)


def test_run_save_writes_every_progress_field(tmp_path):
    """Every Progress field is restored from a checkpoint with the value it was saved with."""
    from wmbench.agent.config import TrainConfig
    from wmbench.agent.run import Progress, Run
    cfg = TrainConfig(game="gridgoal", size="tiny", steps=20, warmup_steps=1000, eval_every=0,
                      run_dir=str(tmp_path / "run"), runs_dir=str(tmp_path / "records"), threads=1)
    run = Run.start(cfg)
    values = {"step": 7, "n_updates": 3, "credit": 0.5, "episodes": [{"step": 5, "return": 1.0, "length": 5}],
              "eval_history": [{"step": 6, "mean": 2.0, "returns": [2.0], "action_counts": [1, 0]}],
              "elapsed_s": 12.5, "update_time_s": 1.25,
              "starts": [{"step": 0, "auto_choices": {"size": "no CUDA device"}, "precision": "fp32", "threads": 1,
                          "compile": False}]}
    assert set(values) == {f.name for f in dataclasses.fields(Progress)}, "a new Progress field needs a value here"
    run.progress = Progress(**values)
    run.save()
    back = Run.start(cfg).progress
    for k, v in values.items():
        if k == "elapsed_s":
            assert back.elapsed_s >= v
        else:
            assert getattr(back, k) == v, k
