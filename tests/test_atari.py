"""The Atari wrapper: pooling, life loss, returns, frame cap, names, presets, scores.

Most checks drive `AtariEnv` with a scripted fake emulator (64x64 screens, so no resize) whose
frames, rewards and lives are known exactly; a few build real ALE games.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from wmbench.tasks.atari import (GAMES, INFO_KEYS, PROTOCOLS, AtariEnv, ALEEmulator, canonical_game,
                                 get_protocol, human_normalized, list_games, make_env, protocol_dict)


class FakeEmulator:
    """Frame f (1-based, counted since reset) shows a bright 4x4 block at a position unique to f,
    so the max of two frames differs from either. Rewards, lives and game over are scripted."""

    screen_shape = (64, 64, 3)
    action_meanings = ["NOOP", "FIRE", "UP"]

    def __init__(self, rewards=None, life_loss_frames=(), game_over_frame=10**9, lives=3):
        self.rewards = rewards or {}
        self.life_loss_frames = set(life_loss_frames)
        self.game_over_frame = game_over_frame
        self.start_lives = lives
        self.num_actions = 3
        self.actions = []
        self.resets = []

    def reset(self, seed):
        self.resets.append(seed)
        self.frame, self._lives = 0, self.start_lives

    def act(self, a):
        self.frame += 1
        self.actions.append(a)
        if self.frame in self.life_loss_frames:
            self._lives -= 1
        return float(self.rewards.get(self.frame, 0.0))

    @staticmethod
    def frame_image(f):
        img = np.full((64, 64, 3), 10, np.uint8)
        r, c = (4 * f) % 60, (8 * f) % 60
        img[r:r + 4, c:c + 4] = (50 + f) % 256
        return img

    def screen(self, out):
        out[:] = self.frame_image(self.frame)

    def lives(self):
        return self._lives

    def game_over(self):
        return self.frame >= self.game_over_frame


def fake_env(protocol="drama", seed=0, **emu_kwargs):
    p = get_protocol(protocol) if isinstance(protocol, str) else protocol
    emu = FakeEmulator(**emu_kwargs)
    return AtariEnv(emu, p, seed=seed, game="Fake"), emu


def run_episode(env, action=1):
    env.reset()
    rewards, infos = [], []
    while True:
        obs, r, term, trunc, info = env.step(action)
        rewards.append(r)
        infos.append(info)
        if term or trunc:
            return rewards, infos, term, trunc


# ---------------------------------------------------------------- pooling and frames

def test_max_pool_of_last_two_frames():
    env, emu = fake_env()
    obs0, info = env.reset()
    assert np.array_equal(obs0, FakeEmulator.frame_image(0)) and tuple(info) == INFO_KEYS
    obs, _, _, _, info = env.step(1)  # frames 1..4
    assert tuple(info) == INFO_KEYS
    want = np.maximum(FakeEmulator.frame_image(3), FakeEmulator.frame_image(4))
    assert np.array_equal(obs, want)
    assert not np.array_equal(obs, FakeEmulator.frame_image(4))  # the pooling did something
    obs, *_ = env.step(2)  # frames 5..8
    assert np.array_equal(obs, np.maximum(FakeEmulator.frame_image(7), FakeEmulator.frame_image(8)))
    assert emu.actions == [1] * 4 + [2] * 4


def test_no_pooling_option_returns_last_frame():
    env, _ = fake_env(get_protocol("drama", max_pool=False))
    env.reset()
    obs, *_ = env.step(0)
    assert np.array_equal(obs, FakeEmulator.frame_image(4))


def test_max_pool_on_real_ale_matches_manual_emulation():
    """The wrapper's obs equals resize(max(frame 3, frame 4)) from a second, identically seeded ALE."""
    p = get_protocol("drama")
    env = make_env("Breakout", seed=3)
    ref = ALEEmulator("Breakout", p)
    env.reset()
    ref.reset(3)
    a = env.action_meanings.index("FIRE")
    for _ in range(6):
        frames = []
        for _ in range(4):
            ref.act(a)
            buf = np.empty((210, 160, 3), np.uint8)
            ref.screen(buf)
            frames.append(buf)
        want = cv2.resize(np.maximum(frames[2], frames[3]), (64, 64), interpolation=cv2.INTER_AREA)
        obs, *_ = env.step(a)
        assert np.array_equal(obs, want)
    env.close()
    ref.close()


