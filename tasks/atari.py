"""Atari100k environment: one ALE game behind a gymnasium-style API, 64x64x3 uint8 frames.

    env = make_env("Krull")                 # protocol "drama" (the official Drama code's settings)
    obs, info = env.reset()                 # obs (64, 64, 3) uint8
    obs, reward, terminated, truncated, info = env.step(action)

One agent step = `frame_skip` emulator frames with the same action; the observation is the
pixel-wise max of the last two of those frames (removes Atari sprite flicker), resized to 64x64
RGB. Rewards are summed over the repeats and never clipped (symlog / two-hot is the learner's job).

Episode bookkeeping, kept apart on purpose:
- `terminated`: the real game over. `truncated`: the frame cap (108k frames = 27k agent steps).
- `info["life_lost"]`: a life was lost during this step. The game goes on.
- `info["done_for_learning"]`: the termination target the learner stores in replay:
  `terminated or (life_lost and protocol.life_loss == "terminal")`.
- `info["episode_return"]`: running sum of every reward of the episode, *including* this step's,
  so on the final step it is the full-game score (STORM#16 dropped the last reward; we do not).

Protocol presets (`PROTOCOLS`) fix every knob that differs between published codebases; each run
record should store `protocol_dict(p)` and `ale_version()`. Game names are the 26 Atari100k
games, case-insensitive; ALE ids (`ALE/Krull-v5`, `KrullNoFrameskip-v4`) and snake case
(`kung_fu_master`) work too. `make_env("gridgoal")` returns the pixel grid world of
`wmbench.tasks.gridgoal`, so the agent's command has one code path for both. (Neither is put in
the task registry: `wmbench.get_task(name)()` builds a sequence-modelling task for `wmbench run`,
a different interface; `list_games()` is what `wmbench list` shows.)
"""
from __future__ import annotations

import csv
import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np


# ----------------------------------------------------------------------------------------------
# games

# The 26-game Atari100k subset (Kaiser et al. 2020), spelled as in ALE's `ALE/<Name>-v5` ids.
GAMES: tuple[str, ...] = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
    "RoadRunner", "Seaquest", "UpNDown",
)
_BY_KEY = {g.lower(): g for g in GAMES}
GRIDGOAL = "gridgoal"  # the pixel grid world (tasks/gridgoal.py), accepted by make_env
# the info dict of every reset/step, for Atari games and gridgoal alike
INFO_KEYS = ("lives", "life_lost", "done_for_learning", "episode_frame", "episode_step",
             "episode_return")


def list_games() -> list[str]:
    """The 26 Atari100k games, then 'gridgoal'."""
    return list(GAMES) + [GRIDGOAL]


def _key(name: str) -> str:
    """'ALE/Krull-v5', 'KrullNoFrameskip-v4', 'atari100k_kung_fu_master', 'KRULL' -> 'krull'."""
    s = str(name).strip().lower()
    s = re.sub(r"^(ale/|atari100k_|atari_)", "", s)
    s = re.sub(r"-v\d+$", "", s)
    s = re.sub(r"(noframeskip|deterministic)$", "", s)
    return re.sub(r"[\s_\-]", "", s)


def canonical_game(name: str) -> str:
    """Canonical spelling of an Atari100k game name (or 'gridgoal'); ValueError lists the 26."""
    k = _key(name)
    if k == GRIDGOAL:
        return GRIDGOAL
    if k not in _BY_KEY:
        raise ValueError(f"unknown game {name!r}; valid choices (case-insensitive): "
                         f"{', '.join(GAMES)}, or {GRIDGOAL}")
    return _BY_KEY[k]


# ----------------------------------------------------------------------------------------------
# protocols

