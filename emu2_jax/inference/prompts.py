"""Prompts for inference: text with `[<IMG_PLH>]` / `[<VID_PLH>]` placeholders plus images, as
the release builds them, the chat templates (Emu2-Chat's and Emu v1's) and Emu2-Gen's grounded and
editing prompts (docs/inference.md#prompts).

A placeholder becomes `[IMG]` + `<image>` x n_query + `[/IMG]` for an image and `[VIDEO]` followed
by `[IMG]` + `[gIMG]` x v_query + `[/IMG]` per frame for a video; the text is then tokenized with
special-token parsing (`Tokenizer.encode`, the release's tokenizer behaviour), `<s>` first.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from emu2_jax.data import images as image_lib
from emu2_jax.data import tokenizer as tk
from emu2_jax.inference import text as text_lib
from emu2_jax.models.emu2 import Emu2Config

_PLACEHOLDER_RE = re.compile(f"({re.escape(tk.IMG_PLACEHOLDER)}|{re.escape(tk.VID_PLACEHOLDER)})")

@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt row: token ids and the encoder inputs of its visual slots, in order."""
    ids: list[int]
    pixels: list[np.ndarray]     # uint8 [S, S, 3] each
    is_frame: list[bool]


def build_row(tokenizer: tk.Tokenizer, config: Emu2Config, prompt: str, images: Sequence[np.ndarray] = (),
              videos: Sequence[Sequence[np.ndarray]] = (), *, add_bos: bool = True) -> Row:
    """`prompt` with each `[<IMG_PLH>]` taking the next of `images` (uint8 [H, W, 3]) and each
    `[<VID_PLH>]` the next of `videos` (lists of frames), each squash-resized to the encoder's input
    as the release does."""
    parts = _PLACEHOLDER_RE.split(prompt)
    wanted = (parts.count(tk.IMG_PLACEHOLDER), parts.count(tk.VID_PLACEHOLDER))
    if wanted != (len(images), len(videos)):
        raise ValueError(f"prompt {prompt[:60]!r} holds {wanted[0]} {tk.IMG_PLACEHOLDER} and {wanted[1]} "
                         f"{tk.VID_PLACEHOLDER} but {len(images)} images and {len(videos)} videos were given")
    size = config.vision.image_size
    image_run = tk.IMG + tk.IMAGE * config.n_query + tk.IMG_END
    frame_run = tk.IMG + tk.GIMG * config.v_query + tk.IMG_END
    image_iter, video_iter = iter(images), iter(videos)
    expanded, pixels, frames = [], [], []
    for part in parts:
        if part == tk.IMG_PLACEHOLDER:
            expanded.append(image_run)
            pixels.append(image_lib.resize_for_encoder(next(image_iter), size))
            frames.append(False)
        elif part == tk.VID_PLACEHOLDER:
            clip = next(video_iter)
            expanded.append(tk.VIDEO + frame_run * len(clip))
            pixels += [image_lib.resize_for_encoder(f, size) for f in clip]
            frames += [True] * len(clip)
        else:
            expanded.append(part)
    return Row(tokenizer.encode("".join(expanded), add_bos=add_bos), pixels, frames)


def batch(rows: Sequence[Row], config: Emu2Config, pad_id: int, *, slots: int | None = None) -> dict[str, np.ndarray]:
    """Rows -> a left-padded prompt batch in the training layout (`images`: uint8 pixel rows
    [B, slots, S, S * 3])."""
    slots = max([len(r.pixels) for r in rows] + [slots or 0])
    size = config.vision.image_size
    images = np.zeros((len(rows), slots, size, size * 3), np.uint8)
    valid = np.zeros((len(rows), slots), bool)
    is_frame = np.zeros((len(rows), slots), bool)
    for i, row in enumerate(rows):
        for j, (pixels, frame) in enumerate(zip(row.pixels, row.is_frame)):
            images[i, j], valid[i, j], is_frame[i, j] = image_lib.to_pixel_rows(pixels), True, frame
    return {**text_lib.left_pad([r.ids for r in rows], pad_id), "images": images, "image_valid": valid,
            "image_is_frame": is_frame}


# ---------------------------------------------------------------------------------------------
# Chat templates.

def system_message(system: str) -> str:
    """A named system message (Emu2-Chat: chat | academic; Emu v1: emu1_image | emu1_video; none),
    or `system` itself when it is not a name (tokenizer.SYSTEM_MESSAGES)."""
    return tk.SYSTEM_MESSAGES.get(system, system)


def chat_turn(user: str, *, first: bool, system: str = "", grounding: bool = False) -> str:
    """The text of one user turn up to the assistant's answer, in the release's chat template:
    `{system} [USER]: {user} [ASSISTANT]:` for the first turn, `[USER]: {user} [ASSISTANT]:` after
    an answer (which the caller ends with `</s>`); `<grounding>` right after `[ASSISTANT]:` in
    grounding mode. Emu2-Chat and Emu v1 share this shape; they differ in their system messages."""
    head = f"{system} " if first and system else ""
    return f"{head}{tk.USER}: {user} {tk.ASSISTANT}:" + (tk.GROUNDING if grounding else "")


def chat_prompt(turns: Sequence[tuple[str, str]], user: str, *, system: str = "", grounding: bool = False) -> str:
    """The whole conversation (earlier (user, answer) turns, then `user`) as one prompt string."""
    out = ""
    for i, (u, answer) in enumerate(turns):
        out += chat_turn(u, first=i == 0, system=system, grounding=grounding) + f" {answer}{tk.EOS}"
    return out + chat_turn(user, first=not turns, system=system, grounding=grounding)


# ---------------------------------------------------------------------------------------------
# Emu2-Gen prompts.

@dataclasses.dataclass(frozen=True)
class GroundedObject:
    """An entity of a grounded generation prompt: its name, its box (x1, y1, x2, y2) as fractions
    of the image, and optionally the subject's image (uint8 [H, W, 3])."""
    name: str
    box: tuple[float, float, float, float]
    image: np.ndarray | None = None


def grounded_prompt(parts: Sequence[str | GroundedObject], image_size: int) -> tuple[str, list[np.ndarray]]:
    """(prompt, images) of Emu2-Gen's grounded generation: `<grounding>`, then the text with each
    object as `<phrase>name</phrase><object>[box image]</object>[subject image]`; the box image is a
    black square with the box drawn in white (as the release's demo)."""
    text, images = tk.GROUNDING, []
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        text += f"{tk.PHRASE}{part.name}{tk.PHRASE_END}{tk.OBJECT}{tk.IMG_PLACEHOLDER}{tk.OBJECT_END}"
        images.append(image_lib.draw_box_image(part.box, image_size))
        if part.image is not None:
            text += tk.IMG_PLACEHOLDER
            images.append(part.image)
    return text, images


def edit_prompt(instruction: str, source: np.ndarray) -> tuple[str, list[np.ndarray]]:
    """(prompt, images) of instruction editing: the source image, then the instruction."""
    return f"{tk.IMG_PLACEHOLDER}{instruction}", [source]
