"""Record -> Example: decoding a TFDS record and calling its data type's sequence builder.

`Processor` is the pipeline's random_map function. Each source names a builder (`RECORD_KINDS`:
the builder and the record kind it reads); bad input becomes a `Skipped` marker the pipeline
counts instead of an example.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from emu2_jax.data import images as im
from emu2_jax.data import sequences as sq
from emu2_jax.data.assembly import Context
from emu2_jax.data.skips import SkipExample, Skipped

# builder -> record kind it reads (sources.KINDS)
RECORD_KINDS = {
    "image_text": "pairs", "video_text": "videos", "interleaved": "interleaved",
    "grounded": "grounded", "text": "text", "chat": "chat", "gen_t2i": "pairs",
    "gen_grounded": "grounded", "gen_edit": "edits", "decoder": "pairs",
    "video_decoder": "videos",
}


@dataclasses.dataclass(frozen=True)
class Options:
    """What the builders need: the encoder's image size and the data config fields of the same
    names (configs/common.py documents them)."""
    image_size: int
    resize_mode: str
    image_first_prob: float
    regress_images: bool
    video_frames: int
    video_frame_stride: int
    chat_video_frames: tuple[int, ...]
    interleaved_max_images: int
    interleaved_max_len: int
    phrase_first_prob: float
    gen_drop_entity_prob: float
    decoder_image_size: int
    decoder_min_size: int
    decoder_random_crop: bool
    max_document_chars: int

    @classmethod
    def config_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "image_size")

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict, image_size: int) -> Options:
        values = {name: data_config[name] for name in cls.config_fields()}
        values["chat_video_frames"] = tuple(values["chat_video_frames"])
        return cls(image_size=image_size, **values)


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
class Processor:
    """random_map function: raw TFDS record -> Example (decoder: a row of `layout.DECODER`), or
    Skipped(reason)."""
    builder: str
    ctx: Context
    opts: Options

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

    def _video_decoder(self, r, rng):
        """A clip of `video_frames` frames `video_frame_stride` apart (random start; uniform
        sampling when the video is shorter), as a row of `layout.VIDEO_DECODER`."""
        encoded, n = r["frames"], self.opts.video_frames
        span = (n - 1) * self.opts.video_frame_stride + 1
        if len(encoded) < 1:
            raise SkipExample("bad_image", "video without frames")
        if len(encoded) >= span:
            start = int(rng.integers(0, len(encoded) - span + 1))
            indices = range(start, start + span, self.opts.video_frame_stride)
        else:
            indices = im.sample_frame_indices(len(encoded), n)
        rows = [im.decoder_target(im.decode_image(encoded[i]), decoder_size=self.opts.decoder_image_size,
                                  encoder_size=self.opts.image_size, rng=None) for i in indices]
        return {"frames": np.stack([im.normalize(x["image"]) for x in rows]),
                "target_frames": np.stack([x["target_image"] for x in rows])}

    def _decoder(self, r, rng):
        pixels = im.decode_image(r["image"])
        if min(pixels.shape[:2]) < self.opts.decoder_min_size:
            raise SkipExample("too_small", f"{pixels.shape[:2]}")
        row = im.decoder_target(pixels, decoder_size=self.opts.decoder_image_size,
                                encoder_size=self.opts.image_size,
                                rng=rng if self.opts.decoder_random_crop else None)
        return {"images": im.normalize(row.pop("image")), "target_images": row.pop("target_image"),
                **row}
