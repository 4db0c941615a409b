"""Emu2 training sequences, one pure builder per data type (docs/batch.md, docs/recipe.md).

A builder turns one decoded record into an `assembly.Example`: the data type's template filled in
with the record's text and images, with the loss on what the paper supervises. Randomness comes
only from the `rng` argument, so builders are deterministic given a seed.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from emu2_jax.data import images as im
from emu2_jax.data import tokenizer as tk
from emu2_jax.data.assembly import Context, Example, Piece, Special, Text, Visual, assemble, truncate
from emu2_jax.data.skips import SkipExample

BOX_TOLERANCE = 1e-3  # detector boxes may overshoot [0, 1] by rounding
QUANTIZED_SIZE = tk.NUM_PATCH_INDEX - 1


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
    """'chat' / 'academic' select Emu2-Chat's two system messages, 'emu1_image' / 'emu1_video' Emu v1's,
    'none' none (tokenizer.SYSTEM_MESSAGES); anything else is literal."""
    return tk.SYSTEM_MESSAGES.get(system, system)


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
    """Grounded subject-driven generation (docs/model.md, paper §Emu2-Gen):
    `<s><grounding> text <phrase>name</phrase><object>[box image]</object>[subject image] text ..
    [whole image]</s>`. The box image is a black square with the box drawn in white, the subject
    image is the box crop; each entity is dropped to plain text with prob drop_entity_prob, and
    entities beyond the row's image budget are kept as plain text. Regression on the last image
    only. `image` is the decoded original (any size)."""
    _clean(caption, "caption")
    groups = grounding_groups(caption, spans, boxes)
    budget = (ctx.max_images - 1) // 2

    def fit(pixels: np.ndarray) -> np.ndarray:
        return im.resize_for_encoder(pixels, image_size, resize_mode)

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
