"""Grain input pipeline for every Emu2 training stage.

Interface used by the training code:

    tokenizer = load_tokenizer(data_config.tokenizer_path or None)        # emu2_jax.data.tokenizer
    it = create_train_iterator(data_config, tokenizer=tokenizer, seq_len=L, batch_size=B,
                               image_size=S, n_query=n, v_query=v, max_images_per_row=N,
                               seed=seed, shard_index=jax.process_index(),
                               shard_count=jax.process_count())
    batch = next(it)          # dict of numpy arrays, per host
    it.get_state() / it.set_state(state)   # JSON-serialisable; grain.checkpoint.CheckpointSave(it)
    it.stats()                # {'data/skipped/<reason>': n, 'data/examples': n, ...} for logging
    it.close()                # stops worker processes

Batches (stages stage1, stage2, chat, gen) follow notes/batch.md exactly: tokens, targets,
text_loss_mask, image_loss_mask, segment_ids, positions [B, L]; images [B, N, S, S, 3] (CLIP
normalised, zeros in padding slots); image_valid, image_is_frame [B, N].
The 'decoder' stage (visual-decoder autoencoding) yields instead:
    images         float32 [B, S, S, 3]  encoder input (CLIP-normalised) of the crop below
    target_images  float32 [B, D, D, 3]  the crop at decoder resolution D, in [-1, 1]
    original_size  int32 [B, 2]  (height, width) before resizing   } SDXL micro-conditioning,
    crop_coords    int32 [B, 2]  (top, left) of the crop           } time_ids = concat of the
    target_size    int32 [B, 2]  (D, D)                            } three
`default_data_config(stage, tiny)` gives the data config of a stage (fields documented there);
tiny configs read the embedded dataset shipped in emu2_jax/data/embedded (no download; built into
TFDS ArrayRecord under the cache dir on first use).

Pipeline per source (host shard of a TFDS ArrayRecord source): shard by process index ->
seeded shuffle (reshuffled every epoch) -> repeat -> random_map(decode + build one Example, or a
`Skipped` marker for bad input) -> packing into rows of seq_len tokens / N image slots (greedy, in
order; text-only documents continue across rows) -> mixing of the sources' rows (deterministic,
proportional to the per-source weights, counted in examples or rows) -> batch -> optional worker
processes (`mp_prefetch`) -> skip/example counters. Every stage keeps checkpointable state.
"""
from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Sequence

import grain
import ml_collections
from absl import flags
import numpy as np

from emu2_jax.data import images as im
from emu2_jax.data import sequences as sq
from emu2_jax.data import sources as src
from emu2_jax.data import tokenizer as tk
from emu2_jax.data.skips import REASON_INDEX, REASONS, SkipExample, Skipped

log = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "chat", "gen", "decoder")
# builder -> record kind it reads
BUILDERS = {
    "image_text": "pairs", "video_text": "videos", "interleaved": "interleaved",
    "grounded": "grounded", "text": "text", "chat": "chat", "gen_t2i": "pairs",
    "gen_grounded": "grounded", "gen_edit": "edits", "decoder": "pairs",
}


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

def _source(builder: str, fmt: str, weight: float, *, paths: str = "", image_dir: str = "",
            system: str = "chat") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(builder=builder, format=fmt, paths=paths,
                                          image_dir=image_dir, weight=float(weight),
                                          system=system))


