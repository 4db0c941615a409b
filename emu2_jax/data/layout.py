"""The batch layout, defined once: names, shapes and dtypes of every stage's batch (docs/batch.md).

The input pipeline produces these arrays, the tasks' dummy batches are built from them, the train
loop and `aot` shape and shard them, and `packing.check_batch` validates them. Shapes are written
with named sizes, resolved by `shapes(layout, **sizes)`:

    rows          batch rows                       seq_len       tokens per row
    slots         image / frame slots per row      image_size    encoder input side (pixels)
    pixel_row     RGB bytes of one pixel row: 3 * image_size (derived: `shapes` fills it in)
    decoder_size  visual-decoder target side (pixels)
    frames        frames per clip (video decoder)

    LLM       the LLM stages (stage1, stage2, chat, gen, emu1_chat): packed rows of tokens and images
    PROMPT    the LLM's inference prompt: LLM without the training targets and masks
    DECODER   the visual-decoder stage: one image per row, its decoder-resolution target crop
    VIDEO_DECODER  the video-decoder stage: one clip per row, its frames for the encoder and as targets
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    dims: tuple[str | int, ...]  # named sizes (see the module docstring) or fixed ints
    dtype: type


Layout = tuple[Field, ...]

LLM: Layout = (
    Field("tokens", ("rows", "seq_len"), np.int32),          # input ids; visual slots hold placeholders
    Field("targets", ("rows", "seq_len"), np.int32),         # next token where text_loss_mask is set
    Field("text_loss_mask", ("rows", "seq_len"), np.float32),
    Field("image_loss_mask", ("rows", "seq_len"), np.float32),  # regress the next visual embedding
    Field("segment_ids", ("rows", "seq_len"), np.int32),     # packed documents 1, 2, ...; 0 = padding
    Field("positions", ("rows", "seq_len"), np.int32),       # from 0 in each segment
    # uint8 "pixel rows": each image's [H, W, 3] RGB bytes with the last two dims merged (a free
    # reshape), converted to float and CLIP-normalised on device (`emu2.pixel_rows_to_images`).
    # A quarter of float32's host->device traffic, and a lane-dense minor dimension: XLA:TPU pads a
    # minor dimension of 3 (or of 8 slots) to 128 lanes, and the float32 [.., H, W, 3] images of
    # stage 2 (13 GiB per chip) cost 70-155 GiB of re-laid-out temporaries (docs/batch.md).
    Field("images", ("rows", "slots", "image_size", "pixel_row"), np.uint8),
    Field("image_valid", ("rows", "slots"), np.bool_),       # filled slots come first
    Field("image_is_frame", ("rows", "slots"), np.bool_),    # video frame ([gIMG] * v_query) vs still
)

_PROMPT_KEYS = ("tokens", "positions", "segment_ids", "images", "image_valid", "image_is_frame")
PROMPT: Layout = tuple(f for f in LLM if f.name in _PROMPT_KEYS)

DECODER: Layout = (
    Field("images", ("rows", "image_size", "image_size", 3), np.float32),          # encoder input
    Field("target_images", ("rows", "decoder_size", "decoder_size", 3), np.float32),  # in [-1, 1]
    Field("original_size", ("rows", 2), np.int32),   # (height, width) before resizing  } SDXL time_ids
    Field("crop_coords", ("rows", 2), np.int32),     # (top, left) of the crop          } (concatenated)
    Field("target_size", ("rows", 2), np.int32),     # (D, D)                           }
)

VIDEO_DECODER: Layout = (
    Field("frames", ("rows", "frames", "image_size", "image_size", 3), np.float32),  # encoder input
    Field("target_frames", ("rows", "frames", "decoder_size", "decoder_size", 3), np.float32),  # [-1, 1]
)


def keys(layout: Layout) -> tuple[str, ...]:
    return tuple(f.name for f in layout)


def _derive(sizes: Mapping[str, int]) -> dict[str, int]:
    """`sizes` with the derived named sizes filled in (a given one must agree)."""
    out = dict(sizes)
    if "image_size" in out:
        want = 3 * out["image_size"]
        if out.setdefault("pixel_row", want) != want:
            raise ValueError(f"pixel_row={out['pixel_row']} is not 3 * image_size={out['image_size']}")
    return out


def shapes(layout: Layout, **sizes: int) -> dict[str, tuple[int, ...]]:
    """{name: concrete shape}; every named size the layout uses must be given, but for the derived
    `pixel_row` (3 * image_size)."""
    sizes = _derive(sizes)
    missing = sorted({d for f in layout for d in f.dims if isinstance(d, str)} - set(sizes))
    if missing:
        raise ValueError(f"batch layout needs the sizes {missing}")
    return {f.name: tuple(sizes[d] if isinstance(d, str) else d for d in f.dims) for f in layout}


def abstract(layout: Layout, **sizes: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape/dtype structs of a batch, e.g. for abstract initialisation and AOT compilation."""
    dtypes = {f.name: f.dtype for f in layout}
    return {k: jax.ShapeDtypeStruct(s, dtypes[k]) for k, s in shapes(layout, **sizes).items()}


def check(layout: Layout, batch: Mapping[str, np.ndarray], **sizes: int) -> None:
    """Raises ValueError naming the first missing array, or the one whose shape or dtype is off.

    Sizes not given are taken from the batch (the first array that has them), so a check can fix
    only what it knows, e.g. `check(LLM, batch, seq_len=96)`.
    """
    names = keys(layout)
    missing = [k for k in names if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing} (has {sorted(batch)}; expected {list(names)})")
    resolved = dict(sizes)
    for f in layout:
        got = np.shape(batch[f.name])
        if len(got) != len(f.dims):
            raise ValueError(f"batch[{f.name!r}] has shape {got}; expected {f.dims}")
        for dim, size in zip(f.dims, got):
            if isinstance(dim, str) and dim != "pixel_row":  # derived, so checked against image_size
                resolved.setdefault(dim, size)
    resolved = _derive(resolved)
    want = shapes(layout, **resolved)
    for f in layout:
        value = batch[f.name]
        if np.shape(value) != want[f.name] or np.dtype(value.dtype) != np.dtype(f.dtype):
            raise ValueError(f"batch[{f.name!r}] is {np.dtype(value.dtype).name}{list(np.shape(value))}; "
                             f"expected {np.dtype(f.dtype).name}{list(want[f.name])} "
                             f"({', '.join(f'{d}={resolved.get(d, d)}' for d in f.dims)})")
