"""`wmbench imagine`: a "true | imagined | error" video of open-loop rollouts from a trained world model.

Sources:
- `--record R`: a `wmbench run --task atari` record. The world model is the one the cell saved
  (`artifacts.world_model`), the windows come from the held-out episodes of the cell's dataset.
- `--run-dir DIR`: an agent's run dir (`wmbench atari`). The world model and the frames come from its
  newest checkpoint (the replay buffer it saved): the most recent windows inside one episode.

Each window's first `context` frames are encoded and prefilled, then `horizon` steps are imagined with
the window's true actions (harness/wm_atari.py `open_loop`). Video frame j shows, for each window (a
row), the true frame, the imagined one and their absolute difference, at the resolution the world
model sees (pooled frames for the `cpu` agent size), enlarged for viewing. Written as a GIF (Pillow),
and as an MP4 too when imageio with its ffmpeg plug-in is installed.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch


def _model_from_record(rec: dict):
    from wmbench.world_model import WorldModel
    from wmbench.world_model.config import PRESETS, DramaConfig
    path = (rec.get("artifacts") or {}).get("world_model")
    if not path:
        raise ValueError(f"record {rec.get('_path', '')} names no saved world model (artifacts.world_model)")
    if not Path(path).is_file():
        raise ValueError(f"the record's world model {path} is missing (it stays on the machine that ran the "
                         f"cell; run the cell again there, or here)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        cfg_d = dict(saved["config"])
        cls = {c.__name__: c for c in PRESETS.values()}.get(cfg_d.pop("preset_class", ""), DramaConfig)
        wm = WorldModel(cls(**cfg_d), int(saved["n_actions"]))
        wm.load_state_dict(saved["state_dict"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is one error line
        raise ValueError(f"world model {path} is unreadable ({type(e).__name__})") from None
    return wm


def windows_from_record(rec: dict, n: int, length: int):
    """(obs (n, length, 64, 64, 3) uint8, actions (n, length)) from the held-out episodes of the cell's data."""
    from wmbench.harness.atari_dataset import DatasetError, DatasetKey, load_verified, window_starts
    d = rec.get("dataset") or {}
    key = DatasetKey(**{k: v for k, v in rec["config"]["dataset_key"].items() if k != "format"})
    try:
        ds = load_verified(Path(d.get("path", "")), key)
    except DatasetError as e:
        raise ValueError(f"{e} (the video needs the cell's dataset; `wmbench run` makes it again)") from None
    _, val = ds.split()
    starts = window_starts(val, length)
    if len(starts) == 0:
        raise ValueError(f"no held-out episode is {length} transitions long; use a shorter --context/--horizon")
    pick = starts[np.unique(np.linspace(0, len(starts) - 1, n).round().astype(np.int64))]
    idx = pick[:, None] + np.arange(length)[None, :]
    return np.ascontiguousarray(ds.obs[idx]), ds.action[idx]


def model_and_windows_from_run_dir(run_dir: str, n: int, length: int):
    from wmbench.agent.checkpoint import restore_models
    _, wm, _, state = restore_models(run_dir, "--run-dir")
    a = state.arrays
    obs, act, last = a["replay.obs"], a["replay.action"], a["replay.is_last"]
    capacity, ptr, size, _ = (int(x) for x in a["replay.meta"])
    order = np.arange(size) if size < capacity else (ptr + np.arange(capacity)) % capacity   # oldest first
    obs, act, last = obs[order], act[order], last[order]
    # the most recent windows that stay inside one episode
    ends_ok = np.ones(len(act), bool)
    for i in np.flatnonzero(last):
        ends_ok[max(0, i - length + 2):i + 1] = False       # a window may end on is_last, not cross it
    starts = [s for s in range(len(act) - length, -1, -1) if ends_ok[s:s + length - 1].all()][: n * 4: 4]
    if not starts:
        raise ValueError(f"--run-dir {run_dir}: its replay holds no window of {length} steps inside one episode")
    idx = np.array(starts)[:, None] + np.arange(length)[None, :]
    return wm, obs[idx], act[idx]


