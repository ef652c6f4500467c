"""Checkpoints that are written atomically and loaded without executing pickled code.

Layout under a run directory:

    RUN/checkpoints/step_000012345/state.pt       torch tensors + plain containers (models, optimisers,
                                                  schedulers, torch RNG); read with weights_only=True
    RUN/checkpoints/step_000012345/arrays.npz     numpy arrays (replay buffer, acting context); read with
                                                  allow_pickle=False
    RUN/checkpoints/step_000012345/meta.json      everything else (counters, episode log, RNG states of
                                                  python / numpy, environment state)
    RUN/checkpoints/step_000012345/manifest.json  size + sha256 of the three files above
    RUN/checkpoints/latest                        the name of the newest complete checkpoint

Atomicity: a checkpoint is written into a hidden temporary folder, fsynced, renamed to its final
name, and only then is `latest` replaced (temp file + rename). A crash at any point leaves the
previous checkpoint and `latest` as they were; so does a failed write (disk full), which also removes
what it had written. Older checkpoints beyond `keep` are removed after `latest` moved on.

Loading checks the manifest (sizes and sha256) before parsing anything, so a truncated or bit-flipped
checkpoint is refused with one line (`CheckpointError`, a `UserError`) and nothing is overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmbench.core.errors import UserError
from wmbench.core.paths import remove_orphans, tmp_prefix
from wmbench.core.readback import loads
from wmbench.core.records import atomic_write_text

CKPT_DIR = "checkpoints"
LATEST = "latest"
FILES = ("state.pt", "arrays.npz", "meta.json")
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted (missing, truncated, corrupt, foreign)."""


class CheckpointNotSaved(OSError):
    """A checkpoint that could not be written (disk full): the message names it and the one kept."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]          # torch objects (from state.pt)
    arrays: dict[str, np.ndarray]  # numpy arrays (from arrays.npz)
    meta: dict[str, Any]           # JSON metadata

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _sha256(path: Path) -> str:
    from wmbench.core.paths import sha256_file
    return sha256_file(path)


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ckpt_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CKPT_DIR


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint at env step `step`."""
    return ckpt_root(run_dir) / f"step_{int(step):09d}"


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, arrays: dict[str, np.ndarray],
                    meta: dict, keep: int = 2) -> Path:
    """Write one checkpoint atomically and point `latest` at it; returns its folder."""
    root, final = ckpt_root(run_dir), step_dir(run_dir, step)
    name = final.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=tmp_prefix(final), suffix=".tmp"))
    os.chmod(tmp, 0o755)   # mkdtemp makes 0700; the files inside are 0644 like every record
    try:
        _fsync_write(tmp / "state.pt", lambda f: torch.save(state, f))
        for k, a in arrays.items():
            a = np.asarray(a)
            if a.dtype == object:
                raise TypeError(f"array {k!r} has dtype object; checkpoints hold plain arrays only")
        _fsync_write(tmp / "arrays.npz", lambda f: np.savez(f, **arrays))
        meta = {"format_version": FORMAT_VERSION, **meta, "step": int(step)}
        _fsync_write(tmp / "meta.json", lambda f: f.write(json.dumps(meta).encode()))
        manifest = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES}
        _fsync_write(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        _fsync_dir(tmp)
        if final.exists():  # a stale folder of the same step that `latest` does not point to
            if _read_latest(root) == name:
                shutil.rmtree(tmp)
                return final  # same step already saved (e.g. periodic save, then stop): identical state
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        atomic_write_text(root / LATEST, name + "\n")
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)   # nothing points to it: the previous one stays the newest
        raise
    # prune: keep the newest `keep` complete checkpoints (never the one `latest` names)
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in done[:-max(int(keep), 1)]:
        if p.name != name:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _read_latest(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def peek_meta(run_dir: str | os.PathLike) -> dict | None:
    """The newest checkpoint's meta.json (config, step), checked against its manifest, without reading or
    verifying the (large) arrays."""
    root = ckpt_root(run_dir)
    name = _read_latest(root)
    if name is None or not re.fullmatch(r"step_\d{9}", name):
        return None
    path = root / name
    try:
        entry = loads((path / "manifest.json").read_bytes())["meta.json"]
        data = (path / "meta.json").read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError("meta.json does not match its manifest")
        return _meta_object(loads(data))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from None


def _meta_object(meta: Any) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f"meta.json holds a JSON {type(meta).__name__}, not an object")
    return meta