def test_real_game_obs_is_64x64x3_uint8_and_steps():
    env = make_env("krull", seed=0)
    obs, info = env.reset()
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    for _ in range(5):
        obs, r, term, trunc, info = env.step(env.sample_action())
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert isinstance(r, float)
    assert {"lives", "life_lost", "done_for_learning", "episode_return"} <= set(info)
    assert obs.std() > 0  # a real picture, not a blank
    env.close()


def test_minimal_and_full_action_sets():
    assert make_env("Pong").num_actions == 6
    assert make_env("Pong", protocol=get_protocol("drama", full_action_space=True)).num_actions == 18


# ---------------------------------------------------------------- life loss, returns, caps

def test_life_loss_flag_without_game_over():
    env, _ = fake_env(life_loss_frames=[6])
    env.reset()
    _, _, term, _, info = env.step(1)
    assert not info["life_lost"] and not info["done_for_learning"] and info["lives"] == 3
    _, _, term, trunc, info = env.step(1)  # frames 5.. (life lost at 6)
    assert info["life_lost"] and info["done_for_learning"] and info["lives"] == 2
    assert not term and not trunc
    _, _, term, _, info = env.step(1)  # the game continues
    assert not info["life_lost"] and not term


def test_break_on_life_loss_stops_the_repeat_and_skips_pooling():
    # drama: life lost at frame 6 (2nd frame of step 2) -> repeat stops, obs = frame 6 alone
    env, emu = fake_env("drama", life_loss_frames=[6])
    env.reset()
    env.step(1)
    obs, *_ = env.step(1)
    assert emu.frame == 6 and np.array_equal(obs, FakeEmulator.frame_image(6))
    # storm: no break; all 4 frames run and are pooled as usual
    env, emu = fake_env("storm", life_loss_frames=[6])
    env.reset()
    env.step(1)
    obs, _, _, _, info = env.step(1)
    assert emu.frame == 8 and info["life_lost"]
    assert np.array_equal(obs, np.maximum(FakeEmulator.frame_image(7), FakeEmulator.frame_image(8)))


def test_life_loss_ignored_under_dreamerv3():
    env, _ = fake_env(get_protocol("dreamerv3", noop_max=0), life_loss_frames=[2])
    env.reset()
    _, _, _, _, info = env.step(1)
    assert info["life_lost"] and not info["done_for_learning"]


def test_return_includes_final_step_reward():
    rewards = {3: 1.0, 9: 5.0, 14: 100.0, 15: 7.0}  # the last two in the final (game-over) step
    env, _ = fake_env(rewards=rewards, game_over_frame=15)
    step_rewards, infos, term, trunc = run_episode(env)
    assert term and not trunc and infos[-1]["done_for_learning"]
    assert step_rewards[-1] == 107.0
    assert sum(step_rewards) == infos[-1]["episode_return"] == sum(rewards.values())
    assert len(step_rewards) == 4  # frames 1-4, 5-8, 9-12, 13-15 (stops at game over)


def test_rewards_are_not_clipped():
    env, _ = fake_env(rewards={1: 250.0, 2: -30.0})
    env.reset()
    assert env.step(0)[1] == 220.0


def test_frame_cap_truncates_not_terminates():
    env, emu = fake_env(get_protocol("drama", max_frames=10))
    rewards, infos, term, trunc = run_episode(env)
    assert trunc and not term and not infos[-1]["done_for_learning"]
    assert emu.frame == 10 and infos[-1]["episode_frame"] == 10 and len(rewards) == 3
    with pytest.raises(RuntimeError):
        env.step(0)
    env.reset()  # a new episode starts at frame 0 again
    assert env.step(0)[4]["episode_frame"] == 4


def test_default_cap_is_108k_frames():
    assert all(p.max_frames == 108_000 for n, p in PROTOCOLS.items() if n != "iris")
    assert PROTOCOLS["drama"].max_frames // PROTOCOLS["drama"].frame_skip == 27_000


