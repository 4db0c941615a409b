"""Readers of the on-disk formats Emu2's corpora ship in: files -> (key, record) pairs.

- pairs (webdataset): tar shards of `key.{jpg,png,webp}` + `key.txt` (or `key.json` with
  "caption"), as img2dataset writes LAION / CapsFusion;
- videos (webdataset): tar shards of `key.txt` (or `key.json` with "caption") + pre-extracted
  frames `key.<n>.jpg`, or one encoded clip `key.{mp4,webm,...}` (WebVid), sampled by `video`;
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
are counted). What a reader itself has to drop (malformed lines, incomplete samples, missing
image files, file names leading outside their folder) it counts per reason in the `skips` counter
it is given, logging the first few of each reason with their `file:line`. A file it cannot read
is an error naming it. Files a record names are read only from inside `image_dir` (or the folder
of the record's own file when there is none). Input files may be local or remote (etils epath:
gs://, s3://; `paths.expand_paths` lists them); `image_dir` is local.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
from etils import epath

from emu2_jax.data import tokenizer as tk
from emu2_jax.data import video
from emu2_jax.data.skips import SkipExample

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class Inputs(Protocol):
    """What a reader is told about its source (`sources.SourceConfig` is one)."""
    paths: tuple[str, ...]  # expanded, existing files
    image_dir: str          # mmc4, llava, jsonl edits: where the referenced images are
    system: str             # llava: 'chat' | 'academic' | literal system message
    clip_frames: int        # video files: frames kept per clip (`video`)
    clip_stride: int        # video files: sampled among every clip_stride-th frame
    image_size: int         # > 0: images are stored at most this large (`ingest.fit_images`)


# A record field a reader may set to the names of the image fields it has already decoded and
# fitted to `image_size` (frames it decoded from a video file), which `ingest.fit_images` then
# leaves alone instead of decoding them again; set only when image_size > 0.
FITTED = "_fitted_fields"


Reader = Callable[[Inputs, Counter], Iterator[tuple[str, dict[str, Any]]]]


# ------------------------------------------------------------------------------------------------
# Containers: tar shards and json lines
# ------------------------------------------------------------------------------------------------

# How many skips of each reason are logged with their file:line (the rest are only counted).
LOGGED_PER_REASON = 3


def skip(skips: Counter, reason: str, where: str, detail: object = "") -> None:
    """Counts a dropped record; the first few of each reason are logged with where they are."""
    skips[reason] += 1
    if skips[reason] <= LOGGED_PER_REASON:
        log.warning("skipped %s (%s)%s", where, reason, f": {detail}" if detail else "")


def _open_input(path: str):
    """An input file for reading. Failing to read one is an error naming it, never a skip: a
    dataset cached without the file would be reused as complete after the file became readable."""
    try:
        return epath.Path(path).open("rb")
    except OSError as e:
        raise OSError(f"cannot read input file {path}: {e.strerror or e}") from e


def _iter_webdataset(path: str, skips: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Groups consecutive tar members by key (file name up to its first dot), webdataset style.
    A corrupt or truncated shard keeps the samples read before the damage (one `bad_record`);
    an I/O error is an error naming the shard."""
    key, group = None, {}
    shard = os.path.basename(path)
    with _open_input(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
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
        except (tarfile.TarError, EOFError) as e:
            skip(skips, "bad_record", path, f"corrupt tar shard ({e}); samples before it kept")
        except OSError as e:
            raise OSError(f"cannot read input file {path}: {e.strerror or e}") from e
    if group:
        yield key, group


def _iter_json_lines(path: str, skips: Counter) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value); a `.json` file is one array (LLaVA ships this), its
    elements numbered from 1. Any failure to parse a line is one counted skip."""
    with _open_input(path) as f:
        try:
            content = f.read() if path.endswith(".json") else None
            lines = [content] if content is not None else f
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    skip(skips, "bad_text", f"{path}:{i}", e)
                    continue
                except Exception as e:  # noqa: BLE001 - RecursionError, ValueError: one bad line
                    skip(skips, "bad_record", f"{path}:{i}", f"{type(e).__name__}: {e}"[:200])
                    continue
                if content is None:
                    yield i, value
                else:
                    yield from enumerate(value if isinstance(value, list) else [value], 1)
        except OSError as e:
            raise OSError(f"cannot read input file {path}: {e.strerror or e}") from e


def _read_file(base_dir: str, name: object, skips: Counter, where: str) -> bytes | None:
    """The bytes of the file a record names, confined to base_dir: None (counted) when it is
    missing ('missing_file') or leads outside base_dir ('unsafe_path': an absolute path, `..`,
    a symlink out). Any other failure to read it is an error naming it."""
    if not isinstance(name, str) or not name:
        skip(skips, "bad_record", where, f"file name {name!r}")
        return None
    base = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(base, name))
    if os.path.isabs(name) or os.path.commonpath([base, path]) != base:
        skip(skips, "unsafe_path", where, f"{name!r} is outside {base_dir}")
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        skip(skips, "missing_file", where, f"{name!r} not under {base_dir}")
        return None
    except OSError as e:
        raise OSError(f"cannot read input file {path}: {e.strerror or e}") from e


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
    if not np.isfinite(chunks).all() or np.abs(chunks[:, :2]).max(initial=0) > 2 ** 31 - 1:
        raise ValueError("noun_chunks hold a non-finite or overflowing number")
    return {"key": key.encode(), "image": image, "caption": meta["caption"].encode("utf-8"),
            "spans": chunks[:, :2].astype(np.int32), "boxes": chunks[:, 2:6].astype(np.float32)}


def interleaved_record(key: str, doc: dict, image_dir: str, skips: Counter, where: str
                       ) -> dict | None:
    """An MMC4 document -> an interleaved record with the images found under image_dir.

    Items of `text_list` that are not strings are dropped (the image indices renumbered); an
    image matched to a dropped item or to no sentence at all makes the document malformed."""
    sentences = doc.get("text_list")
    if not isinstance(sentences, list):
        raise ValueError("text_list is not a list")
    kept = [i for i, s in enumerate(sentences) if isinstance(s, str)]
    renumber = {old: new for new, old in enumerate(kept)}
    infos = [(info["image_name"], info["matched_text_index"]) for info in doc.get("image_info") or []]
    for _, index in infos:  # all checked before any image is read: one record, one skip reason
        if type(index) is not int or index not in renumber:  # bool, float, out of range
            raise ValueError(f"matched_text_index {index!r} names no sentence of {len(sentences)}")
    images, image_sentence = [], []
    for name, index in infos:
        data = _read_file(image_dir, name, skips, where)
        if data is not None:
            images.append(data)
            image_sentence.append(renumber[index])
    if not images:
        skip(skips, "no_images", where)
        return None
    return {"key": key.encode(), "sentences": [sentences[i].encode("utf-8") for i in kept],
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

def _guarded(build: Callable[..., dict | None], where: str, skips: Counter, *args: Any) -> dict | None:
    """build(*args) for one record; any exception in it (a malformed field, an overflowing number)
    is that record's counted `bad_record` (a SkipExample: its own reason), never the end of the
    source. I/O errors and a missing optional package (PyAV for video files) propagate."""
    try:
        return build(*args)
    except SkipExample as e:
        skip(skips, e.reason, where, e.detail)
        return None
    except (OSError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever a malformed record makes the code raise
        skip(skips, "bad_record", where, f"{type(e).__name__}: {e}"[:200])
        return None


def _webdataset_reader(build: Callable[[Inputs, str, dict[str, bytes]], dict]) -> Reader:
    """A reader of tar shards: build(cfg, key, group) -> record; it raises on an incomplete
    sample."""
    def read(cfg: Inputs, skips: Counter):
        for path in cfg.paths:
            for key, group in _iter_webdataset(path, skips):
                record = _guarded(build, f"{path}:{key}", skips, cfg, key, group)
                if record is not None:
                    yield key, record
    return read


def json_reader(build: Callable[[Inputs, str, Any, Counter, str], dict | None]) -> Reader:
    """A reader of json lines: build(cfg, key, row, skips, where) -> record, None when it counted
    its own skip (a missing image), or an exception for a malformed row."""
    def read(cfg: Inputs, skips: Counter):
        for path in cfg.paths:
            base_dir = cfg.image_dir or os.path.dirname(os.path.abspath(path))
            for i, row in _iter_json_lines(path, skips):
                key, where = f"{os.path.basename(path)}/{i}", f"{path}:{i}"
                record = _guarded(build, where, skips, base_dir, key, row, skips, where, cfg)
                if record is not None:
                    yield key, record
    return read


def _pairs(cfg: Inputs, key: str, group: dict[str, bytes]) -> dict:
    image, caption = _first_image(group), _caption_bytes(group)
    if image is None or caption is None:
        raise ValueError("sample without an image or a caption")
    return {"key": key.encode(), "image": image, "caption": caption}


_FRAME_RE = re.compile(r"^(\d+)\.(jpg|jpeg|png)$")


def _videos(cfg: Inputs, key: str, group: dict[str, bytes]) -> dict:
    numbered = sorted((int(m.group(1)), data) for ext, data in group.items()
                      if (m := _FRAME_RE.match(ext)))
    frames = [data for _, data in numbered]
    clip = next((group[e] for e in video.VIDEO_EXTS if e in group), None)
    caption = _caption_bytes(group)
    if not (frames or clip is not None) or caption is None:
        raise ValueError("sample without frames, a video file or a caption")
    if frames:
        return {"key": key.encode(), "frames": frames, "caption": caption}
    frames = video.clip_jpeg_frames(clip, cfg.clip_frames, cfg.clip_stride, cfg.image_size)
    fitted = {FITTED: ("frames",)} if cfg.image_size else {}
    return {"key": key.encode(), "frames": frames, "caption": caption, **fitted}


def _grounded(cfg: Inputs, key: str, group: dict[str, bytes]) -> dict:
    image = _first_image(group)
    if image is None:
        raise ValueError("sample without an image")
    return grounded_record(key, image, json.loads(group["json"]))


def _interleaved(base_dir: str, key: str, doc: Any, skips: Counter, where: str,
                 cfg: Inputs) -> dict | None:
    return interleaved_record(key, doc, base_dir, skips, where)


def _text(base_dir: str, key: str, row: Any, skips: Counter, where: str, cfg: Inputs) -> dict:
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise ValueError("no string 'text' field")
    return {"key": key.encode(), "text": text.encode("utf-8")}


def _chat(base_dir: str, key: str, row: Any, skips: Counter, where: str,
          cfg: Inputs) -> dict | None:
    messages = row["conversations"]
    pairs = range(0, len(messages) - 1, 2)
    turns = [(messages[j]["value"].replace("<image>", tk.IMG_PLACEHOLDER), messages[j + 1]["value"])
             for j in pairs]
    if not turns or not all(messages[j]["from"] == "human" and messages[j + 1]["from"] == "gpt"
                            for j in pairs):
        raise ValueError("conversations are not human/gpt turns")
    images = []
    if row.get("image"):
        data = _read_file(base_dir, row["image"], skips, where)
        if data is None:
            return None
        images.append(data)
        if not any(tk.IMG_PLACEHOLDER in u for u, _ in turns):  # LLaVA omits it sometimes
            turns[0] = (tk.IMG_PLACEHOLDER + turns[0][0], turns[0][1])
    return chat_record(key, cfg.system, turns, images, [], False)


def _edits(base_dir: str, key: str, row: Any, skips: Counter, where: str,
           cfg: Inputs) -> dict | None:
    source, target, instruction = row["source"], row["target"], row["instruction"]
    if not isinstance(instruction, str):
        raise ValueError("instruction is not a string")
    source_bytes = _read_file(base_dir, source, skips, where)
    target_bytes = _read_file(base_dir, target, skips, where)
    if source_bytes is None or target_bytes is None:
        return None
    return {"key": key.encode(), "source": source_bytes, "target": target_bytes,
            "instruction": instruction.encode("utf-8")}


READERS: dict[tuple[str, str], Reader] = {
    ("pairs", "webdataset"): _webdataset_reader(_pairs),
    ("videos", "webdataset"): _webdataset_reader(_videos),
    ("interleaved", "mmc4"): json_reader(_interleaved),
    ("grounded", "grit"): _webdataset_reader(_grounded),
    ("text", "jsonl"): json_reader(_text),
    ("chat", "llava"): json_reader(_chat),
    ("edits", "jsonl"): json_reader(_edits),
}
