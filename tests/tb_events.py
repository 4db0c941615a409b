"""Reads TensorBoard event files back, for tests: TFRecord framing (little-endian length, its masked
CRC-32C, the payload, its masked CRC-32C) around `Event` protos (tensorboardX's copies of TensorFlow's).

`read_scalars`, `read_images` and `read_text` give {step: {tag: value}} in file order; a later value
of the same step and tag replaces an earlier one.
"""
from __future__ import annotations

import glob
import io
import os
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c

TEXT_SUFFIX = "/text_summary"  # tensorboardX appends it to the tags of text summaries


def event_files(logdir: str | os.PathLike) -> list[str]:
    return sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))


def read_events(path: str | os.PathLike) -> list[event_pb2.Event]:
    """Every event of an event file, or of all event files of a directory; checks both CRCs of each record."""
    out = []
    for name in event_files(path) if os.path.isdir(path) else [path]:
        with open(name, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            if pos + 12 > len(data):
                raise ValueError(f"{name}: truncated record at byte {pos}")
            header = data[pos:pos + 8]
            (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
            if length_crc != masked_crc32c(header):
                raise ValueError(f"{name}: corrupt record at byte {pos} (length)")
            end = pos + 12 + length
            if end + 4 > len(data):
                raise ValueError(f"{name}: truncated record at byte {pos}")
            payload, (payload_crc,) = data[pos + 12:end], struct.unpack("<I", data[end:end + 4])
            if payload_crc != masked_crc32c(payload):
                raise ValueError(f"{name}: corrupt record at byte {pos} (payload)")
            out.append(event_pb2.Event.FromString(payload))
            pos = end + 4
    return out


def _values(path: str | os.PathLike) -> Iterator[tuple[int, summary_pb2.Summary.Value]]:
    for event in read_events(path):
        if event.HasField("summary"):
            for value in event.summary.value:
                yield event.step, value


def read_scalars(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} of the scalar (`simple_value`) summaries; values are float32, as stored."""
    out: dict[int, dict[str, float]] = {}
    for step, value in _values(path):
        if value.WhichOneof("value") == "simple_value":
            out.setdefault(step, {})[value.tag] = np.float32(value.simple_value)
    return out


def read_images(path: str | os.PathLike) -> dict[int, dict[str, np.ndarray]]:
    """{step: {tag: uint8 [H, W, C]}}, the decoded images (PNG: the written pixels, exactly)."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for step, value in _values(path):
        if value.WhichOneof("value") == "image":
            with Image.open(io.BytesIO(value.image.encoded_image_string)) as image:
                pixels = np.asarray(image)
            if pixels.shape != (value.image.height, value.image.width, value.image.colorspace):
                raise ValueError(f"image {value.tag!r} at step {step}: {pixels.shape} does not match its header")
            out.setdefault(step, {})[value.tag] = pixels
    return out


def read_text(path: str | os.PathLike) -> dict[int, dict[str, str]]:
    """{step: {tag: text}} of the text-plugin summaries, under the tags they were written with."""
    out: dict[int, dict[str, str]] = {}
    for step, value in _values(path):
        if value.metadata.plugin_data.plugin_name == "text":
            tag = value.tag.removesuffix(TEXT_SUFFIX)
            out.setdefault(step, {})[tag] = b"".join(value.tensor.string_val).decode("utf-8")
    return out
