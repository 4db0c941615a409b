"""Emu2 training sequences (notes/batch.md, SPEC.md §4/§8): one pure builder per data type,
truncation that never cuts an image's placeholder run, and the row packer.

A builder turns one decoded record into an `Example`: token ids with every image expanded to
`[IMG] <image>*n_query [/IMG]` (video frames: `[IMG] [gIMG]*v_query [/IMG]`, a video prefixed by
`[VIDEO]`), a per-token flag saying whether the token is a text target (so the loss sits on the
position before it) and whether a placeholder is a regression target, plus the images in order of
appearance. Randomness comes only from the `rng` argument, so builders are deterministic given a
seed. Whitespace next to special tokens is stripped and each text chunk is encoded on its own,
exactly as `Tokenizer.encode` does for the equivalent prompt string; data text itself is encoded
without parsing special strings, so a caption can never inject a placeholder.
"""
from __future__ import annotations

import bisect
import dataclasses
import re
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np

from emu2_jax.data import images as im
from emu2_jax.data import tokenizer as tk
from emu2_jax.data.skips import SkipExample

BOX_TOLERANCE = 1e-3  # detector boxes may overshoot [0, 1] by rounding
QUANTIZED_SIZE = tk.NUM_PATCH_INDEX - 1


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


# ------------------------------------------------------------------------------------------------
# Assembly and truncation
# ------------------------------------------------------------------------------------------------

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


def _clean(text: str, what: str) -> str:
    text = text.strip()
    if not text:
        raise SkipExample("empty_text", what)
    return text


def _fit_text(tok: tk.Tokenizer, text: str, budget: int) -> str:
    """Longest prefix of `text` (at a token boundary) that encodes to at most `budget` tokens."""
    if budget < 1:
        raise SkipExample("too_long", "no room left for the text")
    ids, spans = tok.encode_plain(text)
    while len(ids) > budget:
        text = text.encode("utf-8")[:spans[budget][0]].decode("utf-8", "ignore").rstrip()
        if not text:
            raise SkipExample("too_long", "no room left for the text")
        ids, spans = tok.encode_plain(text)
    return text


def _visual_len(ctx: Context, frame: bool = False) -> int:
    return (ctx.v_query if frame else ctx.n_query) + 2


# ------------------------------------------------------------------------------------------------
# Builders, one per Emu2 data type
# ------------------------------------------------------------------------------------------------

def build_image_text(ctx: Context, caption: str, image: np.ndarray, rng: np.random.Generator, *,
                     image_first_prob: float, regress_image: bool) -> Example:
    """`<s> [IMG]<image>*n[/IMG] caption </s>` (or caption first, with prob 1 - image_first_prob).
    Text loss on the caption and `</s>`; regression on the image if `regress_image`.
    Stage 1: image_first_prob=1, regress_image=False. Stage 2: 0.5 and True."""
    caption = _clean(caption, "caption")
    image_first = rng.random() < image_first_prob
    caption = _fit_text(ctx.tokenizer, caption, ctx.max_len - _visual_len(ctx) - 2)
    visual = Visual(image, regress=regress_image)
    body = [visual, Text(caption, True)] if image_first else [Text(caption, True), visual]
    return assemble([*body, Special(tk.EOS, True)], ctx)


def build_video_text(ctx: Context, caption: str, frames: Sequence[np.ndarray],
                     rng: np.random.Generator, *, video_first_prob: float,
                     regress_frames: bool) -> Example:
    """`<s> [VIDEO] ([IMG][gIMG]*v[/IMG])*frames caption </s>` (or caption first)."""
    caption = _clean(caption, "caption")
    frames = list(frames)[:ctx.max_images]
    video_first = rng.random() < video_first_prob
    budget = ctx.max_len - len(frames) * _visual_len(ctx, frame=True) - 3
    caption = _fit_text(ctx.tokenizer, caption, budget)
    video = [Special(tk.VIDEO)] + [Visual(f, regress=regress_frames, frame=True) for f in frames]
    body = [*video, Text(caption, True)] if video_first else [Text(caption, True), *video]
    return assemble([*body, Special(tk.EOS, True)], ctx)


