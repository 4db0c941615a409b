"""TFDS builders that ingest Emu2's corpora from local files into ArrayRecord, and the embedded
dataset shipped in `embedded/`.

One builder per record kind; each takes a `SourceConfig` naming the on-disk format and paths:

- pairs (embedded, webdataset): tar shards of `key.{jpg,png,webp}` + `key.txt` (or `key.json`
  with "caption"), as img2dataset writes LAION / CapsFusion;
- videos (embedded, webdataset): tar shards of `key.txt` + pre-extracted frames `key.<n>.jpg`;
- interleaved (embedded, mmc4): MMC4 jsonl (`text_list`, `image_info[].image_name` /
  `matched_text_index`) + a folder with the downloaded images;
- grounded (embedded, grit): tar shards of `key.jpg` + `key.json` with GRIT's `caption` and
  `noun_chunks` ([start, end, x1, y1, x2, y2, score], boxes normalised to the image);
- text (embedded, jsonl): jsonl with a "text" field (Pile);
- chat (embedded, llava): LLaVA json / jsonl (`conversations` human/gpt turns, `<image>` tag,
  optional "image") + an image folder;
- edits (embedded, jsonl): jsonl with "source", "target" (paths under image_dir), "instruction".

Records keep encoded image bytes and raw text bytes as plain `Tensor(dtype=object)` features, so
neither writing nor reading needs TensorFlow; decoding and validation happen in the input
pipeline, where bad examples are counted. What ingestion itself has to drop (unreadable lines,
incomplete samples, missing image files) is counted per reason, logged and stored in the
dataset's metadata ("ingest_skips"). A source without a single usable record is an error naming
its paths. `paths` accepts globs, `{000..123}` ranges and comma-separated lists.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import tarfile
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from emu2_jax.data import images as im
from emu2_jax.data import tokenizer as tk

log = logging.getLogger(__name__)

EMBEDDED_DIR = tk.EMBEDDED_DIR
DEFAULT_CACHE_DIR = "~/.cache/emu2_jax/tfds"
CACHE_ENV = "EMU2_JAX_DATA_CACHE"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KINDS = ("pairs", "videos", "interleaved", "grounded", "text", "chat", "edits")
FORMATS = {
    "pairs": ("embedded", "webdataset"),
    "videos": ("embedded", "webdataset"),
    "interleaved": ("embedded", "mmc4"),
    "grounded": ("embedded", "grit"),
    "text": ("embedded", "jsonl"),
    "chat": ("embedded", "llava"),
    "edits": ("embedded", "jsonl"),
}
EMBEDDED_FRAME_SIZE = 224  # embedded videos: camera moves over a photo, frames of this size


def _bytes_feature():
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def _seq(feature):
    return tfds.features.Sequence(feature)


FEATURES = {
    "pairs": lambda: {"key": _bytes_feature(), "image": _bytes_feature(),
                      "caption": _bytes_feature()},
    "videos": lambda: {"key": _bytes_feature(), "frames": _seq(_bytes_feature()),
                       "caption": _bytes_feature()},
    "interleaved": lambda: {
        "key": _bytes_feature(), "sentences": _seq(_bytes_feature()),
        "images": _seq(_bytes_feature()),
        "image_sentence": _seq(tfds.features.Tensor(shape=(), dtype=np.int32))},
    "grounded": lambda: {
        "key": _bytes_feature(), "image": _bytes_feature(), "caption": _bytes_feature(),
        "spans": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32)},
    "text": lambda: {"key": _bytes_feature(), "text": _bytes_feature()},
    "chat": lambda: {
        "key": _bytes_feature(), "system": _bytes_feature(),
        "grounding": tfds.features.Tensor(shape=(), dtype=np.bool_),
        "users": _seq(_bytes_feature()), "assistants": _seq(_bytes_feature()),
        "images": _seq(_bytes_feature()), "video_frames": _seq(_bytes_feature()),
        "video_lengths": _seq(tfds.features.Tensor(shape=(), dtype=np.int32))},
    "edits": lambda: {"key": _bytes_feature(), "source": _bytes_feature(),
                      "target": _bytes_feature(), "instruction": _bytes_feature()},
}


class SourceConfig(tfds.core.BuilderConfig):
    """Where a source's raw files are. `name` is derived from the format and a hash of the
    inputs, so a change of files gives a fresh cache entry."""

    def __init__(self, *, fmt: str, paths: Sequence[str] = (), image_dir: str = "",
                 system: str = "chat", **kwargs):
        super().__init__(**kwargs)
        self.fmt, self.paths, self.image_dir, self.system = fmt, tuple(paths), image_dir, system


class _Emu2Builder(tfds.core.GeneratorBasedBuilder):
    """Shared plumbing: features per kind, one 'train' split, ingest skip counting."""

    VERSION = tfds.core.Version("1.0.0")
    KIND = ""
    # No download checksums to look up; TFDS 4.9's lookup of them imports `importlib_resources`,
    # which it only declares for Python < 3.9.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=f"Emu2 {self.KIND} records ({self.builder_config.fmt})",
            features=tfds.features.FeaturesDict(FEATURES[self.KIND]()),
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        cfg: SourceConfig = self.builder_config
        skips: Counter = Counter()
        reader = _READERS[(self.KIND, cfg.fmt)]
        count = 0
        for key, record in reader(cfg, skips):
            count += 1
            yield key, record
        self.info.metadata["ingest_skips"] = dict(skips)
        if skips:
            log.warning("ingesting %s %s from %s skipped %s", self.KIND, cfg.fmt,
                        _describe(cfg), dict(skips))
        if count == 0:
            raise ValueError(f"no usable {self.KIND} record in {_describe(cfg)} "
                             f"(skipped: {dict(skips) or 'nothing found'})")


def _describe(cfg: SourceConfig) -> str:
    if cfg.fmt == "embedded":
        return str(EMBEDDED_DIR)
    where = ", ".join(cfg.paths)
    return where + (f" (images under {cfg.image_dir})" if cfg.image_dir else "")


class Emu2Pairs(_Emu2Builder):
    KIND = "pairs"


class Emu2Videos(_Emu2Builder):
    KIND = "videos"


class Emu2Interleaved(_Emu2Builder):
    KIND = "interleaved"


class Emu2Grounded(_Emu2Builder):
    KIND = "grounded"


class Emu2Text(_Emu2Builder):
    KIND = "text"


class Emu2Chat(_Emu2Builder):
    KIND = "chat"


class Emu2Edits(_Emu2Builder):
    KIND = "edits"


BUILDERS = {cls.KIND: cls for cls in (Emu2Pairs, Emu2Videos, Emu2Interleaved, Emu2Grounded,
                                      Emu2Text, Emu2Chat, Emu2Edits)}


# ------------------------------------------------------------------------------------------------
# Preparing and opening a source
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PreparedSource:
    data_source: Any            # random-access ArrayRecord source (len, __getitem__)
    ingest_skips: dict[str, int]
    description: str            # the paths, for error messages


def cache_dir(configured: str = "") -> pathlib.Path:
    return pathlib.Path(configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def prepare_source(kind: str, fmt: str, *, paths: str | Sequence[str] = "", image_dir: str = "",
                   system: str = "chat", data_dir: str = "") -> PreparedSource:
    """Builds the ArrayRecord dataset for a source if it is not cached yet, then opens it with
    `as_data_source`. The embedded dataset builds in about a second on first use."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    if fmt not in FORMATS[kind]:
        raise ValueError(f"{kind} records cannot be read from format {fmt!r}; "
                         f"supported: {FORMATS[kind]}")
    if fmt == "embedded":
        files, digest_inputs = [], [_embedded_digest()]
    else:
        files = expand_paths(paths)
        if image_dir and not os.path.isdir(os.path.expanduser(image_dir)):
            raise FileNotFoundError(f"image_dir {image_dir!r} is not a directory")
        digest_inputs = [f"{f}:{os.path.getsize(f)}:{os.path.getmtime(f)}" for f in files]
        digest_inputs += [os.path.expanduser(image_dir), system]
    digest = hashlib.sha1("\n".join(digest_inputs).encode()).hexdigest()[:12]
    config = SourceConfig(name=f"{fmt}-{digest}", fmt=fmt, paths=files,
                          image_dir=os.path.expanduser(image_dir), system=system,
                          description=f"{fmt} {kind}")
    builder = BUILDERS[kind](config=config, data_dir=str(cache_dir(data_dir)))
    if not builder.is_prepared():
        tfds.disable_progress_bar()
        builder.download_and_prepare(file_format="array_record")
    metadata = builder.info.metadata or {}
    return PreparedSource(builder.as_data_source(split="train"),
                          dict(metadata.get("ingest_skips", {})), _describe(config))


