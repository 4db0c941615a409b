import io

import numpy as np
import pytest
from PIL import Image

from emu2_jax.data import images as im
from emu2_jax.data import tokenizer as tk
from emu2_jax.data.skips import SkipExample

from .conftest import GARBAGE, GOOD, TRUNCATED

PHOTOS = tk.EMBEDDED_DIR / "images"


def test_decode_jpeg_png_grayscale_and_alpha():
    rgb = im.decode_image((PHOTOS / "coffee.jpg").read_bytes())
    assert rgb.shape == (299, 448, 3) and rgb.dtype == np.uint8
    gray = im.decode_image((PHOTOS / "coins.png").read_bytes())  # grayscale PNG
    assert gray.shape == (303, 384, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    buf = io.BytesIO()
    Image.new("RGBA", (4, 2), (255, 0, 0, 0)).save(buf, format="PNG")  # fully transparent
    assert (im.decode_image(buf.getvalue()) == 255).all()  # composited on white


@pytest.mark.parametrize("data", [b"", GARBAGE, TRUNCATED, GOOD[:20]])
def test_bad_bytes_are_skipped(data):
    with pytest.raises(SkipExample) as e:
        im.decode_image(data)
    assert e.value.reason == "bad_image"


def test_resize_modes():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255  # white centre band, black sides
    squash = im.resize_for_encoder(pixels, 28, "squash")
    crop = im.resize_for_encoder(pixels, 28, "center_crop")
    assert squash.shape == crop.shape == (28, 28, 3)
    assert squash[:, 0].max() < 30 and squash[:, 14].min() > 225  # sides stay visible
    assert crop[:, 2:-2].min() > 225  # the central square is the white band
    with pytest.raises(ValueError):
        im.resize_for_encoder(pixels, 28, "stretch")


def test_normalize_uses_clip_statistics():
    pixels = np.array([[[255, 255, 255], [0, 0, 0]]], np.uint8)
    out = im.normalize(pixels)
    np.testing.assert_allclose(out[0, 0], (1 - im.CLIP_MEAN) / im.CLIP_STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], -im.CLIP_MEAN / im.CLIP_STD, rtol=1e-6)
    assert out.dtype == np.float32


def test_denormalize_inverts_normalize():
    pixels = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)  # every value
    np.testing.assert_array_equal(im.denormalize(im.normalize(pixels)), pixels)
    assert im.denormalize(np.full((1, 3), 100.0)).tolist() == [[255, 255, 255]]  # clipped, not wrapped


def test_uniform_frame_sampling():
    assert im.sample_frame_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert im.sample_frame_indices(8, 8) == list(range(8))
    assert im.sample_frame_indices(100, 4) == [12, 37, 62, 87]
    assert im.sample_frame_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        im.sample_frame_indices(0, 8)


def test_decoder_target_keeps_sdxl_conditioning():
    pixels = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    centre = im.decoder_target(pixels, decoder_size=30, encoder_size=14, rng=None)
    assert centre["original_size"].tolist() == [60, 100]
    assert centre["target_size"].tolist() == [30, 30]
    assert centre["crop_coords"].tolist() == [0, 10]  # resized to 30x50, centred crop
    target = centre["target_image"]
    assert target.shape == (30, 30, 3) and target.dtype == np.float32
    assert target.min() >= -1 and target.max() <= 1
    assert centre["image"].shape == (14, 14, 3) and centre["image"].dtype == np.uint8
    resized = np.asarray(Image.fromarray(pixels).resize((50, 30), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(target, resized[:, 10:40] / 127.5 - 1, atol=1e-6)
    lefts = {int(im.decoder_target(pixels, decoder_size=30, encoder_size=14,
                                   rng=np.random.default_rng(s))["crop_coords"][1])
             for s in range(20)}
    assert len(lefts) > 3 and min(lefts) >= 0 and max(lefts) <= 20


def test_box_image_and_crop():
    box = (0.25, 0.5, 0.75, 1.0)
    drawn = im.draw_box_image(box, 448)
    assert drawn.shape == (448, 448, 3)
    assert (drawn[224:448, 112] == 255).all()  # left edge of the box, 3 px thick
    assert (drawn[300, 112:115] == 255).all() and (drawn[300, 115:300] == 0).all()
    assert (drawn[:224] == 0).all()
    pixels = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert im.crop_box(pixels, box).shape == (5, 10, 3)
    assert im.crop_box(pixels, (0.5, 0.5, 0.5, 0.5)).shape == (1, 1, 3)  # never empty