def render(true: np.ndarray, pred: np.ndarray, scale: int) -> list[np.ndarray]:
    """true, pred (B, H, C, h, w) in [0, 1] -> H uint8 RGB frames: one row per window, columns
    true | imagined | |error|, each tile enlarged `scale` times, 2-pixel white gutters."""
    B, H, C, h, w = true.shape
    err = np.abs(pred - true)
    tiles = np.stack([true, pred, err], 2)                                  # (B, H, 3 tiles, C, h, w)
    tiles = tiles.repeat(scale, -2).repeat(scale, -1)
    g = 2
    th, tw = h * scale, w * scale
    frames = []
    for j in range(H):
        canvas = np.ones((B * (th + g) + g, 3 * (tw + g) + g, 3), np.float32)
        for b in range(B):
            for c in range(3):
                tile = tiles[b, j, c]
                tile = np.repeat(tile, 3, 0) if C == 1 else tile[:3]
                y, x = g + b * (th + g), g + c * (tw + g)
                canvas[y:y + th, x:x + tw] = tile.transpose(1, 2, 0)
        frames.append((canvas.clip(0, 1) * 255).round().astype(np.uint8))
    return frames


def add_header(frames: list[np.ndarray], tile_w: int, context: int) -> list[np.ndarray]:
    """A 14-pixel band above each frame naming the columns and the imagined step (t = context + j)."""
    from PIL import Image, ImageDraw
    out = []
    for j, f in enumerate(frames):
        img = Image.new("RGB", (f.shape[1], f.shape[0] + 14), "white")
        img.paste(Image.fromarray(f), (0, 14))
        d = ImageDraw.Draw(img)
        for c, label in enumerate(("true", "imagined", "error")):
            d.text((2 + c * (tile_w + 2) + 2, 1), label if c else f"{label} t+{j + 1}", fill="black")
        out.append(np.asarray(img))
    return out


def write_video(frames: list[np.ndarray], path: Path, fps: int = 4) -> list[Path]:
    """A GIF (Pillow, always) and an MP4 beside it when imageio + imageio-ffmpeg are installed."""
    from PIL import Image

    from wmbench.core.records import atomic_write_bytes
    imgs = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    out = [atomic_write_bytes(path.with_suffix(".gif"), buf.getvalue())]
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the MP4 writer)
    except ImportError:
        return out
    mp4 = path.with_suffix(".mp4")
    tmp = mp4.with_name(f".{mp4.name}.tmp.mp4")
    imageio.mimwrite(tmp, [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames], fps=fps)
    tmp.replace(mp4)
    return out + [mp4]


@torch.no_grad()
def imagine_video(record: str | None, run_dir: str | None, out: str | None, samples: int, context: int,
                  horizon: int, scale: int = 2) -> list[Path]:
    from wmbench.harness.wm_atari import mode_onehot, open_loop
    if (record is None) == (run_dir is None):
        raise ValueError("give one of --record or --run-dir")
    for name, v, lo in (("--samples", samples, 1), ("--context", context, 1), ("--horizon", horizon, 1),
                        ("--scale", scale, 1)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    length = context + horizon
    if record is not None:
        from wmbench.core.readback import read_json_object
        from wmbench.core.records import validate_record
        rec = read_json_object(record, "--record")
        if rec.get("kind") != "wm-atari":
            raise ValueError(f"--record {record} is a {rec.get('kind')!r} record, not a `wmbench run --task atari` one")
        try:
            validate_record(rec)
        except ValueError as e:
            raise ValueError(f"--record {record}: {e}") from None
        wm = _model_from_record(rec)
        obs, act = windows_from_record(rec, samples, length)
        name = Path(record).stem
    else:
        wm, obs, act = model_and_windows_from_run_dir(run_dir, samples, length)
        name = Path(run_dir).resolve().name
    wm.eval()
    B = obs.shape[0]
    frames = wm._frames(torch.as_tensor(obs))                                # (B*L, C, h, w)
    logp = wm._latents(wm.encoder(frames[: B * length]), B, length)[0]
    a = wm._check_actions(act)
    pred = open_loop(wm, mode_onehot(logp)[:, :context], a, horizon)
    true = frames.view(B, length, *frames.shape[1:])[:, context:]
    scale_px = max(1, scale * 64 // frames.shape[-1])                         # pooled frames shown larger
    images = add_header(render(true.numpy(), pred.numpy(), scale_px), frames.shape[-1] * scale_px, context)
    path = Path(out) if out else Path("results") / "videos" / f"imagine-{name}"
    return write_video(images, path.with_suffix(""))