def _embedded_digest() -> str:
    h = hashlib.sha1()
    for path in sorted(EMBEDDED_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".jsonl", ".jpg", ".png"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


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
# Readers: (SourceConfig, skip counter) -> iterator of (key, record)
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


def _read_pairs_webdataset(cfg: SourceConfig, skips: Counter):
    for path in cfg.paths:
        for key, group in _iter_webdataset(path, skips):
            image, caption = _first_image(group), _caption_bytes(group)
            if image is None or caption is None:
                skips["bad_record"] += 1
                continue
            yield key, {"key": key.encode(), "image": image, "caption": caption}


_FRAME_RE = re.compile(r"^(\d+)\.(jpg|jpeg|png)$")


def _read_videos_webdataset(cfg: SourceConfig, skips: Counter):
    for path in cfg.paths:
        for key, group in _iter_webdataset(path, skips):
            frames = sorted((int(m.group(1)), data) for ext, data in group.items()
                            if (m := _FRAME_RE.match(ext)))
            caption = _caption_bytes(group)
            if not frames or caption is None:
                skips["bad_record"] += 1
                continue
            yield key, {"key": key.encode(), "frames": [d for _, d in frames], "caption": caption}


def _grounded_record(key: str, image: bytes, meta: dict) -> dict:
    chunks = np.asarray(meta.get("noun_chunks") or np.zeros((0, 7)), np.float64).reshape(-1, 7)
    return {"key": key.encode(), "image": image, "caption": meta["caption"].encode("utf-8"),
            "spans": chunks[:, :2].astype(np.int32), "boxes": chunks[:, 2:6].astype(np.float32)}


def _read_grounded_grit(cfg: SourceConfig, skips: Counter):
    for path in cfg.paths:
        for key, group in _iter_webdataset(path, skips):
            image = _first_image(group)
            try:
                meta = json.loads(group["json"])
                record = _grounded_record(key, image, meta) if image is not None else None
            except (KeyError, ValueError, TypeError, AttributeError):
                record = None
            if record is None:
                skips["bad_record"] += 1
                continue
            yield key, record


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
    path = os.path.join(image_dir, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        skips["missing_file"] += 1
        return None


def _interleaved_record(key: str, doc: dict, image_dir: str, skips: Counter) -> dict | None:
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


def _read_interleaved_mmc4(cfg: SourceConfig, skips: Counter):
    for path in cfg.paths:
        for i, doc in _iter_json_lines(path, skips):
            key = f"{os.path.basename(path)}/{i}"
            try:
                record = _interleaved_record(key, doc, cfg.image_dir, skips)
            except (KeyError, TypeError, ValueError, AttributeError):
                skips["bad_record"] += 1
                continue
            if record is not None:
                yield key, record


def _read_text_jsonl(cfg: SourceConfig, skips: Counter):
    for path in cfg.paths:
        for i, row in _iter_json_lines(path, skips):
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                skips["bad_record"] += 1
                continue
            key = f"{os.path.basename(path)}/{i}"
            yield key, {"key": key.encode(), "text": text.encode("utf-8")}


def _chat_record(key: str, system: str, turns: list[tuple[str, str]], images: list[bytes],
                 videos: list[list[bytes]], grounding: bool) -> dict:
    return {"key": key.encode(), "system": system.encode("utf-8"), "grounding": grounding,
            "users": [u.encode("utf-8") for u, _ in turns],
            "assistants": [a.encode("utf-8") for _, a in turns],
            "images": images, "video_frames": [f for v in videos for f in v],
            "video_lengths": [len(v) for v in videos]}


def _read_chat_llava(cfg: SourceConfig, skips: Counter):
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
            yield key, _chat_record(key, cfg.system, turns, images, [], False)


def _read_edits_jsonl(cfg: SourceConfig, skips: Counter):
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


# -- embedded ------------------------------------------------------------------------------------

def _embedded_rows(name: str) -> list[dict]:
    with open(EMBEDDED_DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _embedded_image(name: str) -> bytes:
    return (EMBEDDED_DIR / "images" / name).read_bytes()


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def camera_motion_frames(pixels: np.ndarray, motion: str, num_frames: int,
                         size: int = EMBEDDED_FRAME_SIZE) -> list[np.ndarray]:
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


def _embedded_video(name: str, motion: str, num_frames: int) -> list[bytes]:
    pixels = im.decode_image(_embedded_image(name))
    return [_jpeg(f) for f in camera_motion_frames(pixels, motion, num_frames)]


def _read_embedded(kind: str):
    def reader(cfg: SourceConfig, skips: Counter):
        del cfg, skips
        for i, row in enumerate(_embedded_rows(f"{kind}.jsonl")):
            key = f"{kind}/{i}"
            if kind == "pairs":
                record = {"image": _embedded_image(row["image"]),
                          "caption": row["caption"].encode()}
            elif kind == "videos":
                record = {"frames": _embedded_video(row["image"], row["motion"],
                                                    row["num_frames"]),
                          "caption": row["caption"].encode()}
            elif kind == "interleaved":
                record = _interleaved_record(key, row, str(EMBEDDED_DIR / "images"), Counter())
            elif kind == "grounded":
                record = _grounded_record(key, _embedded_image(row["image"]), row)
            elif kind == "text":
                record = {"text": row["text"].encode()}
            elif kind == "chat":
                turns = [(t["user"], t["assistant"]) for t in row["turns"]]
                videos = [_embedded_video(v["image"], v["motion"], v["num_frames"])
                          for v in row["videos"]]
                record = _chat_record(key, row["system"], turns,
                                      [_embedded_image(n) for n in row["images"]], videos,
                                      row["grounding"])
            else:
                source = im.decode_image(_embedded_image(row["image"]))
                record = {"source": _embedded_image(row["image"]),
                          "target": _jpeg(np.ascontiguousarray(apply_edit(source, row["edit"]))),
                          "instruction": row["instruction"].encode()}
            record["key"] = key.encode()
            yield key, record
    return reader


_READERS = {
    **{(kind, "embedded"): _read_embedded(kind) for kind in KINDS},
    ("pairs", "webdataset"): _read_pairs_webdataset,
    ("videos", "webdataset"): _read_videos_webdataset,
    ("interleaved", "mmc4"): _read_interleaved_mmc4,
    ("grounded", "grit"): _read_grounded_grit,
    ("text", "jsonl"): _read_text_jsonl,
    ("chat", "llava"): _read_chat_llava,
    ("edits", "jsonl"): _read_edits_jsonl,
}
