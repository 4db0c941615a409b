"""Reading and writing clips: animated GIFs and frame folders with Pillow; MP4 / WebM (and, for
reading, any container FFmpeg knows) with PyAV, the `video` extra (`pip install -e ".[video]"`)."""
from __future__ import annotations

import fractions
import os

import numpy as np
from PIL import Image, ImageSequence

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Written as H.264 (MP4, yuv420p: what browsers and players take) or VP9 (WebM).
ENCODERS = {".mp4": "libx264", ".webm": "libvpx-vp9"}
WRITABLE_SUFFIXES = (".gif", *ENCODERS)
CONTAINER_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[..., 3] floats in [0, 1] -> uint8."""
    return np.round(np.clip(np.asarray(frames, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def _pyav(what: str):
    try:
        import av  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ValueError(f"{what}: needs PyAV; pip install -e \".[video]\" (or write a .gif)") from None
    return av


def read_video(path: str | os.PathLike) -> list[np.ndarray]:
    """Frames (uint8 [H, W, 3]) of an animated GIF, of a video file (PyAV), or of the images in a
    folder in name order. ValueError naming `path` when it holds no frame."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES))
        if not names:
            raise ValueError(f"--video={path}: folder holds no frame image ({', '.join(FRAME_SUFFIXES)})")
        return [np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names]
    if not os.path.isfile(path):
        raise ValueError(f"--video={path}: no such file or folder")
    if path.lower().endswith(CONTAINER_SUFFIXES):
        return _read_container(path)
    try:
        with Image.open(path) as gif:
            return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    except OSError as e:
        raise ValueError(f"--video={path}: not a readable GIF or image ({e})") from None


def _read_container(path: str) -> list[np.ndarray]:
    av = _pyav(f"--video={path}")
    try:
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, IndexError) as e:  # IndexError: no video stream
        raise ValueError(f"--video={path}: not a readable video ({e})") from None
    if not frames:
        raise ValueError(f"--video={path}: the video holds no frame")
    return frames


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """ValueError naming `flag` unless `path` ends in a suffix `write_video` writes and, for MP4 /
    WebM, PyAV is installed: checked before any sampling."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(f"{flag}={path}: a clip is written as {' or '.join(WRITABLE_SUFFIXES)}; name such a file")
    if suffix in ENCODERS:
        _pyav(f"{flag}={path}")


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> None:
    """uint8 frames [F, H, W, 3] as an animated GIF (looping), an MP4 or a WebM, by `path`'s suffix."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video({path}): want uint8 [F, H, W, 3], got {frames.dtype}{list(frames.shape)}")
    check_writable(path, "write_video")
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
        return
    if frames.shape[1] % 2 or frames.shape[2] % 2:  # 4:2:0 chroma needs even sides
        raise ValueError(f"write_video({path}): {suffix} needs even frame sides, "
                         f"got {frames.shape[2]}x{frames.shape[1]}")
    av = _pyav(path)
    with av.open(path, "w") as container:
        stream = container.add_stream(ENCODERS[suffix], rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18"}  # visually lossless; samples are small
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