def _stage_sources(stage: str, tiny: bool) -> dict[str, ml_collections.ConfigDict]:
    """Per-source weights are the paper's per-type global batch sizes (SPEC.md §8)."""
    if tiny:
        e = "embedded"
        table = {
            "stage1": {"pairs": _source("image_text", e, 6144),
                       "videos": _source("video_text", e, 768)},
            "stage2": {"pairs": _source("image_text", e, 6400),
                       "grounded": _source("grounded", e, 6400),
                       "videos": _source("video_text", e, 6400),
                       "interleaved": _source("interleaved", e, 3200),
                       "text": _source("text", e, 800)},
            "chat": {"chat": _source("chat", e, 1)},
            "gen": {"t2i": _source("gen_t2i", e, 4096),
                    "grounded": _source("gen_grounded", e, 3584),
                    "edits": _source("gen_edit", e, 2048)},
            "decoder": {"images": _source("decoder", e, 1)},
        }
    else:
        table = {
            "stage1": {"laion_capsfusion": _source("image_text", "webdataset", 6144),
                       "webvid": _source("video_text", "webdataset", 768)},
            "stage2": {"laion_capsfusion": _source("image_text", "webdataset", 6400),
                       "grit": _source("grounded", "grit", 6400),
                       "webvid": _source("video_text", "webdataset", 6400),
                       "mmc4": _source("interleaved", "mmc4", 3200),
                       "pile": _source("text", "jsonl", 800)},
            "chat": {"llava": _source("chat", "llava", 1, system="chat"),
                     "academic": _source("chat", "llava", 1, system="academic")},
            "gen": {"t2i": _source("gen_t2i", "webdataset", 4096),
                    "grit": _source("gen_grounded", "grit", 3584),
                    "instructpix2pix": _source("gen_edit", "jsonl", 2048)},
            "decoder": {"laion_aesthetics": _source("decoder", "webdataset", 1)},
        }
    return table[stage]


