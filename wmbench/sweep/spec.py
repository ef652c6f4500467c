"""A sweep spec: blocks of runs, each the cross product of a grid over one command's options.

A spec is a TOML (or, with PyYAML installed, YAML) file, a name of a packaged one (`wmbench list`), or
inline `--grid key=v1,v2 --set key=value` options. TOML form:

    name = "grid-cpu"                          # the sweep's state folder name (default: the file's stem)
    [executor]                                 # defaults for `wmbench sweep` options (the CLI wins)
    name = "local"                             # local | slurm | ray
    workers = 2                                # local: runs at once
    threads = 1                                # torch threads per run (passed as --threads)
    [[runs]]                                   # a block; a spec has one or more
    command = "run"                            # run (benchmark cells) or atari (the agent)
    options = { task = "gridworld", steps = 100 }          # every run of the block
    grid = { backbone = ["mamba2", "gru"], len = [208, 1664], seed = [0, 1] }   # the cross product

Option names are the command's flags without the dashes (`len`, `grid`, `variant`, `game`, `sampler`,
...). `seed` is one seed per run (`--seeds N` for `run`, `--seed N` for `atari`). true gives `--flag`,
false `--no-flag`.

Each run's key is a hash of its command and its options as the spec gives them (block options, grid
values and --set; not the executor, thread count or folders), so the same run gets the same key in
every sweep that contains it. The commands' own defaults are not filled in: `steps = 500` written out
is another key than leaving the default 500, but `wmbench run` still finds that run's record by its
resolved config and skips it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

COMMANDS = ("run", "atari")
EXECUTORS = ("local", "slurm", "ray")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


@dataclass(frozen=True)
class Run:
    """One command line of the sweep."""
    command: str                       # run | atari
    options: tuple                     # ((flag name, value), ...) sorted by name

    @property
    def key(self) -> str:
        blob = json.dumps({"command": self.command, "options": [[k, v] for k, v in self.options]},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """`run backbone=gru len=208 seed=0`: the options that vary are what a reader needs; all are shown."""
        return " ".join([self.command] + [f"{k}={_text(v)}" for k, v in self.options])

    def argv(self) -> list[str]:
        """The arguments after `wmbench`."""
        out = [self.command]
        for k, v in self.options:
            flag = "--" + k.replace("_", "-")
            if k == "seed" and self.command == "run":
                flag = "--seeds"
            if v is True:
                out.append(flag)
            elif v is False:
                out.append("--no-" + k.replace("_", "-"))
            else:
                out += [flag, _text(v)]
        return out

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)


@dataclass
class Spec:
    name: str
    blocks: list[dict]                 # [{"command", "options", "grid"}]
    executor: dict = field(default_factory=dict)
    source: str = "inline"

    def expand(self, extra: dict | None = None) -> list[Run]:
        """Every run of every block, in spec order; `extra` options are added to each (the spec's win)."""
        runs, seen = [], set()
        for block in self.blocks:
            names = list(block["grid"])
            for values in itertools.product(*(block["grid"][n] for n in names)):
                opts = {**(extra or {}), **block["options"], **dict(zip(names, values))}
                run = Run(block["command"], tuple(sorted(opts.items())))
                if run.key not in seen:          # two blocks may overlap; a run is run once
                    seen.add(run.key)
                    runs.append(run)
        return runs


def _text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _scalar(key: str, v, where: str):
    if isinstance(v, (str, int, float, bool)):
        return v
    raise ValueError(f"{where}: option {key!r} must be a string, number or boolean, got {type(v).__name__}")


def _check_key(key, where: str) -> str:
    if not isinstance(key, str) or not re.match(r"^[a-z][a-z0-9_-]*$", key):
        raise ValueError(f"{where}: {key!r} is not an option name (lower case, like `backbone` or `len`)")
    if key in ("runs-dir", "runs_dir", "seeds"):
        hint = "give --runs-dir to `wmbench sweep`" if key != "seeds" else "use `seed` with a list of values"
        raise ValueError(f"{where}: {key!r} is set by the sweep itself; {hint}")
    return key.replace("-", "_")


def _block(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a block must be a table with command, options and grid")
    unknown = set(raw) - {"command", "options", "grid"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: command, options, grid")
    command = raw.get("command", "run")
    if command not in COMMANDS:
        raise ValueError(f"{where}: command {command!r} is not sweepable; valid choices: {', '.join(COMMANDS)}")
    options, grid = raw.get("options", {}) or {}, raw.get("grid", {}) or {}
    if not isinstance(options, dict) or not isinstance(grid, dict):
        raise ValueError(f"{where}: options and grid must be tables (key = value)")
    opts = {_check_key(k, where): _scalar(k, v, where) for k, v in options.items()}
    g = {}
    for k, vs in grid.items():
        name = _check_key(k, where)
        vs = vs if isinstance(vs, list) else [vs]
        if not vs:
            raise ValueError(f"{where}: grid {k!r} has no values")
        if len(set(map(_text, vs))) != len(vs):
            raise ValueError(f"{where}: grid {k!r} repeats a value")
        if name in opts:
            raise ValueError(f"{where}: {k!r} is both an option and a grid axis")
        g[name] = [_scalar(k, v, where) for v in vs]
    return {"command": command, "options": opts, "grid": g}


def spec_from_dict(raw: dict, name: str, source: str) -> Spec:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a sweep spec is a table with [[runs]] blocks")
    unknown = set(raw) - {"name", "runs", "executor", "description"}
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; "
                         "valid: name, description, executor, runs")
    blocks = raw.get("runs")
    if isinstance(blocks, dict):
        blocks = [blocks]
    if not blocks:
        raise ValueError(f"{source}: no [[runs]] block; a sweep needs at least one")
    name = str(raw.get("name", name))
    if not _NAME.match(name):
        raise ValueError(f"{source}: sweep name {name!r} must be letters, digits, '.', '_' or '-'")
    executor = raw.get("executor", {}) or {}
    if not isinstance(executor, dict):
        raise ValueError(f"{source}: [executor] must be a table")
    return Spec(name, [_block(b, f"{source} block {i + 1}") for i, b in enumerate(blocks)], executor, source)


def packaged_specs() -> dict[str, str]:
    """{name: TOML text} of the sweep files shipped in wmbench/data/sweeps."""
    folder = resources.files("wmbench").joinpath("data/sweeps")
    return {p.name[:-5]: p.read_text() for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".toml")}


def load_spec(path_or_name: str) -> Spec:
    """A spec file (.toml, .yaml/.yml) or the name of a packaged one."""
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{p}: YAML specs need PyYAML (pip install pyyaml), or write the spec in TOML") from None
        raw = yaml.safe_load(_read(p))
        return spec_from_dict(raw, p.stem, str(p))
    if p.suffix == ".toml" or p.exists():
        return spec_from_dict(_toml(_read(p), str(p)), p.stem, str(p))
    packaged = packaged_specs()
    if path_or_name in packaged:
        return spec_from_dict(_toml(packaged[path_or_name], path_or_name), path_or_name,
                              f"wmbench/data/sweeps/{path_or_name}.toml")
    raise ValueError(f"no sweep file {path_or_name!r} and no packaged sweep of that name; "
                     f"packaged: {', '.join(packaged)}")


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except FileNotFoundError:
        raise ValueError(f"sweep file {p} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"sweep file {p} is not text") from None


def _toml(text: str, source: str) -> dict:
    try:
        import tomllib
    except ImportError:                    # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: not valid TOML ({e})") from None


def parse_value(text: str):
    """`--grid`/`--set` values: ints, floats and true/false become numbers and booleans."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def inline_spec(command: str, grid: list[str], sets: list[str]) -> Spec:
    """`--grid key=v1,v2` (repeatable) and `--set key=value` as a one-block spec."""
    def split(item: str, flag: str):
        if "=" not in item:
            raise ValueError(f"{flag} {item!r} must look like key=value")
        k, v = item.split("=", 1)
        return k.strip(), v
    g = {}
    for item in grid:
        k, v = split(item, "--grid")
        g[k] = [parse_value(x) for x in v.split(",") if x.strip() != ""]
    opts = dict((k, parse_value(v)) for k, v in (split(i, "--set") for i in sets))
    blob = json.dumps([command, sorted(g.items()), sorted(opts.items())], sort_keys=True)
    name = f"inline-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    return spec_from_dict({"runs": [{"command": command, "options": opts, "grid": g}]}, name, "inline sweep")
