"""Readers of the on-disk formats Emu2's corpora ship in: files -> (key, record) pairs.

- pairs (webdataset): tar shards of `key.{jpg,png,webp}` + `key.txt` (or `key.json` with
  "caption"), as img2dataset writes LAION / CapsFusion;
- videos (webdataset): tar shards of `key.txt` + pre-extracted frames `key.<n>.jpg`;
- interleaved (mmc4): MMC4 jsonl (`text_list`, `image_info[].image_name` / `matched_text_index`)
  + a folder with the downloaded images;
- grounded (grit): tar shards of `key.jpg` + `key.json` with GRIT's `caption` and `noun_chunks`
  ([start, end, x1, y1, x2, y2, score], boxes normalised to the image);
- text (jsonl): jsonl with a "text" field (Pile);
- chat (llava): LLaVA json / jsonl (`conversations` human/gpt turns, `<image>` tag, optional
  "image") + an image folder;
- edits (jsonl): jsonl with "source", "target" (paths under image_dir), "instruction".

A reader yields records with the fields of `sources.FEATURES[kind]`: encoded image bytes and raw
text bytes, undecoded (decoding and validation happen in the input pipeline, where bad examples
are counted). What a reader itself has to drop (unreadable lines, incomplete samples, missing
image files) it counts per reason in the `skips` counter it is given. `paths` accepts globs,
`{000..123}` ranges and comma-separated lists (`expand_paths`).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from emu2_jax.data import tokenizer as tk

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class Inputs(Protocol):
    """What a reader is told about its source (`sources.SourceConfig` is one)."""
    paths: tuple[str, ...]  # expanded, existing files
    image_dir: str          # mmc4, llava, jsonl edits: where the referenced images are
    system: str             # llava: 'chat' | 'academic' | literal system message


Reader = Callable[[Inputs, Counter], Iterator[tuple[str, dict[str, Any]]]]


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Globs, `{0000..0099}` ranges and comma-separated lists -> sorted existing files."""
    items = paths.split(",") if isinstance(paths, str) else list(paths)
    patterns = [p.strip() for p in items if p and p.strip()]
    if not patterns:
        raise ValueError("no paths configured for this source")
    out: list[str] = []
    for pattern in patterns:
        for expanded in _expand_ranges(os.path.expanduser(pattern)):
            matches = sorted(glob.glob(expanded))
            if not matches:
                raise FileNotFoundError(f"no file matches {expanded!r}")
            out += matches
    return out


