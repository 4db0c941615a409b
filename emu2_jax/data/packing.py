"""Rows: packing Examples into the fixed-size rows of a batch, and the batch invariants.

A row holds `seq_len` tokens and `max_images` image slots; examples are placed greedily in order
as segments (a text-only document may continue in the next row). The arrays are those of
`layout.LLM` (docs/batch.md).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from emu2_jax.data import images as im
from emu2_jax.data import layout
from emu2_jax.data import tokenizer as tk
from emu2_jax.data.assembly import Example


class RowPacker:
    """Fills one row of `seq_len` tokens / `max_images` image slots with example segments."""

    def __init__(self, seq_len: int, max_images: int, image_size: int, pad_id: int):
        self.seq_len, self.max_images, self.image_size, self.pad_id = (
            seq_len, max_images, image_size, pad_id)
        self.reset()

    def reset(self) -> None:
        n = self.seq_len
        self.tokens = np.full(n, self.pad_id, np.int32)
        self.targets = np.full(n, self.pad_id, np.int32)
        self.text_loss_mask = np.zeros(n, np.float32)
        self.image_loss_mask = np.zeros(n, np.float32)
        self.segment_ids = np.zeros(n, np.int32)
        self.positions = np.zeros(n, np.int32)
        self.images: list[np.ndarray] = []
        self.is_frame: list[bool] = []
        self.used = 0
        self.segments = 0
        self.samples = 0  # examples that start in this row

    @property
    def free(self) -> int:
        return self.seq_len - self.used

    def fits(self, ex: Example) -> bool:
        return len(ex) <= self.free and len(self.images) + len(ex.images) <= self.max_images

    def add(self, ex: Example, start: int = 0, stop: int | None = None) -> None:
        """Places ex[start:stop] as a new segment (a slice only for splittable examples)."""
        stop = len(ex) if stop is None else stop
        n = stop - start
        if n <= 0 or n > self.free or (start or stop < len(ex)) and not ex.splittable:
            raise ValueError(f"cannot place tokens [{start}, {stop}) of a {len(ex)}-token "
                             f"example in a row with {self.free} free")
        if len(self.images) + len(ex.images) > self.max_images:
            raise ValueError("too many images for the row")
        rows = slice(self.used, self.used + n)
        self.tokens[rows] = ex.tokens[start:stop]
        self.targets[self.used:self.used + n - 1] = ex.tokens[start + 1:stop]
        self.text_loss_mask[self.used:self.used + n - 1] = ex.text_target[start + 1:stop]
        self.image_loss_mask[self.used:self.used + n - 1] = ex.image_target[start + 1:stop]
        self.segments += 1
        self.segment_ids[rows] = self.segments
        self.positions[rows] = np.arange(n)
        for pixels in ex.images:
            if pixels.shape != (self.image_size, self.image_size, 3) or pixels.dtype != np.uint8:
                raise ValueError(f"image of {pixels.dtype}{list(pixels.shape)}, expected "
                                 f"uint8{[self.image_size, self.image_size, 3]}")
        self.images += ex.images
        self.is_frame += ex.is_frame
        self.samples += start == 0
        self.used += n

    def finish(self) -> dict[str, np.ndarray]:
        """The row as the arrays of `layout.LLM` without the batch dimension (images as uint8
        pixel rows, zeros in padding slots)."""
        n, s = self.max_images, self.image_size
        images = np.zeros((n, s, 3 * s), np.uint8)
        if self.images:
            images[:len(self.images)] = im.to_pixel_rows(np.stack(self.images))
        valid = np.zeros(n, bool)
        valid[:len(self.images)] = True
        frame = np.zeros(n, bool)
        frame[:len(self.is_frame)] = self.is_frame
        row = {
            "tokens": self.tokens, "targets": self.targets,
            "text_loss_mask": self.text_loss_mask, "image_loss_mask": self.image_loss_mask,
            "segment_ids": self.segment_ids, "positions": self.positions,
            "images": images, "image_valid": valid, "image_is_frame": frame,
        }
        self.reset()
        return row


def place(packer: RowPacker, ex: Example, offset: int = 0) -> int:
    """Puts as much of ex[offset:] into the row as it takes (all or nothing unless the example is
    splittable); returns the new offset, unchanged when nothing fit."""
    if ex.splittable:
        take = min(packer.free, len(ex) - offset)
        if take < min(2, len(ex) - offset):  # a 1-token piece of a longer document is useless
            return offset
        packer.add(ex, offset, offset + take)
        return offset + take
    if packer.fits(ex):
        packer.add(ex)
        return len(ex)
    if packer.used == 0:
        raise ValueError(f"{len(ex)}-token example with {len(ex.images)} images does not fit an "
                         f"empty row of {packer.seq_len} tokens / {packer.max_images} images")
    return offset


def check_batch(batch: Mapping[str, np.ndarray], tokenizer: tk.Tokenizer, n_query: int,
                v_query: int) -> None:
    """Validates a batch of `layout.LLM`: its shapes and dtypes (`layout.check` raises
    ValueError), then the invariants of docs/batch.md (AssertionError naming the row and the
    problem)."""
    layout.check(layout.LLM, batch)
    image_id, gimg_id = tokenizer.token_to_id(tk.IMAGE), tokenizer.token_to_id(tk.GIMG)
    img_id, img_end_id = tokenizer.token_to_id(tk.IMG), tokenizer.token_to_id(tk.IMG_END)
    for b in range(batch["tokens"].shape[0]):
        tokens, seg = batch["tokens"][b], batch["segment_ids"][b]
        valid, frame = batch["image_valid"][b], batch["image_is_frame"][b]
        assert not valid[np.argmin(valid):].any() or valid.all(), f"row {b}: valid slots not first"
        assert not batch["images"][b][~valid].any(), f"row {b}: an unused image slot is not zeros"
        still, frames = int((valid & ~frame).sum()), int((valid & frame).sum())
        assert (tokens == image_id).sum() == n_query * still, f"row {b}: <image> count"
        assert (tokens == gimg_id).sum() == v_query * frames, f"row {b}: [gIMG] count"
        starts, ends = np.flatnonzero(tokens == img_id), np.flatnonzero(tokens == img_end_id)
        assert len(starts) == len(ends) == still + frames, f"row {b}: unbalanced [IMG]/[/IMG]"
        for slot, (s, e) in enumerate(zip(starts, ends)):
            want = v_query if frame[slot] else n_query
            holder = gimg_id if frame[slot] else image_id
            assert e - s - 1 == want and (tokens[s + 1:e] == holder).all(), (
                f"row {b}: visual {slot} at {s} is not a full run of {want} placeholders")
            assert seg[s] == seg[e] != 0, f"row {b}: visual {slot} crosses a segment boundary"
        index = np.arange(len(seg))
        starts = np.maximum.accumulate(np.where(np.append(True, seg[1:] != seg[:-1]), index, 0))
        assert (batch["positions"][b] == np.where(seg > 0, index - starts, 0)).all(), (
            f"row {b}: positions do not count from 0 in each segment")
        nxt_same = np.append(seg[1:] == seg[:-1], False) & (seg != 0)
        text, regress = batch["text_loss_mask"][b] > 0, batch["image_loss_mask"][b] > 0
        assert not (text & ~nxt_same).any(), f"row {b}: text loss across a segment boundary"
        assert not (regress & ~nxt_same).any(), f"row {b}: image loss across a segment boundary"
        idx = np.flatnonzero(text)
        assert (batch["targets"][b][idx] == tokens[idx + 1]).all(), (
            f"row {b}: targets are not the next tokens")
        target_tokens = batch["targets"][b][text]
        assert not np.isin(target_tokens, [image_id, gimg_id, img_id, img_end_id,
                                           tokenizer.pad_id]).any(), (
            f"row {b}: text loss on a placeholder, image marker or [PAD]")
        next_tokens = np.append(tokens[1:], tokenizer.pad_id)
        assert np.isin(next_tokens[regress], [image_id, gimg_id]).all(), (
            f"row {b}: image loss not followed by a placeholder")
