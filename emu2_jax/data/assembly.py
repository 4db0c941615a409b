"""Emu2 sequences from pieces: the `Example` type, `assemble` and `truncate`.

Pieces are text (supervised or not), special tokens and visuals. `assemble` turns them into token
ids with every image expanded to `[IMG] <image>*n_query [/IMG]` (video frames:
`[IMG] [gIMG]*v_query [/IMG]`), a per-token flag saying whether the token is a text target (so the
loss sits on the position before it) and whether a placeholder is a regression target, plus the
images in order of appearance. Whitespace next to special tokens is stripped and each text chunk
is encoded on its own, exactly as `Tokenizer.encode` does for the equivalent prompt string; data
text itself is encoded without parsing special strings, so a caption can never inject a
placeholder. `truncate` never cuts an image's placeholder run.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from emu2_jax.data import tokenizer as tk
from emu2_jax.data.skips import SkipExample


@dataclasses.dataclass(frozen=True)
class Text:
    text: str
    supervised: bool = False


@dataclasses.dataclass(frozen=True)
class Special:
    token: str
    supervised: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Visual:
    pixels: np.ndarray  # uint8 [H, W, 3], already at the encoder resolution
    regress: bool = False
    frame: bool = False


Piece = Text | Special | Visual


@dataclasses.dataclass(frozen=True)
class Context:
    """What every builder needs: the tokenizer and the row geometry."""
    tokenizer: tk.Tokenizer
    n_query: int
    v_query: int
    max_len: int
    max_images: int


@dataclasses.dataclass(eq=False)
class Example:
    """One packed segment's worth of data. `text_target[t]`: token t is predicted (cross-entropy
    at t-1); `image_target[t]`: placeholder t is regressed (MSE at t-1)."""
    tokens: np.ndarray        # int32 [T]
    text_target: np.ndarray   # bool [T]
    image_target: np.ndarray  # bool [T]
    images: list[np.ndarray]  # uint8 [H, W, 3] per visual slot, in order of appearance
    is_frame: list[bool]
    splittable: bool = False  # text-only documents may continue in the next row

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def text_loss_mask(self) -> np.ndarray:
        return np.append(self.text_target[1:], False).astype(np.float32)

    @property
    def image_loss_mask(self) -> np.ndarray:
        return np.append(self.image_target[1:], False).astype(np.float32)

    @property
    def segment_ids(self) -> np.ndarray:
        return np.ones(len(self), np.int32)

    @property
    def positions(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int32)

    def image_spans(self, tokenizer: tk.Tokenizer) -> list[tuple[int, int]]:
        """(index of [IMG], index of [/IMG]) of each visual, in order."""
        starts = np.flatnonzero(self.tokens == tokenizer.token_to_id(tk.IMG))
        ends = np.flatnonzero(self.tokens == tokenizer.token_to_id(tk.IMG_END))
        return list(zip(starts.tolist(), ends.tolist()))

    def image_positions(self, tokenizer: tk.Tokenizer) -> list[int]:
        """Index of the first placeholder of each visual."""
        return [s + 1 for s, _ in self.image_spans(tokenizer)]


def assemble(pieces: Sequence[Piece], ctx: Context, *, add_bos: bool = True) -> Example:
    """Pieces -> Example. Adjacent Text pieces form one chunk, encoded once; whitespace next to a
    special token or visual is stripped."""
    tok = ctx.tokenizer
    img, img_end = tok.token_to_id(tk.IMG), tok.token_to_id(tk.IMG_END)
    entries: list[list[Text] | Piece] = []
    for piece in pieces:
        if isinstance(piece, Text):
            if entries and isinstance(entries[-1], list):
                entries[-1].append(piece)
            else:
                entries.append([piece])
        else:
            entries.append(piece)

    tokens: list[int] = [tok.bos_id] if add_bos else []
    text_t: list[bool] = [False] * len(tokens)
    image_t: list[bool] = [False] * len(tokens)
    images: list[np.ndarray] = []
    frames: list[bool] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, list):
            ids, sup = _encode_chunk(tok, entry, strip_left=i > 0, strip_right=i + 1 < len(entries))
            tokens += ids
            text_t += sup
            image_t += [False] * len(ids)
        elif isinstance(entry, Special):
            tokens.append(tok.token_to_id(entry.token))
            text_t.append(entry.supervised)
            image_t.append(False)
        else:
            n = ctx.v_query if entry.frame else ctx.n_query
            placeholder = tok.token_to_id(tk.GIMG if entry.frame else tk.IMAGE)
            tokens += [img] + [placeholder] * n + [img_end]
            text_t += [False] * (n + 2)
            image_t += [False] + [entry.regress] * n + [False]
            images.append(entry.pixels)
            frames.append(entry.frame)
    return Example(np.asarray(tokens, np.int32), np.asarray(text_t, bool),
                   np.asarray(image_t, bool), images, frames)


def _encode_chunk(tok: tk.Tokenizer, texts: list[Text], *, strip_left: bool,
                  strip_right: bool) -> tuple[list[int], list[bool]]:
    joined = "".join(t.text for t in texts)
    stripped = joined.lstrip() if strip_left else joined
    shift = len(joined[:len(joined) - len(stripped)].encode("utf-8"))
    if strip_right:
        stripped = stripped.rstrip()
    if not stripped:
        return [], []
    bounds = np.cumsum([len(t.text.encode("utf-8")) for t in texts]).tolist()
    data = stripped.encode("utf-8")
    ids, spans = tok.encode_plain(stripped)
    supervised = []
    for begin, end in spans:
        # A token belongs to the piece holding its first non-space byte (looking past its end
        # for a bare '▁'), so "[ASSISTANT]: Yes" supervises '▁Yes' / '▁' 'Y' but not '▁:'.
        pos = begin
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        owner = shift + (pos if pos < len(data) else max(begin, end - 1))
        supervised.append(texts[min(bisect.bisect_right(bounds, owner), len(texts) - 1)].supervised)
    return ids, supervised


def truncate(ex: Example, ctx: Context, max_len: int | None = None) -> Example:
    """Cuts `ex` to at most min(max_len, ctx.max_len) tokens and ctx.max_images visuals, never
    inside an `[IMG] .. [/IMG]` run (the cut moves before it) and never leaving a bare `[VIDEO]`
    at the end. Raises SkipExample('too_long') if nothing supervised survives."""
    limit = ctx.max_len if max_len is None else min(max_len, ctx.max_len)
    spans = ex.image_spans(ctx.tokenizer)
    cut = len(ex)
    if len(spans) > ctx.max_images:
        cut = spans[ctx.max_images][0]
    cut = min(cut, limit)
    for start, end in spans:
        if start < cut <= end:
            cut = start
            break
    video = ctx.tokenizer.token_to_id(tk.VIDEO)
    if cut < len(ex) and cut > 0 and ex.tokens[cut - 1] == video:
        cut -= 1
    if cut == len(ex):
        return ex
    if not (ex.text_target[1:cut].any() or ex.image_target[:cut].any()):
        raise SkipExample("too_long", f"nothing supervised in the first {cut} tokens")
    kept = sum(end < cut for _, end in spans)
    return Example(ex.tokens[:cut], ex.text_target[:cut], ex.image_target[:cut],
                   ex.images[:kept], ex.is_frame[:kept], ex.splittable)
