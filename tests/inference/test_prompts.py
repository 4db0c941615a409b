"""Prompt rows: placeholder expansion as the release's, batches, Emu2-Gen's grounded and edit prompts."""
import numpy as np
import pytest

from emu2_jax.data import images as image_lib
from emu2_jax.data import tokenizer as tk
from emu2_jax.inference import prompts


def test_placeholders_expand_to_the_visual_runs(tiny_emu2, photos):
    model, _, tokenizer = tiny_emu2
    cfg = model.config
    row = prompts.build_row(tokenizer, cfg, "[<IMG_PLH>]a cat [<VID_PLH>] end", photos[:1], [[photos[1]] * 2])
    expected = (tk.IMG + tk.IMAGE * cfg.n_query + tk.IMG_END + "a cat " + tk.VIDEO
                + (tk.IMG + tk.GIMG * cfg.v_query + tk.IMG_END) * 2 + " end")
    assert row.ids == tokenizer.encode(expected)
    assert row.ids[0] == tokenizer.bos_id and len(row.pixels) == 3 and row.is_frame == [False, True, True]
    with pytest.raises(ValueError, match=r"holds 1 \[<IMG_PLH>\] and 0 \[<VID_PLH>\] but 0 images"):
        prompts.build_row(tokenizer, cfg, "[<IMG_PLH>]")
    batch = prompts.batch([row, prompts.build_row(tokenizer, cfg, "hi")], cfg, tokenizer.pad_id)
    size = cfg.vision.image_size
    assert batch["images"].shape == (2, 3, size, 3 * size) and batch["images"].dtype == np.uint8
    np.testing.assert_array_equal(batch["images"][0, 0].reshape(size, size, 3),
                                  image_lib.resize_for_encoder(photos[0], size))  # squashed, as the release
    assert not batch["images"][1].any()
    assert batch["image_valid"].tolist() == [[True] * 3, [False] * 3]
    assert batch["segment_ids"][1].sum() == len(tokenizer.encode("hi"))  # left-padded


def test_grounded_prompt_draws_boxes_as_images(photos):
    text, images = prompts.grounded_prompt(
        ["a ", prompts.GroundedObject("dog", (0.25, 0.5, 0.75, 1.0), photos[0]), " on grass"], image_size=32)
    assert text == ("<grounding>a <phrase>dog</phrase><object>[<IMG_PLH>]</object>[<IMG_PLH>] on grass")
    box, subject = images
    assert subject is photos[0]
    assert box.shape == (32, 32, 3) and box[4, 4].tolist() == [0, 0, 0]
    assert box[16, 8].tolist() == [255, 255, 255] and box[20, 16].tolist() == [0, 0, 0]  # outline only
    text, images = prompts.edit_prompt("make it blue", photos[1])
    assert text == "[<IMG_PLH>]make it blue" and images == [photos[1]]
    assert np.asarray(prompts.grounded_prompt([prompts.GroundedObject("x", (0, 0, 1, 1))], 16)[1]).shape == (
        1, 16, 16, 3)