@dataclass(frozen=True)
class AtariProtocol:
    """Every environment setting that varies between world-model codebases on Atari100k."""
    name: str
    sticky_prob: float          # ALE repeat_action_probability, applied by the emulator per frame
    full_action_space: bool     # 18 actions (True) or the game's minimal set (False)
    noop_min: int               # reset: take U{noop_min..noop_max} NOOP frames (0/0 = none)
    noop_max: int
    life_loss: str              # "terminal": life loss sets done_for_learning; "ignore": it does not
    break_on_life_loss: bool    # stop the frame-skip loop at the frame a life is lost
    max_frames: int = 108_000   # episode cap in emulator frames (truncation), noop frames included
    frame_skip: int = 4
    max_pool: bool = True       # max over the last two frames of each agent step
    size: int = 64              # square RGB observation, cv2 INTER_AREA resize of the 210x160 screen
    source: str = ""

    def __post_init__(self):
        if self.life_loss not in ("terminal", "ignore"):
            raise ValueError(f"life_loss must be 'terminal' or 'ignore', got {self.life_loss!r}")
        if not 0.0 <= self.sticky_prob <= 1.0:
            raise ValueError(f"sticky_prob must be in [0, 1], got {self.sticky_prob}")
        if not 0 <= self.noop_min <= self.noop_max:
            raise ValueError(f"need 0 <= noop_min <= noop_max, got {self.noop_min}, {self.noop_max}")
        if self.frame_skip < 1 or self.max_frames < 1 or self.size < 1:
            raise ValueError("frame_skip, max_frames and size must be positive")


PROTOCOLS: dict[str, AtariProtocol] = {
    # Official Drama code, release 65b2aac, envs/my_atari.py (a DreamerV3-style wrapper), as used by
    # train.py: gym.make(ALE/<Game>-v5, frameskip=1, repeat_action_probability=0.0,
    # full_action_space=False), action repeat 4, max of frames 3 and 4, INTER_AREA to 64x64 RGB,
    # noops=0, lives="discount" (life loss -> is_terminal, early break of the repeat loop, the
    # episode continues), length=108000 frames, no reward clipping.
    # [drama-official-code.md s3]. (Its Nov-2024 pre-release did not break early on life loss.)
    "drama": AtariProtocol(
        name="drama", sticky_prob=0.0, full_action_space=False, noop_min=0, noop_max=0,
        life_loss="terminal", break_on_life_loss=True,
        source="realwenlongwang/drama@65b2aac envs/my_atari.py (drama-official-code.md s3)"),
    # DreamerV3 atari100k config {repeat: 4, sticky: False, noops: 30, actions: needed,
    # lives: unused, length: 108000}; noops drawn as rng.integers(noops + 1), i.e. 0..30. The 2023
    # code resized with cv2 INTER_AREA, the current one with pillow. [atari100k-and-reporting.md s1.2]
    "dreamerv3": AtariProtocol(
        name="dreamerv3", sticky_prob=0.0, full_action_space=False, noop_min=0, noop_max=30,
        life_loss="ignore", break_on_life_loss=False,
        source="danijar/dreamerv3 configs.yaml atari100k + embodied/envs/atari.py "
               "(atari100k-and-reporting.md s1.2)"),
    # STORM: gymnasium ALE/<Game>-v5 with frameskip=1, so the v5 default sticky 0.25 is kept;
    # minimal actions, own max-last-2 wrapper, ResizeObservation(64) (cv2 INTER_AREA), life loss
    # stored as the termination flag without resetting, 108k-frame v5 cap, no noops.
    # [atari100k-and-reporting.md s1.2, drama-official-code.md s16]
    "storm": AtariProtocol(
        name="storm", sticky_prob=0.25, full_action_space=False, noop_min=0, noop_max=0,
        life_loss="terminal", break_on_life_loss=False,
        source="weipu-zhang/STORM train.py + env_wrapper.py (atari100k-and-reporting.md s1.2)"),
    # IRIS training env (config/env/default.yaml train:, src/envs/wrappers.py): <Game>NoFrameskip-v4
    # (sticky 0, minimal actions), NoopResetEnv 1..30, MaxAndSkipEnv(4) (max of the last two),
    # EpisodicLifeEnv (life loss = done for the learner; here the flag, the game continues), and a
    # TimeLimit of 20000 *frames* on the raw env. IRIS's test env differs: noop_max 1, no life
    # loss, 108000 frames; IRIS resizes with PIL bilinear before pooling, we use INTER_AREA after.
    "iris": AtariProtocol(
        name="iris", sticky_prob=0.0, full_action_space=False, noop_min=1, noop_max=30,
        life_loss="terminal", break_on_life_loss=False, max_frames=20_000,
        source="eloialonso/iris config/env/default.yaml (train) + src/envs/wrappers.py"),
}
DEFAULT_PROTOCOL = "drama"


