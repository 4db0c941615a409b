"""Greedy decoding with the KV cache equals greedy decoding by full recomputation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emu2_jax import generate
from emu2_jax.models import emu2, presets

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def setup():
    config = presets.get_config("tiny")
    model = emu2.Emu2Model(config)
    size = config.vision.image_size
    rng = np.random.default_rng(0)
    image_run = [config.image_token_id - 2] + [config.image_token_id] * config.n_query + [config.image_token_id - 1]
    prompts = [[1] + image_run + [50, 60, 70], [1] + image_run + [80]]
    images = rng.normal(size=(2, 1, size, size, 3)).astype(np.float32)
    batch = {**generate.left_pad(prompts, pad_id=config.image_token_id - 3), "images": images,
             "image_valid": np.ones((2, 1), bool), "image_is_frame": np.zeros((2, 1), bool)}
    params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    return model, params, prompts, images


def _reference_greedy(forward, prompt, image, steps, length):
    """Argmax of a full (uncached) forward over the growing sequence, one row without padding.

    The row is right-padded to a fixed length (segment 0: causal attention never sees it) so that
    one compiled forward serves every step.
    """
    tokens = list(prompt)
    for _ in range(steps):
        n = len(tokens)
        row = {"tokens": np.array([tokens + [0] * (length - n)], np.int32),
               "positions": np.arange(length, dtype=np.int32)[None],
               "segment_ids": (np.arange(length) < n).astype(np.int32)[None], "images": image[None],
               "image_valid": np.ones((1, 1), bool), "image_is_frame": np.zeros((1, 1), bool)}
        tokens.append(int(jnp.argmax(forward(row)[0, n - 1])))
    return tokens[len(prompt):]


def test_cached_greedy_matches_full_recompute_with_left_padding(setup):
    model, params, prompts, images = setup
    prompt = {**generate.left_pad(prompts, pad_id=0), "images": images,
              "image_valid": np.ones((2, 1), bool), "image_is_frame": np.zeros((2, 1), bool)}
    out = np.asarray(generate.make_greedy_generate(model, max_new_tokens=NEW_TOKENS)(params, prompt))
    assert out.shape == (2, NEW_TOKENS)
    forward = jax.jit(lambda row: model.apply({"params": params}, row).text_logits)
    length = max(map(len, prompts)) + NEW_TOKENS
    for i, row in enumerate(prompts):
        assert out[i].tolist() == _reference_greedy(forward, row, images[i], NEW_TOKENS, length)


def test_prompt_longer_than_cache_is_rejected(setup):
    model, params, _, images = setup
    prompt = {**generate.left_pad([[1] * 250], pad_id=0), "images": images[:1, :0],
              "image_valid": np.zeros((1, 0), bool), "image_is_frame": np.zeros((1, 0), bool)}
    with pytest.raises(ValueError, match="KV cache"):
        generate.make_greedy_generate(model, max_new_tokens=10)(params, prompt)


def test_left_pad_and_truncate():
    padded = generate.left_pad([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(padded["tokens"], [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(padded["segment_ids"], [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(padded["positions"], [[0, 1, 2], [0, 0, 0]])
    assert generate.truncate_at([4, 5, 2, 6], 2) == [4, 5]
    assert generate.truncate_at([4, 5, 6], (2, 9)) == [4, 5, 6]