def test_noop_starts_and_seeding():
    p = get_protocol("drama", noop_min=2, noop_max=5)
    counts = set()
    for seed in range(12):
        env, emu = fake_env(p, seed=seed)
        env.reset()
        assert emu.actions == [0] * emu.frame and 2 <= emu.frame <= 5
        assert emu.resets == [seed]  # the emulator is seeded with the env seed
        counts.add(emu.frame)
    assert len(counts) > 1
    env, emu = fake_env(p, seed=4)
    env.reset()
    env.reset()
    assert emu.resets == [4, None]  # later resets continue the emulator's RNG stream


def test_invalid_action():
    env, _ = fake_env()
    env.reset()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        env.step(3)


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name", ["Krull", "krull", "KRULL", "ALE/Krull-v5", "KrullNoFrameskip-v4",
                                  " krull ", "atari100k_krull"])
def test_case_insensitive_names(name):
    assert canonical_game(name) == "Krull"


def test_snake_case_and_ids():
    assert canonical_game("kung_fu_master") == "KungFuMaster"
    assert canonical_game("ALE/MsPacman-v5") == "MsPacman"
    assert canonical_game("up_n_down") == "UpNDown"
    assert canonical_game("james_bond") == "Jamesbond"
    assert canonical_game("GridGoal") == "gridgoal"


def test_unknown_game_lists_the_26():
    assert len(GAMES) == 26 and len(set(GAMES)) == 26
    with pytest.raises(ValueError) as e:
        make_env("Zork")
    msg = str(e.value)
    assert "\n" not in msg and "'Zork'" in msg
    assert all(g in msg for g in GAMES)


def test_list_games():
    assert list_games() == list(GAMES) + ["gridgoal"]


def test_all_26_games_construct():
    """Each ROM loads with its minimal action set (~0.3 s per game)."""
    for g in GAMES:
        env = make_env(g)
        obs, _ = env.reset()
        assert obs.shape == (64, 64, 3) and 2 <= env.num_actions <= 18
        env.close()


def test_gridgoal_through_make_env():
    env = make_env("gridgoal", seed=1)
    obs, info = env.reset()
    assert obs.shape == (64, 64, 3) and env.num_actions == 4


# ---------------------------------------------------------------- presets and scores

def test_protocol_presets():
    d = PROTOCOLS["drama"]
    assert (d.sticky_prob, d.full_action_space, d.noop_max, d.life_loss, d.break_on_life_loss) == \
        (0.0, False, 0, "terminal", True)
    assert PROTOCOLS["storm"].sticky_prob == 0.25
    assert PROTOCOLS["dreamerv3"].life_loss == "ignore" and PROTOCOLS["dreamerv3"].noop_max == 30
    assert (PROTOCOLS["iris"].noop_min, PROTOCOLS["iris"].noop_max) == (1, 30)
    for name, p in PROTOCOLS.items():
        assert p.name == name and p.source and p.frame_skip == 4 and p.size == 64 and p.max_pool
    assert get_protocol("DRAMA") is PROTOCOLS["drama"]
    with pytest.raises(ValueError, match="drama, dreamerv3, storm, iris"):
        get_protocol("muzero")
    with pytest.raises(ValueError):
        get_protocol("drama", life_loss="sometimes")


def test_protocol_dict_for_records():
    d = protocol_dict("storm")
    assert d["name"] == "storm" and d["sticky_prob"] == 0.25
    import ale_py
    assert d["ale_py_version"] == ale_py.__version__
    assert set(d) == {f.name for f in dataclasses.fields(PROTOCOLS["storm"])} | {"ale_py_version"}


def test_human_normalized():
    assert human_normalized("Krull", 1598.0) == pytest.approx(0.0)
    assert human_normalized("krull", 2665.5) == pytest.approx(1.0)
    assert human_normalized("Pong", 14.6) == pytest.approx(1.0)
    assert human_normalized("Pong", -20.7 + 0.5 * 35.3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        human_normalized("Zork", 1.0)
