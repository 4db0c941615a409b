"""Reading clips (a folder of frames or an animated GIF) and writing animated GIFs, with Pillow."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageSequence

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[..., 3] floats in [0, 1] -> uint8."""
    return np.round(np.clip(np.asarray(frames, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def read_video(path: str | os.PathLike) -> list[np.ndarray]:
    """Frames (uint8 [H, W, 3]) of an animated GIF, or of the images in a folder in name order.
    ValueError naming `path` when it holds no frame."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES))
        if not names:
            raise ValueError(f"--video={path}: folder holds no frame image ({', '.join(FRAME_SUFFIXES)})")
        return [np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names]
    if not os.path.isfile(path):
        raise ValueError(f"--video={path}: no such file or folder")
    try:
        with Image.open(path) as gif:
            return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    except OSError as e:
        raise ValueError(f"--video={path}: not a readable GIF or image ({e})") from None


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> None:
    """An endlessly looping animated GIF of uint8 frames [F, H, W, 3]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_gif({path}): want uint8 [F, H, W, 3], got {frames.dtype}{list(frames.shape)}")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(os.fspath(path), save_all=True, append_images=images[1:], duration=int(round(1000 / fps)),
                   loop=0)
