"""What an evaluation reads besides its annotation files: images and clips from disk, the encoder's
pooled features of them (RICES and CLIP-I), and the progress log of long loops.

Pooled features are the LLM's own encoder: `Emu2Model.encode_images` (EVA patch features through the
connector's visual side, [M, n_query, Dv]) averaged over the tokens, and for a clip over its frames.
RICES and CLIP-I share them, so one jitted program serves both, and for Emu2-Gen they are exactly the
embeddings the decoder is conditioned on (the decoder's `condition` pools the same encoder). Zero
and cosine: a constant image has features like any other, only an all-zero vector has cosine 0.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from emu2_jax import video_io
from emu2_jax.data import images as image_lib
from emu2_jax.models.emu2 import Emu2Config, Emu2Model

PyTree = Any


class Progress:
    """Logs `done / total`, the rate and the ETA of a loop, at most every `every` seconds (and at the end)."""

    def __init__(self, what: str, total: int, unit: str = "examples", every: float = 10.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done = 0
        self.started = self.logged = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.logged < self.every and self.done < self.total:
            return
        self.logged = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logging.info("%s: %d/%d %s (%.0f%%), %.2f %s/s, ETA %s", self.what, self.done, self.total, self.unit,
                     100 * self.done / max(self.total, 1), rate, self.unit, _duration(eta))


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


# ---------------------------------------------------------------------------------------------
# Media. A bad file is a one-line error naming it (the readers checked that each exists).

@functools.lru_cache(maxsize=64)
def load_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3]; cached, since few-shot prompts show the same support images again and again."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SystemExit(f"{path}: cannot read ({e.strerror})") from None
    try:
        return image_lib.decode_image(data)
    except Exception as e:  # SkipExample('bad_image') and PIL errors alike
        raise SystemExit(f"{path}: not a readable image ({e})") from None


@functools.lru_cache(maxsize=32)
def load_clip(path: str, frames: int) -> tuple[np.ndarray, ...]:
    """`frames` frames (uint8 [H, W, 3]) of a GIF or frame folder, sampled uniformly (segment centres,
    repeated when the clip is shorter), as the data pipeline samples videos."""
    try:
        all_frames = video_io.read_video(path)
    except (ValueError, OSError) as e:
        raise SystemExit(str(e).removeprefix("--video=")) from None
    return tuple(all_frames[i] for i in image_lib.sample_frame_indices(len(all_frames), frames))


def load_media(kind: str, path: str, frames: int) -> list[np.ndarray]:
    """The frames of one visual: [image] for kind "image", `frames` frames for "video"."""
    return [load_image(path)] if kind == "image" else list(load_clip(path, frames))


# ---------------------------------------------------------------------------------------------
# Pooled encoder features.

@functools.lru_cache(maxsize=8)
def _pooled_fn(config: Emu2Config) -> Callable[[PyTree, jax.Array], jax.Array]:
    model = Emu2Model(config)

    def pooled(params, pixels):
        visual, _ = model.apply({"params": params}, pixels, config.n_query, method=Emu2Model.encode_images)
        return visual.astype(jnp.float32).mean(axis=1)

    return jax.jit(pooled)


def pooled_features(config: Emu2Config, params: PyTree, visuals: Sequence[Callable[[], list[np.ndarray]]],
                    batch_size: int, what: str = "encoder features") -> np.ndarray:
    """[N, Dv] float32: per visual (a loader of its uint8 frames) the mean over frames of the frames'
    pooled features. Frames go through the encoder `batch_size` at a time, the last batch padded, so
    one compiled program serves every batch."""
    pooled, size = _pooled_fn(config), config.vision.image_size
    owners: list[int] = []
    pending: list[np.ndarray] = []
    sums: list[np.ndarray] = []
    progress = Progress(what, len(visuals), unit="visuals")

    def flush():
        pixels = np.zeros((batch_size, size, size, 3), np.float32)
        pixels[:len(pending)] = np.stack(pending)
        features = np.asarray(jax.device_get(pooled(params, pixels)))[:len(pending)]
        for owner, f in zip(owners, features):
            while len(sums) <= owner:
                sums.append(np.zeros_like(f))
            sums[owner] += f
        pending.clear()
        owners.clear()

    counts = []
    for i, load in enumerate(visuals):
        frames = load()
        counts.append(len(frames))
        for frame in frames:
            pending.append(image_lib.normalize(image_lib.resize_for_encoder(frame, size)))
            owners.append(i)
            if len(pending) == batch_size:
                flush()
        progress.update(1)
    if pending:
        flush()
    return np.stack(sums) / np.asarray(counts, np.float32)[:, None]