def get_protocol(protocol: str | AtariProtocol = DEFAULT_PROTOCOL, **overrides) -> AtariProtocol:
    """A preset by name (case-insensitive) or an AtariProtocol, with optional field overrides."""
    if isinstance(protocol, AtariProtocol):
        p = protocol
    else:
        key = str(protocol).lower()
        if key not in PROTOCOLS:
            raise ValueError(f"unknown Atari protocol {protocol!r}; valid choices: "
                             f"{', '.join(PROTOCOLS)}")
        p = PROTOCOLS[key]
    return dataclasses.replace(p, **overrides) if overrides else p


def protocol_dict(protocol: str | AtariProtocol = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """The protocol as a plain dict for run records (with the ale-py version)."""
    d = dataclasses.asdict(get_protocol(protocol))
    d["ale_py_version"] = ale_version()
    return d


def ale_version() -> str:
    import ale_py
    return ale_py.__version__


# ----------------------------------------------------------------------------------------------
# human-normalised scores

@lru_cache(maxsize=1)
def reference_scores() -> dict[str, tuple[float, float]]:
    """{game: (random, human)} from wmbench/data/atari100k_scores.csv (unrounded table)."""
    text = resources.files("wmbench").joinpath("data/atari100k_scores.csv").read_text()
    return {row["game"]: (float(row["random"]), float(row["human"]))
            for row in csv.DictReader(text.splitlines())}


def human_normalized(game: str, score: float) -> float:
    """(score - random) / (human - random) for one of the 26 games."""
    g = canonical_game(game)
    if g == GRIDGOAL:
        raise ValueError("human_normalized is defined for the 26 Atari games, not gridgoal")
    random, human = reference_scores()[g]
    return (float(score) - random) / (human - random)


# ----------------------------------------------------------------------------------------------
# emulator: the small interface the wrapper needs (tests substitute a fake)

class ALEEmulator:
    """Raw single-frame access to one ALE game, built through gymnasium's `ALE/<Game>-v5` entry
    with frameskip=1 (pooling, skipping and the frame cap are done by `AtariEnv`)."""

    screen_shape = (210, 160, 3)

    def __init__(self, game: str, protocol: AtariProtocol):
        import ale_py
        import gymnasium as gym
        gym.register_envs(ale_py)
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner per construction
        self._env = gym.make(f"ALE/{game}-v5", obs_type="rgb", frameskip=1,
                             repeat_action_probability=protocol.sticky_prob,
                             full_action_space=protocol.full_action_space,
                             max_num_frames_per_episode=protocol.max_frames,
                             disable_env_checker=True).unwrapped
        self.ale = self._env.ale
        self._actions = list(self._env._action_set)  # index -> ale_py.Action (minimal or full)
        self.action_meanings = list(self._env.get_action_meanings())

    @property
    def num_actions(self) -> int:
        return len(self._actions)

    def reset(self, seed: int | None) -> None:
        self._env.reset(seed=seed)  # seeds + reloads the ROM only when seed is given

    def act(self, a: int) -> float:
        return float(self.ale.act(self._actions[a], 1.0))  # explicit strength (ale-py 0.10.0 bug)

    def screen(self, out: np.ndarray) -> None:
        self.ale.getScreenRGB(out)

    def lives(self) -> int:
        return int(self.ale.lives())

    def game_over(self) -> bool:
        return bool(self.ale.game_over(with_truncation=False))

    def close(self) -> None:
        self._env.close()


# ----------------------------------------------------------------------------------------------
# the wrapper

class AtariEnv:
    """Frame skip + max-pool + resize + life-loss flags + frame cap around an emulator."""

    def __init__(self, emulator, protocol: AtariProtocol, seed: int = 0, game: str = ""):
        import gymnasium as gym
        import cv2
        self._cv2 = cv2
        self.emu = emulator
        self.protocol = protocol
        self.game = game
        self.seed = int(seed)
        self.num_actions = int(emulator.num_actions)
        self.action_space = gym.spaces.Discrete(self.num_actions, seed=self.seed)
        s = protocol.size
        self.observation_space = gym.spaces.Box(0, 255, (s, s, 3), np.uint8)
        self._buf = np.zeros((2,) + tuple(emulator.screen_shape), np.uint8)  # last two raw frames
        self._noop_rng = np.random.default_rng(self.seed)
        self._seeded = False
        self._needs_reset = True

    # -- helpers
    def _obs(self, frame: np.ndarray) -> np.ndarray:
        s = self.protocol.size
        if frame.shape[:2] == (s, s):
            return frame.copy()
        return self._cv2.resize(frame, (s, s), interpolation=self._cv2.INTER_AREA)  # (s, s, 3)

    def _info(self, life_lost: bool, done_for_learning: bool) -> dict[str, Any]:
        return {"lives": self._lives, "life_lost": life_lost,
                "done_for_learning": done_for_learning, "episode_frame": self._frames,
                "episode_step": self._steps, "episode_return": self._return}

    # -- gymnasium API
    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.seed = int(seed)
            self._noop_rng = np.random.default_rng(self.seed)
            self.action_space.seed(self.seed)
            self._seeded = False
        # seed the emulator once; later resets continue its RNG stream (reproducible per seed)
        self.emu.reset(None if self._seeded else self.seed)
        self._seeded = True
        self._frames = self._steps = 0
        self._return = 0.0
        p = self.protocol
        for _ in range(int(self._noop_rng.integers(p.noop_min, p.noop_max + 1))):
            self.emu.act(0)  # index 0 is NOOP in both the minimal and the full action set
            self._frames += 1
            if self.emu.game_over():
                self.emu.reset(None)
                self._frames = 0
        self._lives = self.emu.lives()
        self.emu.screen(self._buf[1])
        self._needs_reset = False
        return self._obs(self._buf[1]), self._info(False, False)

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (the episode has ended)")
        a = int(action)
        if not 0 <= a < self.num_actions:
            raise ValueError(f"action must be in [0, {self.num_actions}), got {action!r}")
        p = self.protocol
        reward, life_lost, pooled = 0.0, False, False
        terminated = truncated = False
        for i in range(p.frame_skip):
            reward += self.emu.act(a)
            self._frames += 1
            lives = self.emu.lives()
            if lives < self._lives:
                life_lost = True
            self._lives = lives
            terminated = self.emu.game_over()
            truncated = not terminated and self._frames >= p.max_frames
            if i == p.frame_skip - 2:
                self.emu.screen(self._buf[0])  # second-to-last frame of the repeat
                pooled = True
            if terminated or truncated or (life_lost and p.break_on_life_loss):
                break
        self.emu.screen(self._buf[1])  # the last frame actually emulated
        # after an early break before the second-to-last frame there is no pair: use the last frame
        frame = np.maximum(self._buf[0], self._buf[1]) if (p.max_pool and pooled) else self._buf[1]
        self._steps += 1
        self._return += reward  # the final step's reward counts too
        done_for_learning = terminated or (life_lost and p.life_loss == "terminal")
        self._needs_reset = terminated or truncated
        return (self._obs(frame), reward, terminated, truncated,
                self._info(life_lost, done_for_learning))

    def sample_action(self) -> int:
        return int(self.action_space.sample())

    @property
    def action_meanings(self) -> list[str]:
        return list(getattr(self.emu, "action_meanings", []))

    def close(self) -> None:
        if hasattr(self.emu, "close"):
            self.emu.close()


def make_env(game: str, protocol: str | AtariProtocol = DEFAULT_PROTOCOL, seed: int = 0,
             **protocol_overrides):
    """Build one environment: an Atari100k game under `protocol`, or 'gridgoal'.

    `protocol_overrides` replace single fields of the preset (e.g. `sticky_prob=0.25`); for
    gridgoal they are passed to `GridGoalEnv` instead (e.g. `episode_length=100`).
    """
    g = canonical_game(game)
    if g == GRIDGOAL:
        from wmbench.tasks.gridgoal import GridGoalEnv
        return GridGoalEnv(seed=seed, **protocol_overrides)
    p = get_protocol(protocol, **protocol_overrides)
    return AtariEnv(ALEEmulator(g, p), p, seed=seed, game=g)

