"""Reasons for which an input example is dropped instead of reaching a batch."""
from __future__ import annotations

import dataclasses

REASONS: tuple[str, ...] = (
    "bad_image",          # undecodable, truncated or empty image bytes
    "missing_file",       # a referenced image file does not exist (ingest)
    "empty_text",         # caption / document / answer empty after stripping
    "bad_text",           # text bytes that are not valid UTF-8
    "box_outside_image",  # a box not inside [0, 1]^2 or with x1 >= x2 / y1 >= y2
    "bad_annotation",     # spans outside the caption, placeholder/image count mismatch, ...
    "too_long",           # over max_document_chars, or nothing supervised fits in the row
    "no_images",          # interleaved document without any image
    "too_small",          # image below the decoder's minimum side
    "bad_record",         # malformed json / incomplete webdataset sample (ingest)
    "unsafe_path",        # a record names a file outside its image_dir / shard folder (ingest)
    "bad_video",          # a video file PyAV cannot demux or decode (ingest)
    "too_short",          # a video with fewer frames than the source samples (ingest)
)
REASON_INDEX = {r: i for i, r in enumerate(REASONS)}


class SkipExample(Exception):
    """Raised by decoders/builders for bad input; the pipeline counts it and moves on."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASON_INDEX:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in the element stream for a dropped example (so skips are counted downstream)."""
    reason: str