def build_interleaved(ctx: Context, sentences: Sequence[str], images: Sequence[np.ndarray],
                      image_sentence: Sequence[int], rng: np.random.Generator, *, max_images: int,
                      max_len: int, image_first_prob: float, regress_images: bool) -> Example:
    """MMC4-style document: a window of up to `max_images` consecutive images (random start)
    with the text from the first window image's sentence onwards, cut to `max_len` tokens; each
    image goes before (prob image_first_prob) or after its sentence. `</s>` only if the document
    end is reached. Text loss on all text; regression on the images if `regress_images`."""
    if len(images) == 0:
        raise SkipExample("no_images")
    if len(image_sentence) != len(images) or not all(
            0 <= s < len(sentences) for s in image_sentence):
        raise SkipExample("bad_annotation", "image matched to a missing sentence")
    sentences = [s.strip() for s in sentences]
    if not any(sentences):
        raise SkipExample("empty_text", "document")
    order = sorted(range(len(images)), key=lambda i: image_sentence[i])
    k = min(max_images, ctx.max_images, len(images))
    first = int(rng.integers(0, len(images) - k + 1))
    window = order[first:first + k]
    before = {i: rng.random() < image_first_prob for i in window}
    by_sentence: dict[int, list[int]] = defaultdict(list)
    for i in window:
        by_sentence[image_sentence[i]].append(i)
    pieces: list[Piece] = []
    for s in range(image_sentence[window[0]], len(sentences)):
        attached = by_sentence.get(s, [])
        pieces += [Visual(images[i], regress=regress_images) for i in attached if before[i]]
        if sentences[s]:
            sep = " " if pieces and isinstance(pieces[-1], Text) else ""
            pieces.append(Text(sep + sentences[s], True))
        pieces += [Visual(images[i], regress=regress_images) for i in attached if not before[i]]
    pieces.append(Special(tk.EOS, True))
    return truncate(assemble(pieces, ctx), ctx, max_len=max_len)


def grounding_groups(caption: str, spans: np.ndarray, boxes: np.ndarray
                     ) -> list[tuple[int, int, list[np.ndarray]]]:
    """Validates GRIT-style annotations (character spans into `caption`, boxes (x1, y1, x2, y2)
    normalised to the image) and groups the boxes of identical spans; overlapping spans after the
    first are dropped. Raises SkipExample for boxes outside the image or bad spans."""
    spans = np.asarray(spans).reshape(-1, 2)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(spans) == 0 or len(spans) != len(boxes):
        raise SkipExample("bad_annotation", f"{len(spans)} spans for {len(boxes)} boxes")
    for box in boxes:
        x1, y1, x2, y2 = box
        inside = (np.isfinite(box).all() and min(x1, y1) >= -BOX_TOLERANCE
                  and max(x2, y2) <= 1 + BOX_TOLERANCE and x1 < x2 and y1 < y2)
        if not inside:
            raise SkipExample("box_outside_image", f"box {box.tolist()}")
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for (start, end), box in zip(spans.tolist(), boxes):
        if not 0 <= start < end <= len(caption) or not caption[start:end].strip():
            raise SkipExample("bad_annotation",
                              f"span {(start, end)} of a {len(caption)}-character caption")
        groups.setdefault((start, end), []).append(np.clip(box, 0.0, 1.0))
    out, last_end = [], 0
    for (start, end), grouped in sorted(groups.items()):
        if start >= last_end:
            out.append((start, end, grouped))
            last_end = end
    return out


def box_tokens(box: Sequence[float]) -> list[str]:
    """`<patch_index_XXXX>` for x1, y1, x2, y2 quantized to 0..256 (the checkpoint's 257 tokens)."""
    return [tk.patch_index_token(int(np.clip(round(c * QUANTIZED_SIZE), 0, QUANTIZED_SIZE)))
            for c in box]


def build_grounded(ctx: Context, caption: str, spans: np.ndarray, boxes: np.ndarray,
                   image: np.ndarray, rng: np.random.Generator, *, phrase_first_prob: float,
                   regress_image: bool) -> Example:
    """`<s> [IMG]..[/IMG] <grounding> text <phrase>p</phrase><object><patch_index_x1>..y1..x2..y2
    </object> text .. </s>`; each phrase precedes its boxes with prob phrase_first_prob (else the
    object comes first); several boxes of one phrase are joined by
    `</delimiter_of_multi_objects/>`. Text loss on everything after `<grounding>`."""
    _clean(caption, "caption")
    pieces: list[Piece] = [Visual(image, regress=regress_image), Special(tk.GROUNDING)]
    pos = 0
    for start, end, grouped in grounding_groups(caption, spans, boxes):
        if caption[pos:start]:
            pieces.append(Text(caption[pos:start], True))
        phrase = [Special(tk.PHRASE, True), Text(caption[start:end], True),
                  Special(tk.PHRASE_END, True)]
        obj: list[Piece] = [Special(tk.OBJECT, True)]
        for i, box in enumerate(grouped):
            if i:
                obj.append(Special(tk.DELIMITER, True))
            obj += [Special(t, True) for t in box_tokens(box)]
        obj.append(Special(tk.OBJECT_END, True))
        pieces += phrase + obj if rng.random() < phrase_first_prob else obj + phrase
        pos = end
    if caption[pos:]:
        pieces.append(Text(caption[pos:], True))
    pieces.append(Special(tk.EOS, True))
    return truncate(assemble(pieces, ctx), ctx)


