"""Fixed offline Atari datasets for the world-model benchmark (`wmbench run --task atari`).

A dataset is N env steps of one game under an Atari protocol (tasks/atari.py), played by a policy (a
uniformly random one by default, or an agent's checkpoint), stored as transitions in the replay's
layout: (o_t, a_t, r_t, term_t, is_last_t), where r_t and term_t result from taking a_t at o_t and
`term_t` is the learner's termination target (`done_for_learning`). `episode[t]` numbers the episodes.

Cache. Generating one takes a while (ALE steps and resizing), so each is made once per key

    (game, protocol, policy, n_steps, seed, format)

and kept under `<cache>/atari-<Game>-<sha256(key)[:16]>/`, a folder of one .npy per array and a
manifest.json holding the key and every file's size and sha256. The folder is written under a temporary
name and renamed into place in one step, so readers see a whole dataset or none; two processes that
make the same dataset at once each write their own temporary folder, the first rename wins and the
other drops its copy. Loading checks every file against the manifest: a partial folder (no manifest, a
missing file) or a corrupt one (size or hash differs, a key that is not the one asked for) is refused
with one line on stderr, moved aside and made again, never used.

Split. Whole episodes are held out for validation: every `VAL_EVERY`-th episode (the 5th, 10th, ...),
at least one, so train and validation windows never share an episode.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
ARRAYS = ("obs", "action", "reward", "termination", "is_last", "episode")
VAL_EVERY = 5          # every 5th episode is validation (20%)
RANDOM_POLICY = "random"


def default_cache_dir() -> Path:
    """$WMBENCH_DATA if set, else ~/.cache/wmbench/datasets."""
    env = os.environ.get("WMBENCH_DATA")
    return Path(env) if env else Path.home() / ".cache" / "wmbench" / "datasets"


@dataclass(frozen=True)
class DatasetKey:
    game: str
    protocol: str = "drama"
    policy: str = RANDOM_POLICY     # "random", or "checkpoint:<sha256 of the agent's weights>"
    n_steps: int = 20_000
    seed: int = 0

    def as_dict(self) -> dict:
        return {"game": self.game, "protocol": self.protocol, "policy": self.policy,
                "n_steps": int(self.n_steps), "seed": int(self.seed), "format": FORMAT}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def folder_name(self) -> str:
        return f"atari-{self.game}-{self.digest()[:16]}"


class DatasetError(ValueError):
    """A dataset that cannot be used (the message is one line)."""


@dataclass
class AtariDataset:
    key: DatasetKey
    path: Path
    obs: np.ndarray            # (N, 64, 64, 3) uint8
    action: np.ndarray         # (N,) int64
    reward: np.ndarray         # (N,) float32
    termination: np.ndarray    # (N,) bool
    is_last: np.ndarray        # (N,) bool
    episode: np.ndarray        # (N,) int32
    manifest: dict

    def __len__(self) -> int:
        return len(self.action)

    def episodes(self) -> list[tuple[int, int]]:
        """[(start, end)) transition ranges of each episode, in order."""
        cut = np.flatnonzero(np.diff(self.episode)) + 1
        starts = np.concatenate([[0], cut])
        ends = np.concatenate([cut, [len(self)]])
        return list(zip(starts.tolist(), ends.tolist()))

    def split(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(train episodes, validation episodes): every VAL_EVERY-th episode is held out (at least one;
        with a single episode there is no split and this raises)."""
        eps = self.episodes()
        if len(eps) < 2:
            raise DatasetError(f"dataset {self.path.name} holds {len(eps)} episode; a train/validation split "
                               f"needs at least 2 (generate more steps)")
        val = [e for i, e in enumerate(eps) if i % VAL_EVERY == VAL_EVERY - 1] or [eps[-1]]
        train = [e for e in eps if e not in val]
        return train, val


def window_starts(episodes: list[tuple[int, int]], length: int) -> np.ndarray:
    """Every start index of a window of `length` transitions inside one episode."""
    starts = [np.arange(s, e - length + 1) for s, e in episodes if e - s >= length]
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# generation

