"""Pixels: decoding, the encoder's resize + CLIP normalisation (and its inverse), the LLM batch's
uint8 pixel rows, uniform frame sampling, the SDXL-style decoder targets (with original_size /
crop_coords / target_size) and the box images of Emu2-Gen's grounded prompts."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from emu2_jax.data.skips import SkipExample

# OpenAI CLIP statistics, used by the EVA-02-CLIP encoder (docs/model.md#visual-encoder).
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
RESIZE_MODES = ("squash", "center_crop")
MAX_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs instead of allocating them


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG/... bytes -> uint8 [H, W, 3] RGB (EXIF orientation applied).

    Raises SkipExample('bad_image') for empty, truncated or undecodable bytes.
    """
    if not data:
        raise SkipExample("bad_image", "empty bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise SkipExample("bad_image", f"{image.width}x{image.height} is too large")
            image.load()  # decodes now: truncated data fails here, not later
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and
                                                       "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            pixels = np.asarray(image.convert("RGB"), np.uint8)
    except SkipExample:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise SkipExample("bad_image", f"{type(e).__name__}: {e}") from None
    if pixels.ndim != 3 or min(pixels.shape[:2]) < 1:
        raise SkipExample("bad_image", f"shape {pixels.shape}")
    return pixels


def encode_jpeg(pixels: np.ndarray, quality: int = 85) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes (how synthesised and decoded video frames are stored)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def downscaled(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [H, W, 3] with its shorter side brought down to `image_size` (bicubic), or `pixels`
    itself when that side is not larger."""
    height, width = pixels.shape[:2]
    if min(height, width) <= image_size:
        return pixels
    scale = image_size / min(height, width)
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    # reducing_gap: a cheap integer-factor reduction first (what makes big originals fast), then
    # bicubic over the last factor of <= 2, visually equal to a full bicubic.
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0))


def fit_for_storage(data: bytes, image_size: int) -> bytes:
    """Image bytes as ingestion stores them under `--image_size` (img2dataset's practice for web
    corpora): decoded, so an undecodable image is a counted skip of the ingestion, not of every
    epoch; if its shorter side exceeds `image_size`, downscaled (bicubic, EXIF orientation applied)
    to that side and re-encoded as JPEG quality 95, else the original bytes."""
    pixels = decode_image(data)
    small = downscaled(pixels, image_size)
    return data if small is pixels else encode_jpeg(small, quality=95)


def read_image_file(path: str, where: str) -> np.ndarray:
    """uint8 [H, W, 3] of the image file `path`; ValueError naming `where` (how it was given) when it
    cannot be read or decoded."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        return decode_image(data)
    except Exception as e:  # SkipExample('bad_image') and PIL errors alike
        raise ValueError(f"{where}: not a readable image ({e})") from None


def resize_for_encoder(pixels: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], bicubic (PIL, antialiased).

    'squash' is Emu2's own preprocessing (Resize((448, 448)), aspect ratio not kept); 'center_crop'
    resizes the shorter side to `size` and takes the central square.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} not in {RESIZE_MODES}")
    image = Image.fromarray(pixels)
    if mode == "center_crop":
        h, w = pixels.shape[:2]
        scale = size / min(h, w)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 CLIP-normalised pixels."""
    return (pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def to_pixel_rows(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> uint8 [..., H, W * 3], the LLM batch's `images` (docs/batch.md): the
    RGB bytes of each pixel row side by side, a reshape (no copy of a contiguous array). The model
    turns them back into CLIP-normalised [..., H, W, 3] on device (`emu2.pixel_rows_to_images`)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-1] != 3:
        raise ValueError(f"pixel rows are made of uint8 [..., H, W, 3] images, not {pixels.dtype}{list(pixels.shape)}")
    return pixels.reshape(*pixels.shape[:-2], pixels.shape[-2] * 3)


def denormalize(pixels: np.ndarray) -> np.ndarray:
    """CLIP-normalised pixels [..., 3] -> uint8, the inverse of `normalize` (rounded, clipped to 0..255)."""
    return np.clip(np.rint((np.asarray(pixels, np.float32) * CLIP_STD + CLIP_MEAN) * 255.0), 0, 255).astype(np.uint8)


def image_grid(rows: Sequence[Sequence[np.ndarray]], size: int) -> np.ndarray:
    """One uint8 image of `rows` of uint8 [H, W, 3] images, each resized to size x size (bicubic),
    with a 2-pixel white gutter: sample sheets for people to look at."""
    gutter, columns = 2, max(len(r) for r in rows)
    sheet = np.full((len(rows) * (size + gutter) - gutter, columns * (size + gutter) - gutter, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            tile = Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
            top, left = i * (size + gutter), j * (size + gutter)
            sheet[top:top + size, left:left + size] = np.asarray(tile)
    return sheet


def sample_frame_indices(num_total: int, num_frames: int) -> list[int]:
    """Uniform sampling of Emu2's video demo: the centre of each of `num_frames` equal segments
    (repeats frames when the clip is shorter than `num_frames`)."""
    if num_total < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame (have {num_total}, want {num_frames})")
    segment = num_total / num_frames
    return [min(int(segment / 2 + segment * i), num_total - 1) for i in range(num_frames)]


def decoder_target(pixels: np.ndarray, *, decoder_size: int, encoder_size: int,
                   rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Visual-decoder (autoencoding) training pair, SDXL conventions.

    The image is resized (bicubic) so its shorter side is `decoder_size`, then a square crop is
    taken (random if `rng` is given, else central). Returns the crop in [-1, 1] ('target_image',
    float32 [D, D, 3]), the same crop resized for the encoder ('image', uint8 [S, S, 3]) and SDXL's
    micro-conditioning: 'original_size' (h, w) before resizing, 'crop_coords' (top, left) in the
    resized image, 'target_size' (D, D); all int32 [2].
    """
    h, w = pixels.shape[:2]
    scale = decoder_size / min(h, w)
    new_h, new_w = max(decoder_size, round(h * scale)), max(decoder_size, round(w * scale))
    resized = Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BICUBIC)
    if rng is None:
        top, left = (new_h - decoder_size) // 2, (new_w - decoder_size) // 2
    else:
        top = int(rng.integers(0, new_h - decoder_size + 1))
        left = int(rng.integers(0, new_w - decoder_size + 1))
    crop = resized.crop((left, top, left + decoder_size, top + decoder_size))
    encoder = crop.resize((encoder_size, encoder_size), Image.Resampling.BICUBIC)
    return {
        "image": np.asarray(encoder, np.uint8),
        "target_image": np.asarray(crop, np.float32) / 127.5 - 1.0,
        "original_size": np.array([h, w], np.int32),
        "crop_coords": np.array([top, left], np.int32),
        "target_size": np.array([decoder_size, decoder_size], np.int32),
    }


def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Normalised (x1, y1, x2, y2) -> integer pixel box with at least one pixel each way."""
    x1 = min(max(int(round(box[0] * width)), 0), width - 1)
    y1 = min(max(int(round(box[1] * height)), 0), height - 1)
    x2 = min(max(int(round(box[2] * width)), x1 + 1), width)
    y2 = min(max(int(round(box[3] * height)), y1 + 1), height)
    return x1, y1, x2, y2


def draw_box_image(box: Sequence[float], size: int) -> np.ndarray:
    """Emu2-Gen's object-localisation image: black square with a white rectangle outline at the
    box (thickness 3 at 448 px, scaled with `size`)."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    x1, y1, x2, y2 = box_to_pixels(box, size, size)
    width = max(1, round(3 * size / 448))
    ImageDraw.Draw(image).rectangle((x1, y1, x2 - 1, y2 - 1), outline=(255, 255, 255), width=width)
    return np.asarray(image, np.uint8)


def crop_box(pixels: np.ndarray, box: Sequence[float]) -> np.ndarray:
    h, w = pixels.shape[:2]
    x1, y1, x2, y2 = box_to_pixels(box, w, h)
    return pixels[y1:y2, x1:x2]
