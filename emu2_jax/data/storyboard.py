"""YT-Storyboard-style videos -> interleaved records: storyboard frames and subtitles in the order
of their timestamps, for stage-2 interleaved rows.

Input (format "storyboard"): json lines, one video each, with the frames under `image_dir` (or
the jsonl's folder):

    {"video_id": "x1", "frames": [{"image": "x1/000.jpg", "time": 0.0}, ...],
     "subtitles": [{"text": "Welcome back.", "start": 0.4, "end": 2.1}, ...]}

Each frame becomes an image slot of its own (an empty sentence the frame is matched to), so the
frames stay exactly where their timestamps put them among the subtitles, whichever side of its
sentence the pipeline draws an image on; a frame and a subtitle at the same time: frame first.
Missing frame files are counted `missing_file` skips, a video without any frame `no_images`,
a malformed line (a non-numeric time, a subtitle without text) `bad_record`.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

from emu2_jax.data import formats


def _time(value: Any) -> float:
    time = float(value)
    if not math.isfinite(time):
        raise ValueError(f"timestamp {value!r} is not finite")
    return time


def _storyboard(base_dir: str, key: str, row: Any, skips: Counter, where: str,
                cfg: formats.Inputs) -> dict | None:
    del cfg
    frames = [(_time(f["time"]), 0, f["image"]) for f in row["frames"]]
    subtitles = [(_time(s["start"]), 1, s["text"]) for s in row.get("subtitles") or []]
    if not all(isinstance(text, str) for _, _, text in subtitles):
        raise ValueError("subtitle text is not a string")
    text_list: list[str] = []
    image_info = []
    # sorted() is stable and keys on (time, frame-before-text) only: equal times keep file order.
    for _, is_text, value in sorted(frames + subtitles, key=lambda event: event[:2]):
        if not is_text:
            image_info.append({"image_name": value, "matched_text_index": len(text_list)})
            value = ""
        text_list.append(value)
    return formats.interleaved_record(key, {"text_list": text_list, "image_info": image_info},
                                      base_dir, skips, where)


read = formats.json_reader(_storyboard)
