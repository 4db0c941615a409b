"""Encoded video clips (mp4, webm, ...) -> sampled frames, with PyAV (the `video` extra).

Ingestion keeps a clip as the JPEG frames it samples, so WebVid-style shards (one `key.mp4` per
sample) become the same `videos` records as shards of pre-extracted frames, and nothing later
needs a video decoder. Of the clip's frames 0, stride, 2*stride, ... `num_frames` are chosen
uniformly (`images.sample_frame_indices`). Undecodable bytes are a `bad_video` skip, a clip
with fewer strided frames than wanted a `too_short` one.
"""
from __future__ import annotations

import io

import numpy as np

from emu2_jax import video_io
from emu2_jax.data import images as im
from emu2_jax.data.skips import SkipExample

VIDEO_EXTS = tuple(suffix[1:] for suffix in video_io.CONTAINER_SUFFIXES)


def _pyav():
    """PyAV is optional: only corpora with video files need it. Its absence is an ImportError
    (video_io's is a ValueError naming a command flag), which ingestion never counts as a bad
    record."""
    try:
        import av  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install -e '.[video]'") from None
    return av


def read_video_bytes(data: bytes, num_frames: int, stride: int = 1) -> list[np.ndarray]:
    """`num_frames` uint8 [H, W, 3] RGB frames of an encoded clip, in order (see the module doc).

    Raises SkipExample('bad_video') for bytes PyAV cannot demux or decode (or frames over
    `images.MAX_PIXELS`) and SkipExample('too_short') for a clip with fewer than `num_frames`
    frames after striding."""
    if num_frames < 1 or stride < 1:
        raise ValueError(f"need num_frames >= 1 and stride >= 1 (got {num_frames}, {stride})")
    if not data:
        raise SkipExample("bad_video", "empty bytes")
    av = _pyav()
    try:
        # Counting packets only demuxes (no decoding); webm headers often give no frame count.
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            if stream.width * stream.height > im.MAX_PIXELS:  # as for images: refuse, not allocate
                raise SkipExample("bad_video", f"{stream.width}x{stream.height} is too large")
            total = sum(1 for packet in container.demux(stream) if packet.size)
        if not total:  # e.g. an mp4 cut before its frames' index
            raise SkipExample("bad_video", "no video frames")
        strided = range(0, total, stride)
        if len(strided) < num_frames:
            raise SkipExample("too_short", f"{total} frames, stride {stride}, want {num_frames}")
        wanted = [strided[i] for i in im.sample_frame_indices(len(strided), num_frames)]
        frames: list[np.ndarray] = []
        with av.open(io.BytesIO(data)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i == wanted[len(frames)]:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) == num_frames:
                        break
    except SkipExample:
        raise
    except (av.FFmpegError, IndexError, ValueError) as e:  # IndexError: no video stream
        raise SkipExample("bad_video", f"{type(e).__name__}: {e}"[:200]) from None
    if len(frames) < num_frames:
        raise SkipExample("bad_video", f"decoded {len(frames)} of {num_frames} frames")
    return frames


def clip_jpeg_frames(data: bytes, num_frames: int, stride: int = 1, image_size: int = 0) -> list[bytes]:
    """The frames `read_video_bytes` samples, as JPEG bytes (a `videos` record's `frames`); with
    `image_size` > 0 each is first brought down to it as `images.fit_for_storage` would."""
    return [im.encode_jpeg(im.downscaled(f, image_size) if image_size else f, quality=95)
            for f in read_video_bytes(data, num_frames, stride)]