def build_text(ctx: Context, text: str) -> Example:
    """`<s> document </s>`, all supervised; split across rows by the packer."""
    text = _clean(text, "document")
    ex = assemble([Text(text, True), Special(tk.EOS, True)], ctx)
    return dataclasses.replace(ex, splittable=True)


_PLACEHOLDER_RE = re.compile("(" + re.escape(tk.IMG_PLACEHOLDER) + "|" +
                             re.escape(tk.VID_PLACEHOLDER) + ")")


def chat_system_message(system: str) -> str:
    """'chat' / 'academic' select the paper's two system messages; anything else is literal."""
    return {"chat": tk.SYSTEM_CHAT, "academic": tk.SYSTEM_ACADEMIC}.get(system, system)


def build_chat(ctx: Context, turns: Sequence[tuple[str, str]], *, system: str,
               images: Sequence[np.ndarray] = (), videos: Sequence[Sequence[np.ndarray]] = (),
               grounding: bool = False) -> Example:
    """Emu2-Chat's native template:
    `<s>{system} [USER]: {user} [ASSISTANT]: {answer}</s>[USER]: {user} [ASSISTANT]: {answer}</s>`
    (`<grounding>` right after `[ASSISTANT]:` in grounding mode). `[<IMG_PLH>]` / `[<VID_PLH>]`
    in user text take the next image / video (a video is `[VIDEO]` + its frames). Loss only on
    the answers and their `</s>`; truncated directly to the row length."""
    if not turns:
        raise SkipExample("empty_text", "dialogue without turns")
    image_iter, video_iter = iter(images), iter(videos)
    system = chat_system_message(system)
    pieces: list[Piece] = [Text(system)] if system else []
    for i, (user, answer) in enumerate(turns):
        answer = _clean(answer, "answer")
        pieces += [Text(" "), Special(tk.USER), Text(": ")] if i == 0 else [Special(tk.USER),
                                                                             Text(": ")]
        for part in _PLACEHOLDER_RE.split(user):
            try:
                if part == tk.IMG_PLACEHOLDER:
                    pieces.append(Visual(next(image_iter)))
                elif part == tk.VID_PLACEHOLDER:
                    frames = next(video_iter)
                    pieces += [Special(tk.VIDEO)] + [Visual(f, frame=True) for f in frames]
                elif part:
                    pieces.append(Text(part))
            except StopIteration:
                raise SkipExample("bad_annotation", "more placeholders than images") from None
        pieces += [Text(" "), Special(tk.ASSISTANT), Text(":")]
        if grounding:
            pieces.append(Special(tk.GROUNDING))
        pieces += [Text(" "), Text(answer, True), Special(tk.EOS, True)]
    if next(image_iter, None) is not None or next(video_iter, None) is not None:
        raise SkipExample("bad_annotation", "more images than placeholders")
    return truncate(assemble(pieces, ctx), ctx)


def build_gen_t2i(ctx: Context, caption: str, image: np.ndarray) -> Example:
    """Emu2-Gen text-to-image: `<s> caption [IMG]..[/IMG] </s>`, regression on the image only."""
    caption = _fit_text(ctx.tokenizer, _clean(caption, "caption"),
                        ctx.max_len - _visual_len(ctx) - 2)
    return assemble([Text(caption), Visual(image, regress=True), Special(tk.EOS)], ctx)