def generate(key: DatasetKey, policy=None, progress: bool = True) -> dict[str, np.ndarray]:
    """Play `key.n_steps` env steps. `policy(obs, rng) -> action` (None: uniformly random) is reset with
    `policy.reset(obs)` at each episode start and told each step with `policy.observe(action, next_obs)`
    when it has those methods (an agent acting from its context of recent frames)."""
    from wmbench.tasks.atari import make_env
    env = make_env(key.game, protocol=key.protocol, seed=key.seed)
    rng = np.random.default_rng(key.seed)
    n = int(key.n_steps)
    out = {"obs": np.empty((n, *env.observation_space.shape), np.uint8), "action": np.empty(n, np.int64),
           "reward": np.empty(n, np.float32), "termination": np.empty(n, bool), "is_last": np.empty(n, bool),
           "episode": np.empty(n, np.int32)}
    obs, _ = env.reset(seed=key.seed)
    if hasattr(policy, "reset"):
        policy.reset(obs)
    ep, t0 = 0, time.monotonic()
    for t in range(n):
        a = int(rng.integers(env.action_space.n)) if policy is None else int(policy(obs, rng))
        next_obs, r, term, trunc, info = env.step(a)
        out["obs"][t], out["action"][t], out["reward"][t] = obs, a, r
        out["termination"][t], out["is_last"][t] = info["done_for_learning"], term or trunc
        out["episode"][t] = ep
        if term or trunc:
            ep += 1
            obs, _ = env.reset()
            if hasattr(policy, "reset"):
                policy.reset(obs)
        else:
            if hasattr(policy, "observe"):
                policy.observe(a, next_obs)
            obs = next_obs
        if progress and (t + 1) % 5000 == 0:
            print(f"dataset {key.game}: {t + 1:,}/{n:,} env steps ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    env.close()
    return out


def _sha256(path: Path) -> str:
    from wmbench.core.paths import sha256_file
    return sha256_file(path)


def write_dataset(cache: Path, key: DatasetKey, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` as the dataset of `key` under `cache`, atomically (temp folder + rename)."""
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / key.folder_name()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache))
    try:
        files = {}
        for name in ARRAYS:
            p = tmp / f"{name}.npy"
            with open(p, "wb") as f:
                np.save(f, arrays[name], allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            files[f"{name}.npy"] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        ep = arrays["episode"]
        manifest = {"key": key.as_dict(), "files": files, "n_steps": int(len(arrays["action"])),
                    "n_episodes": int(ep[-1] + 1) if len(ep) else 0,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, final)               # atomic; fails if another process got there first
        except OSError:
            if not (final / "manifest.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)   # theirs is the same dataset: keep it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(path: Path, key: DatasetKey) -> dict:
    """The manifest of the dataset folder `path` after checking every file; DatasetError (one line) if the
    folder is partial or corrupt."""
    from wmbench.core.readback import read_json_object
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise DatasetError(f"dataset {path} is partial (no manifest.json)")
    try:
        manifest = read_json_object(mpath, "manifest")
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"dataset {path} is corrupt: unreadable manifest.json ({type(e).__name__})") from None
    if manifest.get("key") != key.as_dict():
        raise DatasetError(f"dataset {path} is corrupt: its manifest's key is not {key.as_dict()}")
    for name in ARRAYS:
        entry, p = files.get(f"{name}.npy"), path / f"{name}.npy"
        if not isinstance(entry, dict) or not p.is_file():
            raise DatasetError(f"dataset {path} is partial: {name}.npy is missing")
        if p.stat().st_size != entry.get("bytes") or _sha256(p) != entry.get("sha256"):
            raise DatasetError(f"dataset {path} is corrupt: {name}.npy does not match its manifest (size or sha256)")
    return manifest


def load_verified(path: Path, key: DatasetKey) -> AtariDataset:
    manifest = verify(path, key)
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r" if name == "obs" else None,
                                   allow_pickle=False)
        except ValueError as e:
            raise DatasetError(f"dataset {path} is corrupt: {name}.npy ({e})") from None
    n = {len(a) for a in arrays.values()}
    if n != {manifest.get("n_steps")}:
        raise DatasetError(f"dataset {path} is corrupt: arrays of lengths {sorted(n)}, manifest says "
                           f"{manifest.get('n_steps')}")
    return AtariDataset(key=key, path=path, manifest=manifest, **arrays)


def get_dataset(key: DatasetKey, cache: Path | None = None, policy=None, progress: bool = True) -> AtariDataset:
    """The cached dataset of `key`, generated (and cached) if absent; a partial or corrupt copy is
    refused in one line on stderr, moved aside and generated again."""
    cache = Path(cache) if cache is not None else default_cache_dir()
    path = cache / key.folder_name()
    if path.exists():
        try:
            return load_verified(path, key)
        except DatasetError as e:
            print(f"warning: {e}; generating it again", file=sys.stderr)
            aside = path.with_name(f".{path.name}.bad-{os.getpid()}-{time.time_ns()}")
            try:
                os.rename(path, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass              # another process already moved it
    if progress:
        print(f"dataset {key.game}: generating {key.n_steps:,} env steps ({key.policy} policy, seed {key.seed}) "
              f"into {path}", file=sys.stderr, flush=True)
    write_dataset(cache, key, generate(key, policy=policy, progress=progress))
    return load_verified(path, key)