def _expand_ranges(pattern: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi, width = int(match.group(1)), int(match.group(2)), len(match.group(1))
    return [expanded for i in range(lo, hi + 1) for expanded in _expand_ranges(
        pattern[:match.start()] + str(i).zfill(width) + pattern[match.end():])]


# ------------------------------------------------------------------------------------------------
# Containers: tar shards and json lines
# ------------------------------------------------------------------------------------------------

def _iter_webdataset(path: str, skips: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Groups consecutive tar members by key (file name up to its first dot), webdataset style."""
    key, group = None, {}
    shard = os.path.basename(path)
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                member_key = f"{shard}/{folder}/{stem}" if folder else f"{shard}/{stem}"
                if member_key != key:
                    if group:
                        yield key, group
                    key, group = member_key, {}
                group[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        skips["bad_record"] += 1
        log.warning("unreadable tar shard %s (%s); using the samples read before the error",
                    path, e)
    if group:
        yield key, group


def _iter_json_lines(path: str, skips: Counter) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        if path.endswith(".json"):  # one json array (LLaVA ships this)
            try:
                rows = json.loads(f.read().decode("utf-8"))
            except UnicodeDecodeError:
                skips["bad_text"] += 1
                return
            except ValueError:
                skips["bad_record"] += 1
                return
            yield from enumerate(rows if isinstance(rows, list) else [rows])
            return
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                skips["bad_text"] += 1
            except ValueError:
                skips["bad_record"] += 1


def _read_file(image_dir: str, name: str, skips: Counter) -> bytes | None:
    """The bytes of image_dir/name, or None (counted as 'missing_file')."""
    path = os.path.join(image_dir, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        skips["missing_file"] += 1
        return None


def _caption_bytes(group: dict[str, bytes]) -> bytes | None:
    if "txt" in group:
        return group["txt"]
    if "json" in group:
        try:
            caption = json.loads(group["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption.encode("utf-8") if isinstance(caption, str) else None
    return None


def _first_image(group: dict[str, bytes]) -> bytes | None:
    return next((group[e] for e in IMAGE_EXTS if e in group), None)


# ------------------------------------------------------------------------------------------------
# Records shared with the embedded dataset (which stores the same annotations)
# ------------------------------------------------------------------------------------------------

def grounded_record(key: str, image: bytes, meta: dict) -> dict:
    """GRIT annotations (`caption`, `noun_chunks`) -> a grounded record."""
    chunks = np.asarray(meta.get("noun_chunks") or np.zeros((0, 7)), np.float64).reshape(-1, 7)
    return {"key": key.encode(), "image": image, "caption": meta["caption"].encode("utf-8"),
            "spans": chunks[:, :2].astype(np.int32), "boxes": chunks[:, 2:6].astype(np.float32)}


def interleaved_record(key: str, doc: dict, image_dir: str, skips: Counter) -> dict | None:
    """An MMC4 document -> an interleaved record with the images found under image_dir."""
    sentences = doc.get("text_list")
    if not isinstance(sentences, list):
        skips["bad_record"] += 1
        return None
    images, image_sentence = [], []
    for info in doc.get("image_info") or []:
        data = _read_file(image_dir, info["image_name"], skips)
        if data is not None:
            images.append(data)
            image_sentence.append(int(info["matched_text_index"]))
    if not images:
        skips["no_images"] += 1
        return None
    return {"key": key.encode(), "sentences": [str(s).encode("utf-8") for s in sentences],
            "images": images, "image_sentence": image_sentence}


def chat_record(key: str, system: str, turns: list[tuple[str, str]], images: list[bytes],
                videos: list[list[bytes]], grounding: bool) -> dict:
    """A dialogue -> a chat record (the frames of all videos concatenated, with their counts)."""
    return {"key": key.encode(), "system": system.encode("utf-8"), "grounding": grounding,
            "users": [u.encode("utf-8") for u, _ in turns],
            "assistants": [a.encode("utf-8") for _, a in turns],
            "images": images, "video_frames": [f for v in videos for f in v],
            "video_lengths": [len(v) for v in videos]}


# ------------------------------------------------------------------------------------------------
# Readers: (Inputs, skip counter) -> iterator of (key, record)
# ------------------------------------------------------------------------------------------------

def _read_pairs_webdataset(cfg: Inputs, skips: Counter):
    for path in cfg.paths:
        for key, group in _iter_webdataset(path, skips):
            image, caption = _first_image(group), _caption_bytes(group)
            if image is None or caption is None:
                skips["bad_record"] += 1
                continue
            yield key, {"key": key.encode(), "image": image, "caption": caption}


_FRAME_RE = re.compile(r"^(\d+)\.(jpg|jpeg|png)$")


def _read_videos_webdataset(cfg: Inputs, skips: Counter):
    for path in cfg.paths:
        for key, group in _iter_webdataset(path, skips):
            frames = sorted((int(m.group(1)), data) for ext, data in group.items()
                            if (m := _FRAME_RE.match(ext)))
            caption = _caption_bytes(group)
            if not frames or caption is None:
                skips["bad_record"] += 1
                continue
            yield key, {"key": key.encode(), "frames": [d for _, d in frames], "caption": caption}


def _read_grounded_grit(cfg: Inputs, skips: Counter):
    for path in cfg.paths:
        for key, group in _iter_webdataset(path, skips):
            image = _first_image(group)
            try:
                meta = json.loads(group["json"])
                record = grounded_record(key, image, meta) if image is not None else None
            except (KeyError, ValueError, TypeError, AttributeError):
                record = None
            if record is None:
                skips["bad_record"] += 1
                continue
            yield key, record


def _read_interleaved_mmc4(cfg: Inputs, skips: Counter):
    for path in cfg.paths:
        for i, doc in _iter_json_lines(path, skips):
            key = f"{os.path.basename(path)}/{i}"
            try:
                record = interleaved_record(key, doc, cfg.image_dir, skips)
            except (KeyError, TypeError, ValueError, AttributeError):
                skips["bad_record"] += 1
                continue
            if record is not None:
                yield key, record


def _read_text_jsonl(cfg: Inputs, skips: Counter):
    for path in cfg.paths:
        for i, row in _iter_json_lines(path, skips):
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                skips["bad_record"] += 1
                continue
            key = f"{os.path.basename(path)}/{i}"
            yield key, {"key": key.encode(), "text": text.encode("utf-8")}


def _read_chat_llava(cfg: Inputs, skips: Counter):
    for path in cfg.paths:
        for i, row in _iter_json_lines(path, skips):
            key = f"{os.path.basename(path)}/{i}"
            try:
                messages = row["conversations"]
                turns = [(messages[j]["value"].replace("<image>", tk.IMG_PLACEHOLDER),
                          messages[j + 1]["value"]) for j in range(0, len(messages) - 1, 2)]
                roles_ok = all(messages[j]["from"] == "human" and messages[j + 1]["from"] == "gpt"
                               for j in range(0, len(messages) - 1, 2))
            except (KeyError, TypeError, IndexError, AttributeError):
                turns, roles_ok = [], False
            if not turns or not roles_ok:
                skips["bad_record"] += 1
                continue
            images = []
            if row.get("image"):
                data = _read_file(cfg.image_dir, row["image"], skips)
                if data is None:
                    continue
                images.append(data)
                if not any(tk.IMG_PLACEHOLDER in u for u, _ in turns):  # LLaVA omits it sometimes
                    turns[0] = (tk.IMG_PLACEHOLDER + turns[0][0], turns[0][1])
            yield key, chat_record(key, cfg.system, turns, images, [], False)


def _read_edits_jsonl(cfg: Inputs, skips: Counter):
    for path in cfg.paths:
        for i, row in _iter_json_lines(path, skips):
            key = f"{os.path.basename(path)}/{i}"
            try:
                source, target, instruction = row["source"], row["target"], row["instruction"]
            except (KeyError, TypeError):
                skips["bad_record"] += 1
                continue
            source_bytes = _read_file(cfg.image_dir, source, skips)
            target_bytes = _read_file(cfg.image_dir, target, skips)
            if source_bytes is None or target_bytes is None:
                continue
            yield key, {"key": key.encode(), "source": source_bytes, "target": target_bytes,
                        "instruction": str(instruction).encode("utf-8")}


READERS: dict[tuple[str, str], Reader] = {
    ("pairs", "webdataset"): _read_pairs_webdataset,
    ("videos", "webdataset"): _read_videos_webdataset,
    ("interleaved", "mmc4"): _read_interleaved_mmc4,
    ("grounded", "grit"): _read_grounded_grit,
    ("text", "jsonl"): _read_text_jsonl,
    ("chat", "llava"): _read_chat_llava,
    ("edits", "jsonl"): _read_edits_jsonl,
}