def build_gen_edit(ctx: Context, instruction: str, source: np.ndarray,
                   target: np.ndarray) -> Example:
    """Instruction editing: `<s> [IMG]source[/IMG] instruction [IMG]edited[/IMG] </s>`,
    regression on the edited (last) image only."""
    instruction = _fit_text(ctx.tokenizer, _clean(instruction, "instruction"),
                            ctx.max_len - 2 * _visual_len(ctx) - 2)
    return assemble([Visual(source), Text(instruction), Visual(target, regress=True),
                     Special(tk.EOS)], ctx)


def build_gen_grounded(ctx: Context, caption: str, spans: np.ndarray, boxes: np.ndarray,
                       image: np.ndarray, rng: np.random.Generator, *, drop_entity_prob: float,
                       image_size: int, resize_mode: str = "squash") -> Example:
    """Grounded subject-driven generation (SPEC.md §4, paper §Emu2-Gen):
    `<s><grounding> text <phrase>name</phrase><object>[box image]</object>[subject image] text ..
    [whole image]</s>`. The box image is a black square with the box drawn in white, the subject
    image is the box crop; each entity is dropped to plain text with prob drop_entity_prob, and
    entities beyond the row's image budget are kept as plain text. Regression on the last image
    only. `image` is the decoded original (any size)."""
    _clean(caption, "caption")
    groups = grounding_groups(caption, spans, boxes)
    budget = (ctx.max_images - 1) // 2
    fit = lambda pixels: im.resize_for_encoder(pixels, image_size, resize_mode)  # noqa: E731
    pieces: list[Piece] = [Special(tk.GROUNDING)]
    pos = 0
    for start, end, grouped in groups:
        if caption[pos:start]:
            pieces.append(Text(caption[pos:start]))
        phrase = caption[start:end]
        if rng.random() < drop_entity_prob or budget == 0:
            pieces.append(Text(phrase))
        else:
            budget -= 1
            box = grouped[0]
            pieces += [Special(tk.PHRASE), Text(phrase), Special(tk.PHRASE_END),
                       Special(tk.OBJECT), Visual(im.draw_box_image(box, image_size)),
                       Special(tk.OBJECT_END), Visual(fit(im.crop_box(image, box)))]
        pos = end
    if caption[pos:]:
        pieces.append(Text(caption[pos:]))
    pieces += [Visual(fit(image), regress=True), Special(tk.EOS)]
    ex = assemble(pieces, ctx)
    if len(ex) > ctx.max_len:
        raise SkipExample("too_long", f"{len(ex)} tokens for a {ctx.max_len}-token row")
    return ex


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------

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
            if pixels.shape != (self.image_size, self.image_size, 3):
                raise ValueError(f"image of shape {pixels.shape}, expected "
                                 f"{(self.image_size, self.image_size, 3)}")
        self.images += ex.images
        self.is_frame += ex.is_frame
        self.samples += start == 0
        self.used += n

    def finish(self) -> dict[str, np.ndarray]:
        """The row as batch.md arrays (images CLIP-normalised float32, zeros in padding slots)."""
        n, s = self.max_images, self.image_size
        images = np.zeros((n, s, s, 3), np.float32)
        if self.images:
            images[:len(self.images)] = im.normalize(np.stack(self.images))
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


def check_batch(batch: Mapping[str, np.ndarray], tokenizer: tk.Tokenizer, n_query: int,
                v_query: int) -> None:
    """Asserts the batch.md invariants (raises AssertionError naming the row and the problem)."""
    image_id, gimg_id = tokenizer.token_to_id(tk.IMAGE), tokenizer.token_to_id(tk.GIMG)
    img_id, img_end_id = tokenizer.token_to_id(tk.IMG), tokenizer.token_to_id(tk.IMG_END)
    for b in range(batch["tokens"].shape[0]):
        tokens, seg = batch["tokens"][b], batch["segment_ids"][b]
        valid, frame = batch["image_valid"][b], batch["image_is_frame"][b]
        assert not valid[np.argmin(valid):].any() or valid.all(), f"row {b}: valid slots not first"
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


def iter_rows(examples: Iterable[Example], seq_len: int, max_images: int, image_size: int,
              pad_id: int):
    """Greedy in-order packing of a finite sequence (tests and tools; the input pipeline streams
    the same `place` logic with checkpointable state)."""
    packer = RowPacker(seq_len, max_images, image_size, pad_id)
    for ex in examples:
        offset = 0
        while offset < len(ex):
            new = place(packer, ex, offset)
            if new == offset or packer.free == 0:
                yield packer.finish()
            offset = new
    if packer.used:
        yield packer.finish()
