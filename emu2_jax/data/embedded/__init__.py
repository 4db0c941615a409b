"""The embedded dataset shipped with the package (see README.md), and its reader.

The jsonl files here hold the annotations; the reader turns them into the records the real
formats give (`formats`), synthesising what a small repository cannot ship: video clips are a
virtual camera moving over a photo (`camera_motion_frames`), the edited images of the
instruction-editing pairs are pixel edits of a photo (`apply_edit`).
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from emu2_jax.data import formats
from emu2_jax.data import images as im
from emu2_jax.data import tokenizer as tk

DIR = tk.EMBEDDED_DIR
FRAME_SIZE = 224  # embedded videos: camera moves over a photo, frames of this size


def _rows(name: str) -> list[dict]:
    with open(DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _image(name: str) -> bytes:
    return (DIR / "images" / name).read_bytes()


def camera_motion_frames(pixels: np.ndarray, motion: str, num_frames: int,
                         size: int = FRAME_SIZE) -> list[np.ndarray]:
    """A clip made by moving a virtual camera over a still photo: 'pan_{left,right,up,down}'
    slide a window of 60% of the shorter side across the image, 'zoom_{in,out}' scale a central
    window between the full image and half of it. Frames are `size` x `size` uint8."""
    h, w = pixels.shape[:2]
    out = []
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)
        if motion.startswith("pan_"):
            side = int(0.6 * min(h, w))
            x = {"pan_right": t, "pan_left": 1 - t}.get(motion, 0.5) * (w - side)
            y = {"pan_down": t, "pan_up": 1 - t}.get(motion, 0.5) * (h - side)
            box = (int(x), int(y), int(x) + side, int(y) + side)
        elif motion in ("zoom_in", "zoom_out"):
            scale = 1 - 0.5 * (t if motion == "zoom_in" else 1 - t)
            bw, bh = int(w * scale), int(h * scale)
            box = ((w - bw) // 2, (h - bh) // 2, (w - bw) // 2 + bw, (h - bh) // 2 + bh)
        else:
            raise ValueError(f"unknown camera motion {motion!r}")
        frame = Image.fromarray(pixels).crop(box).resize((size, size), Image.Resampling.BICUBIC)
        out.append(np.asarray(frame, np.uint8))
    return out


def apply_edit(pixels: np.ndarray, edit: str) -> np.ndarray:
    """The pixel edits behind the embedded instruction-editing pairs."""
    if edit == "flip_horizontal":
        return pixels[:, ::-1]
    if edit == "flip_vertical":
        return pixels[::-1]
    if edit == "rotate_90":  # counterclockwise
        return np.rot90(pixels)
    if edit == "grayscale":
        gray = np.asarray(Image.fromarray(pixels).convert("L"))
        return np.repeat(gray[..., None], 3, axis=-1)
    if edit == "center_crop":
        h, w = pixels.shape[:2]
        crop = pixels[h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2]
        return np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BICUBIC))
    if edit in ("brighten", "darken"):
        factor = 1.4 if edit == "brighten" else 0.6
        return np.clip(pixels.astype(np.float32) * factor, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown edit {edit!r}")


def _video(name: str, motion: str, num_frames: int) -> list[bytes]:
    pixels = im.decode_image(_image(name))
    return [im.encode_jpeg(f) for f in camera_motion_frames(pixels, motion, num_frames)]


def _record(kind: str, key: str, row: dict[str, Any]) -> dict[str, Any]:
    if kind == "pairs":
        return {"image": _image(row["image"]), "caption": row["caption"].encode()}
    if kind == "videos":
        return {"frames": _video(row["image"], row["motion"], row["num_frames"]),
                "caption": row["caption"].encode()}
    if kind == "interleaved":
        return formats.interleaved_record(key, row, str(DIR / "images"), Counter(), key)
    if kind == "grounded":
        return formats.grounded_record(key, _image(row["image"]), row)
    if kind == "text":
        return {"text": row["text"].encode()}
    if kind == "chat":
        turns = [(t["user"], t["assistant"]) for t in row["turns"]]
        videos = [_video(v["image"], v["motion"], v["num_frames"]) for v in row["videos"]]
        return formats.chat_record(key, row["system"], turns, [_image(n) for n in row["images"]],
                                   videos, row["grounding"])
    source = im.decode_image(_image(row["image"]))
    return {"source": _image(row["image"]),
            "target": im.encode_jpeg(apply_edit(source, row["edit"])),
            "instruction": row["instruction"].encode()}


def reader(kind: str) -> formats.Reader:
    """The reader of the embedded `kind` records (it ignores its inputs: there is one dataset)."""
    def read(cfg: formats.Inputs, skips: Counter):
        del cfg, skips
        for i, row in enumerate(_rows(f"{kind}.jsonl")):
            key = f"{kind}/{i}"
            record = _record(kind, key, row)
            record["key"] = key.encode()
            yield key, record
    return read