def default_data_config(stage: str, tiny: bool) -> ml_collections.ConfigDict:
    """Data config of a training stage.

    Fields:
      stage: one of STAGES.
      tokenizer_path: sentencepiece model; "" = the embedded 1024-piece model (tiny), the LLaMA
        `tokenizer.model` for real runs (pass `tokenizer_path or None` to `load_tokenizer`).
      cache_dir: where TFDS ArrayRecord builds go; "" = $EMU2_JAX_DATA_CACHE or
        ~/.cache/emu2_jax/tfds.
      sources.<name>: builder (image_text, video_text, interleaved, grounded, text, chat,
        gen_t2i, gen_grounded, gen_edit, decoder), format (embedded, webdataset, mmc4, grit,
        jsonl, llava; see sources.py), paths (globs / {a..b} ranges / comma list), image_dir
        (mmc4, llava, jsonl edits), system (llava: 'chat' | 'academic' | literal text),
        weight (relative share; 0 disables the source).
      balance: 'samples' (weights are shares of examples, like the paper's per-type batch sizes)
        or 'rows' (shares of packed rows).
      num_workers: grain worker processes (0 = in-process); worker_buffer_size: batches buffered
        per worker; read_threads / read_buffer_size: decode threads and their read-ahead.
      shuffle: seeded, reshuffled every epoch; num_epochs: 0 = repeat forever.
      resize_mode: 'squash' (Emu2's Resize((S, S))) or 'center_crop'.
      image_first_prob: image before its caption (stage 1: 1.0; stage 2: 0.5), also for videos
        and the images of interleaved documents; regress_images: regression loss on the images
        of pairs / videos / interleaved / grounded data (stage 2).
      video_frames: frames per video in pretraining; chat_video_frames: choices in chat.
      interleaved_max_images / interleaved_max_len: N = 8 images in L = 1024 tokens per document.
      phrase_first_prob: grounded phrase before its box (0.7).
      gen_drop_entity_prob: Emu2-Gen drops an entity's box + subject image to plain text.
      decoder_image_size / decoder_min_size / decoder_random_crop: visual-decoder targets.
      max_document_chars: longer texts are skipped as 'too_long'.
      max_consecutive_skips: a source with this many bad records in a row (or twice its size)
        is an error naming its paths.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    cfg = ml_collections.ConfigDict()
    cfg.stage = stage
    cfg.tokenizer_path = ""
    cfg.cache_dir = ""
    cfg.sources = ml_collections.ConfigDict(_stage_sources(stage, tiny))
    cfg.balance = "samples"
    cfg.num_workers = 0 if tiny else 8
    cfg.worker_buffer_size = 2
    cfg.read_threads = 1 if tiny else 4
    cfg.read_buffer_size = 8 if tiny else 16  # decoded examples held per source and worker
    cfg.shuffle = True
    cfg.num_epochs = 0
    cfg.resize_mode = "squash"
    cfg.image_first_prob = 1.0 if stage == "stage1" else 0.5
    cfg.regress_images = stage == "stage2"
    cfg.video_frames = 4 if tiny else 8
    cfg.chat_video_frames = (2, 3, 4) if tiny else (8, 12, 16)
    cfg.interleaved_max_images = 4 if tiny else 8
    cfg.interleaved_max_len = 1024
    cfg.phrase_first_prob = 0.7
    cfg.gen_drop_entity_prob = 0.1
    cfg.decoder_image_size = 64 if tiny else 1024
    cfg.decoder_min_size = 0 if tiny else 512
    cfg.decoder_random_crop = True
    cfg.max_document_chars = 1_000_000
    cfg.max_consecutive_skips = 1000
    return cfg


# ------------------------------------------------------------------------------------------------
# Record -> Example
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Options:
    image_size: int
    resize_mode: str
    image_first_prob: float
    regress_images: bool
    video_frames: int
    chat_video_frames: tuple[int, ...]
    interleaved_max_images: int
    interleaved_max_len: int
    phrase_first_prob: float
    gen_drop_entity_prob: float
    decoder_image_size: int
    decoder_min_size: int
    decoder_random_crop: bool
    max_document_chars: int


class _LazyImages(Sequence):
    """Decodes a document's images only when a builder touches them (MMC4 documents often hold
    more images than the window uses)."""

    def __init__(self, encoded: Sequence[bytes], load):
        self._encoded, self._load, self._cache = encoded, load, {}

    def __len__(self) -> int:
        return len(self._encoded)

    def __getitem__(self, i):
        if i not in self._cache:
            self._cache[i] = self._load(self._encoded[i])
        return self._cache[i]


@dataclasses.dataclass(frozen=True)
class _Processor:
    """random_map function: raw TFDS record -> Example (or decoder dict), or Skipped(reason)."""
    builder: str
    ctx: sq.Context
    opts: _Options

    def __call__(self, record: dict[str, Any], rng: np.random.Generator):
        try:
            return getattr(self, "_" + self.builder)(record, rng)
        except SkipExample as e:
            return Skipped(e.reason)

    def _utf8(self, raw: bytes) -> str:
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise SkipExample("bad_text", "not UTF-8") from None
        if len(text) > self.opts.max_document_chars:
            raise SkipExample("too_long", f"{len(text)} characters")
        return text

    def _image(self, raw: bytes) -> np.ndarray:
        return im.resize_for_encoder(im.decode_image(raw), self.opts.image_size,
                                     self.opts.resize_mode)

    def _frames(self, encoded: Sequence[bytes], num_frames: int) -> list[np.ndarray]:
        num_frames = min(num_frames, self.ctx.max_images)
        return [self._image(encoded[i]) for i in im.sample_frame_indices(len(encoded), num_frames)]

    def _image_text(self, r, rng):
        return sq.build_image_text(self.ctx, self._utf8(r["caption"]), self._image(r["image"]),
                                   rng, image_first_prob=self.opts.image_first_prob,
                                   regress_image=self.opts.regress_images)

    def _video_text(self, r, rng):
        caption = self._utf8(r["caption"])
        if not len(r["frames"]):
            raise SkipExample("bad_image", "video without frames")
        return sq.build_video_text(self.ctx, caption,
                                   self._frames(r["frames"], self.opts.video_frames), rng,
                                   video_first_prob=self.opts.image_first_prob,
                                   regress_frames=self.opts.regress_images)

    def _interleaved(self, r, rng):
        sentences = [self._utf8(s) for s in r["sentences"]]
        if sum(map(len, sentences)) > self.opts.max_document_chars:
            raise SkipExample("too_long", "document")
        return sq.build_interleaved(
            self.ctx, sentences, _LazyImages(r["images"], self._image),
            list(r["image_sentence"]), rng, max_images=self.opts.interleaved_max_images,
            max_len=self.opts.interleaved_max_len, image_first_prob=self.opts.image_first_prob,
            regress_images=self.opts.regress_images)

    def _grounded(self, r, rng):
        return sq.build_grounded(self.ctx, self._utf8(r["caption"]), r["spans"], r["boxes"],
                                 self._image(r["image"]), rng,
                                 phrase_first_prob=self.opts.phrase_first_prob,
                                 regress_image=self.opts.regress_images)

    def _text(self, r, rng):
        del rng
        return sq.build_text(self.ctx, self._utf8(r["text"]))

    def _chat(self, r, rng):
        turns = [(self._utf8(u), self._utf8(a)) for u, a in zip(r["users"], r["assistants"])]
        videos, start = [], 0
        for length in r["video_lengths"]:
            frames = r["video_frames"][start:start + length]
            start += length
            if not length:
                raise SkipExample("bad_image", "video without frames")
            videos.append(self._frames(frames, int(rng.choice(self.opts.chat_video_frames))))
        return sq.build_chat(self.ctx, turns, system=self._utf8(r["system"]),
                             images=[self._image(x) for x in r["images"]], videos=videos,
                             grounding=bool(r["grounding"]))

    def _gen_t2i(self, r, rng):
        del rng
        return sq.build_gen_t2i(self.ctx, self._utf8(r["caption"]), self._image(r["image"]))

    def _gen_grounded(self, r, rng):
        return sq.build_gen_grounded(
            self.ctx, self._utf8(r["caption"]), r["spans"], r["boxes"],
            im.decode_image(r["image"]), rng, drop_entity_prob=self.opts.gen_drop_entity_prob,
            image_size=self.opts.image_size, resize_mode=self.opts.resize_mode)

    def _gen_edit(self, r, rng):
        del rng
        return sq.build_gen_edit(self.ctx, self._utf8(r["instruction"]), self._image(r["source"]),
                                 self._image(r["target"]))

    def _decoder(self, r, rng):
        pixels = im.decode_image(r["image"])
        if min(pixels.shape[:2]) < self.opts.decoder_min_size:
            raise SkipExample("too_small", f"{pixels.shape[:2]}")
        return im.decoder_target(pixels, decoder_size=self.opts.decoder_image_size,
                                 encoder_size=self.opts.image_size,
                                 rng=rng if self.opts.decoder_random_crop else None)


# ------------------------------------------------------------------------------------------------
# Checkpointable iterator stages
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _SourceInfo:
    index: int
    count: int           # number of sources (shape of the skip counters)
    name: str
    description: str
    skip_limit: int


class _SkipTracker:
    """Counts Skipped markers of one source and fails when it yields nothing usable."""

    def __init__(self, info: _SourceInfo, consecutive: int = 0):
        self.info = info
        self.consecutive = consecutive
        self.recent: dict[str, int] = {}
        self.counts = np.zeros((info.count, len(REASONS)), np.int64)

    def observe(self, element) -> bool:
        """True if `element` is usable, False (after counting) if it is a Skipped marker."""
        if not isinstance(element, Skipped):
            self.consecutive, self.recent = 0, {}
            return True
        self.counts[self.info.index, REASON_INDEX[element.reason]] += 1
        self.consecutive += 1
        self.recent[element.reason] = self.recent.get(element.reason, 0) + 1
        if self.consecutive >= self.info.skip_limit:
            raise ValueError(
                f"data source {self.info.name!r} ({self.info.description}) yielded no usable "
                f"example in {self.consecutive} consecutive records; skipped: {self.recent}")
        return False

    def take(self) -> np.ndarray:
        counts, self.counts = self.counts, np.zeros_like(self.counts)
        return counts


class _PackRows(grain.IterDataset):
    """Examples (and Skipped markers) of one source -> packed rows with counters attached."""

    def __init__(self, parent: grain.IterDataset, info: _SourceInfo, *, seq_len: int,
                 max_images: int, image_size: int, pad_id: int):
        super().__init__(parent)
        self.info = info
        self.geometry = (seq_len, max_images, image_size, pad_id)

    def __iter__(self):
        return _PackRowsIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"_PackRows({self.info.name})"


class _PackRowsIterator(grain.DatasetIterator):
    """State: the parent's state before the example that did not fit yet (re-read on restore)
    and how much of it (a split text document) was already emitted."""

    def __init__(self, parent: grain.DatasetIterator, ds: _PackRows):
        super().__init__(parent)
        self._info = ds.info
        self._packer = sq.RowPacker(*ds.geometry)
        self._skips = _SkipTracker(ds.info)
        self._pending: sq.Example | None = None
        self._pending_state: dict | None = None
        self._offset = 0
        self._resume_offset = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self._pending is None:
                state = self._parent.get_state()
                try:
                    element = next(self._parent)
                except StopIteration:
                    if self._packer.used:
                        break
                    raise
                if not self._skips.observe(element):
                    continue
                self._pending, self._pending_state = element, state
                self._offset, self._resume_offset = self._resume_offset, 0
            new = sq.place(self._packer, self._pending, self._offset)
            progressed, self._offset = new != self._offset, new
            if new >= len(self._pending):
                self._pending, self._offset = None, 0
            if not progressed or self._packer.free == 0:
                break
        examples = np.zeros(self._info.count, np.int64)
        examples[self._info.index] = self._packer.samples
        row = self._packer.finish()
        row["_skips"], row["_examples"] = self._skips.take(), examples
        return row

    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            parent, offset = self._pending_state, self._offset
        else:
            parent, offset = self._parent.get_state(), self._resume_offset
        return {"parent": parent, "offset": int(offset),
                "consecutive_skips": int(self._skips.consecutive)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._pending_state, self._offset = None, None, 0
        self._resume_offset = int(state["offset"])
        self._skips = _SkipTracker(self._info, int(state["consecutive_skips"]))
        self._packer.reset()


class _DropSkipped(grain.IterDataset):
    """Decoder stage: one element per example, Skipped markers counted and dropped."""

    def __init__(self, parent: grain.IterDataset, info: _SourceInfo):
        super().__init__(parent)
        self.info = info

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__(), self.info)


class _DropSkippedIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, info: _SourceInfo):
        super().__init__(parent)
        self._info = info
        self._skips = _SkipTracker(info)

    def __next__(self) -> dict[str, np.ndarray]:
        element = next(self._parent)
        while not self._skips.observe(element):
            element = next(self._parent)
        examples = np.zeros(self._info.count, np.int64)
        examples[self._info.index] = 1
        return {**element, "_skips": self._skips.take(), "_examples": examples}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(),
                "consecutive_skips": int(self._skips.consecutive)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skips = _SkipTracker(self._info, int(state["consecutive_skips"]))


class _MixRows(grain.IterDataset):
    """Deterministic weighted interleaving of the sources' rows: the next row comes from the
    source whose count (examples or rows so far) divided by its weight is smallest, so the
    long-run shares match the weights exactly. Exhausted sources (finite epochs) drop out."""

    def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float],
                 balance: str):
        super().__init__(list(parents))
        if balance not in ("samples", "rows"):
            raise ValueError(f"balance must be 'samples' or 'rows', got {balance!r}")
        self.weights, self.balance = tuple(weights), balance

    def __iter__(self):
        return _MixRowsIterator([p.__iter__() for p in self._parents], self)


class _MixRowsIterator(grain.DatasetIterator):

    def __init__(self, parents: list[grain.DatasetIterator], ds: _MixRows):
        super().__init__(parents)
        self._weights, self._balance = ds.weights, ds.balance
        self._counts = [0] * len(parents)
        self._exhausted = [False] * len(parents)

    def __next__(self):
        while True:
            live = [k for k, done in enumerate(self._exhausted) if not done]
            if not live:
                raise StopIteration
            k = min(live, key=lambda k: (self._counts[k] / self._weights[k], k))
            try:
                row = next(self._parents[k])
            except StopIteration:
                self._exhausted[k] = True
                continue
            self._counts[k] += int(row["_examples"].sum()) if self._balance == "samples" else 1
            return row

    def get_state(self) -> dict[str, Any]:
        return {"parents": [p.get_state() for p in self._parents], "counts": list(self._counts),
                "exhausted": list(self._exhausted)}

    def set_state(self, state: dict[str, Any]) -> None:
        for parent, parent_state in zip(self._parents, state["parents"]):
            parent.set_state(parent_state)
        self._counts = [int(c) for c in state["counts"]]
        self._exhausted = [bool(e) for e in state["exhausted"]]


def _stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in ("_skips",
                                                                            "_examples")}
    batch["_skips"] = np.sum([r["_skips"] for r in rows], axis=0)
    batch["_examples"] = np.sum([r["_examples"] for r in rows], axis=0)
    return batch


def _stack_decoder(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    batch = _stack_rows(rows)
    batch["images"] = im.normalize(batch.pop("image"))
    batch["target_images"] = batch.pop("target_image")
    return batch


class _CollectStats(grain.IterDataset):
    """Last stage (main process): pops the counters off each batch and accumulates them."""

    def __init__(self, parent: grain.IterDataset, names: Sequence[str],
                 ingest: Sequence[dict[str, int]]):
        super().__init__(parent)
        self.names, self.ingest = tuple(names), tuple(ingest)

    def __iter__(self):
        return TrainIterator(self._parent.__iter__(), self)


class TrainIterator(grain.DatasetIterator):
    """What `create_train_iterator` returns: batches, get_state/set_state, stats()."""

    def __init__(self, parent: grain.DatasetIterator, ds: _CollectStats):
        super().__init__(parent)
        self._names, self._ingest = ds.names, ds.ingest
        self._skips = np.zeros((len(ds.names), len(REASONS)), np.int64)
        self._examples = np.zeros(len(ds.names), np.int64)
        self._logged = np.zeros_like(self._skips)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self._skips += batch.pop("_skips")
        self._examples += batch.pop("_examples")
        grown = self._skips >= np.maximum(2 * self._logged, 1)
        for s, r in zip(*np.nonzero(grown)):
            log.warning("data source %r: %d examples skipped so far for %s", self._names[s],
                        self._skips[s, r], REASONS[r])
            self._logged[s, r] = self._skips[s, r]
        return batch

    def stats(self) -> dict[str, int]:
        """Skips per reason (runtime: 'data/skipped/...', at ingest: 'data/ingest_skipped/...'),
        per source when non-zero, and examples consumed."""
        out = {"data/examples": int(self._examples.sum())}
        for s, name in enumerate(self._names):
            out[f"data/examples/{name}"] = int(self._examples[s])
        for r, reason in enumerate(REASONS):
            out[f"data/skipped/{reason}"] = int(self._skips[:, r].sum())
            out[f"data/ingest_skipped/{reason}"] = sum(i.get(reason, 0) for i in self._ingest)
            for s, name in enumerate(self._names):
                if self._skips[s, r]:
                    out[f"data/skipped/{name}/{reason}"] = int(self._skips[s, r])
        return out

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skips": self._skips.tolist(),
                "examples": self._examples.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skips = np.asarray(state["skips"], np.int64).reshape(self._skips.shape)
        self._examples = np.asarray(state["examples"], np.int64).reshape(self._examples.shape)
        self._logged = self._skips.copy()


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

def _seed(seed: int, *parts: Any) -> int:
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode())


def create_train_iterator(data_config: ml_collections.ConfigDict, *, tokenizer: tk.Tokenizer,
                          seq_len: int, batch_size: int, image_size: int, n_query: int,
                          v_query: int, max_images_per_row: int, seed: int, shard_index: int = 0,
                          shard_count: int = 1) -> TrainIterator:
    """Per-host iterator of training batches (see the module docstring for the batch layout).

    `batch_size` is per host; sharding takes records shard_index::shard_count of every source.
    Deterministic given `seed` (and the config); resumable with get_state/set_state.
    """
    cfg = data_config
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; expected one of {STAGES}")
    if min(seq_len, batch_size, image_size, n_query, v_query, max_images_per_row) < 1:
        raise ValueError("seq_len, batch_size, image_size, n_query, v_query and "
                         "max_images_per_row must all be positive")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
    active = [(name, s) for name, s in sorted(cfg.sources.items()) if s.weight > 0]
    if not active:
        raise ValueError("no data source with a positive weight in data.sources")
    decoder_stage = cfg.stage == "decoder"
    for name, s in active:
        if s.builder not in BUILDERS:
            raise ValueError(f"data.sources.{name}.builder {s.builder!r} not in {tuple(BUILDERS)}")
        if (s.builder == "decoder") != decoder_stage:
            raise ValueError(f"data.sources.{name}: builder {s.builder!r} does not belong to "
                             f"stage {cfg.stage!r}")
        if s.format != "embedded" and not s.paths:
            raise ValueError(f"data.sources.{name}.paths is empty: point it at the {s.format} "
                             f"files of this source, or set its weight to 0")
    ctx = sq.Context(tokenizer, n_query=n_query, v_query=v_query, max_len=seq_len,
                     max_images=max_images_per_row)
    opts = _Options(
        image_size=image_size, resize_mode=cfg.resize_mode,
        image_first_prob=cfg.image_first_prob, regress_images=cfg.regress_images,
        video_frames=cfg.video_frames, chat_video_frames=tuple(cfg.chat_video_frames),
        interleaved_max_images=cfg.interleaved_max_images,
        interleaved_max_len=cfg.interleaved_max_len, phrase_first_prob=cfg.phrase_first_prob,
        gen_drop_entity_prob=cfg.gen_drop_entity_prob, decoder_image_size=cfg.decoder_image_size,
        decoder_min_size=cfg.decoder_min_size, decoder_random_crop=cfg.decoder_random_crop,
        max_document_chars=cfg.max_document_chars)
    if cfg.video_frames > max_images_per_row:
        log.warning("video_frames=%d > max_images_per_row=%d: videos get %d frames",
                    cfg.video_frames, max_images_per_row, max_images_per_row)

    rows, names, ingest = [], [], []
    for k, (name, s) in enumerate(active):
        prepared = src.prepare_source(BUILDERS[s.builder], s.format, paths=s.paths,
                                      image_dir=s.image_dir, system=s.system,
                                      data_dir=cfg.cache_dir)
        ds = grain.MapDataset.source(prepared.data_source)[shard_index::shard_count]
        if len(ds) == 0:
            raise ValueError(f"data source {name!r} ({prepared.description}) has no record for "
                             f"shard {shard_index} of {shard_count}")
        info = _SourceInfo(k, len(active), name, prepared.description,
                           skip_limit=max(1, min(cfg.max_consecutive_skips, 2 * len(ds))))
        if cfg.shuffle:
            ds = ds.shuffle(seed=_seed(seed, name, "shuffle"))
        ds = ds.repeat(cfg.num_epochs or None)
        ds = ds.random_map(_Processor(s.builder, ctx, opts), seed=_seed(seed, name, "build"))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.read_buffer_size))
        if decoder_stage:
            rows.append(_DropSkipped(it, info))
        else:
            rows.append(_PackRows(it, info, seq_len=seq_len, max_images=max_images_per_row,
                                  image_size=image_size, pad_id=tokenizer.pad_id))
        names.append(name)
        ingest.append(prepared.ingest_skips)
    mixed = _MixRows(rows, [s.weight for _, s in active], cfg.balance)
    batched = mixed.batch(batch_size, drop_remainder=True,
                          batch_fn=_stack_decoder if decoder_stage else _stack_rows)
    if cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
            flags.FLAGS.mark_as_parsed()
        batched = batched.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    return iter(_CollectStats(batched, names, ingest))