def load_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint of `run_dir`, or None if it has none. CheckpointError if it is unusable."""
    root = ckpt_root(run_dir)
    remove_orphans(root)          # checkpoint writes cut by kill -9
    remove_orphans(Path(run_dir))
    name = _read_latest(root)
    if name is not None and not re.fullmatch(r"step_\d{9}", name):
        raise CheckpointError(f"checkpoint pointer {root / LATEST} names {name!r}, not a step folder of this "
                              f"run dir (step_NNNNNNNNN); refusing to load it")
    if name is None:
        if (root / LATEST).exists():
            raise CheckpointError(f"checkpoint pointer {root / LATEST} is empty (corrupt run dir)")
        return None
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} named by {root / LATEST} is missing")
    try:
        manifest = loads((path / "manifest.json").read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable manifest.json ({e})") from None
    for f in FILES:
        entry = manifest.get(f) if isinstance(manifest, dict) else None
        p = path / f
        if not isinstance(entry, dict) or not p.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {f} is missing")
        if p.stat().st_size != entry.get("bytes") or _sha256(p) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupt: {f} does not match its manifest "
                                  f"(size or sha256); delete the run dir or restore the file")
    try:
        meta = _meta_object(loads((path / "meta.json").read_bytes()))
        # weights_only: tensors and plain containers only, no code runs while loading
        state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
        with np.load(path / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt checkpoint
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt: {msg}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {meta.get('format_version')!r}; "
                              f"this wmbench reads {FORMAT_VERSION}")
    return Checkpoint(path=path, state=state, arrays=arrays, meta=meta)


# ----------------------------------------------------------------------------------------------
# config diffing

def _norm(v: Any) -> Any:
    """JSON round trip so tuples == lists and keys are strings, as after saving."""
    return json.loads(json.dumps(v, default=str))


def config_diff(saved: dict, current: dict, ignore: tuple | set | frozenset = ()) -> list[str]:
    """['field: saved -> current', ...] for every top-level field that differs (except `ignore`)."""
    saved, current = _norm(saved), _norm(current)
    out = []
    for k in sorted(set(saved) | set(current)):
        if k in ignore:
            continue
        a, b = saved.get(k, "<unset>"), current.get(k, "<unset>")
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------------------------
# RNG states as JSON (python `random`, numpy's legacy global RNG, numpy Generators)

def python_rng_state() -> list:
    import random
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(s: list) -> None:
    import random
    random.setstate((s[0], tuple(s[1]), s[2]))


def numpy_global_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_numpy_global_rng_state(s: list) -> None:
    np.random.set_state((s[0], np.asarray(s[1], np.uint32), s[2], s[3], s[4]))


def generator_state(g: np.random.Generator) -> dict:
    """bit_generator.state: plain dicts and (big) ints, JSON-safe."""
    return g.bit_generator.state


def generator_from_state(s: dict) -> np.random.Generator:
    bg = getattr(np.random, s["bit_generator"])()
    bg.state = s
    return np.random.Generator(bg)


def restore_models(run_dir: str | os.PathLike, flag: str):
    """(TrainConfig, WorldModel, ActorCritic, Checkpoint) from a run dir's newest checkpoint, in eval mode,
    for tools that use a trained agent (`run --task atari --policy`, `imagine --run-dir`). Anything
    unusable is a one-line ValueError naming `flag`."""
    import dataclasses

    from wmbench.agent.actor_critic import ActorCritic
    from wmbench.agent.config import TrainConfig, model_config
    from wmbench.tasks.atari import make_env
    from wmbench.world_model import WorldModel
    if not Path(run_dir).is_dir():
        raise ValueError(f"{flag} {run_dir}: no such run dir")
    try:
        state = load_checkpoint(run_dir)
    except CheckpointError as e:
        raise ValueError(f"{flag} {run_dir}: {e}") from None
    if state is None:
        raise ValueError(f"{flag} {run_dir} holds no checkpoint (train an agent there first: wmbench atari)")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in state.meta.get("config", {}).items() if k in names})
    env = make_env(cfg.game, protocol=cfg.protocol)
    n_actions = int(env.action_space.n)
    env.close()
    mcfg = model_config(cfg)
    wm, agent = WorldModel(mcfg, n_actions), ActorCritic(mcfg, n_actions)
    try:
        wm.load_training_state(state.state["wm"])
        agent.load_training_state(state.state["agent"])
    except (KeyError, RuntimeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{flag} {run_dir}: its checkpoint does not fit its config ({msg})") from None
    wm.eval(), agent.eval()
    return cfg, wm, agent, state

