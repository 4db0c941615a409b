"""The Emu2 model: placement of visual embeddings, shapes, dtypes, losses, connectors."""
import dataclasses
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from emu2_jax.data import images as image_lib
from emu2_jax.models import emu2, presets
from emu2_jax.models.projector import mean_pool_patches

CFG = presets.get_config("tiny")
IMG, FRAME = CFG.image_token_id, CFG.frame_token_id
BOI, EOI = IMG - 2, IMG - 1  # [IMG], [/IMG]
N, V = CFG.n_query, CFG.v_query


def _batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row 0: text, image A, text, frame B; row 1: image C and a padding slot, then padding tokens."""
    row0 = [1, 5, BOI] + [IMG] * N + [EOI, 7, 8, BOI] + [FRAME] * V + [EOI, 9]
    row1 = [1, BOI] + [IMG] * N + [EOI, 11, 12]
    length = len(row0)
    tokens = np.zeros((2, length), np.int32)
    tokens[0] = row0
    tokens[1, :len(row1)] = row1
    segment_ids = (tokens != 0).astype(np.int32)
    size = CFG.vision.image_size
    images = image_lib.to_pixel_rows(rng.integers(0, 256, (2, 2, size, size, 3), dtype=np.uint8))
    images[1, 1] = 0
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "text_loss_mask": (tokens > 0).astype(np.float32),
        "image_loss_mask": np.isin(np.roll(tokens, -1, axis=1), [IMG, FRAME]).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": np.broadcast_to(np.arange(length), tokens.shape).astype(np.int32) * segment_ids,
        "images": images,
        "image_valid": np.array([[True, True], [True, False]]),
        "image_is_frame": np.array([[False, True], [False, False]]),
    }


@pytest.fixture(scope="module")
def model_and_params():
    batch = _batch(np.random.default_rng(0))
    model = emu2.Emu2Model(CFG)
    params = nn.unbox(model.init(jax.random.key(0), batch))
    return model, params, batch


def test_mean_pool_parity_with_torch_avg_pool():
    patches = np.random.default_rng(1).normal(size=(2, 64, 5)).astype(np.float32)  # an 8x8 grid
    for num_tokens in (1, 4, 16, 64):
        ours = np.asarray(mean_pool_patches(jnp.asarray(patches), num_tokens))
        grid = torch.from_numpy(patches).permute(0, 2, 1).reshape(2, 5, 8, 8)
        stride = 8 // int(num_tokens ** 0.5)
        ref = torch.nn.functional.avg_pool2d(grid, stride, stride).flatten(2).permute(0, 2, 1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    with pytest.raises(ValueError, match="num_tokens=9"):
        mean_pool_patches(jnp.asarray(patches), 9)


def test_visual_embeddings_fill_placeholders_in_order(model_and_params):
    model, params, batch = model_and_params
    embeds, visual_at = model.apply(params, batch["tokens"], batch["images"], batch["image_valid"],
                                    batch["image_is_frame"], method=model.embed_inputs)
    text = model.apply(params, batch["tokens"], method=lambda m, t: m.llm.embed(t))
    flat = emu2.pixel_rows_to_images(batch["images"].reshape(4, *batch["images"].shape[2:]))
    visual, projected = model.apply(params, flat, N, method=model.encode_images)
    tokens = batch["tokens"]
    for row, slots in ((0, [(0, IMG)]), (0, [(1, FRAME)]), (1, [(2, IMG)])):
        for slot, token_id in slots:
            where = np.flatnonzero(tokens[row] == token_id)
            np.testing.assert_allclose(embeds[row, where], projected[slot], atol=1e-6)
            np.testing.assert_allclose(visual_at[row, where], visual[slot], atol=1e-6)
    is_text = ~np.isin(tokens, [IMG, FRAME])
    np.testing.assert_allclose(np.asarray(embeds)[is_text], np.asarray(text)[is_text], atol=1e-6)
    assert not np.any(np.asarray(visual_at)[is_text])
    # the padding slot (row 1, slot 1) is used nowhere: no placeholder in row 1 matches its features
    assert not np.any(np.all(np.isclose(np.asarray(visual_at[1]), np.asarray(visual[3, :1])), axis=-1))


@pytest.mark.parametrize("jit", [False, True])
def test_pixel_rows_are_normalised_as_on_the_host(jit):
    """The device conversion of uint8 pixel rows is the host's `images.normalize` of the images (XLA's
    reciprocal multiplications put it within 1e-6), every byte value in every channel."""
    pixels = np.random.default_rng(3).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    pixels[0, 0] = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)  # all 256 values, each channel
    rows = image_lib.to_pixel_rows(pixels)
    assert rows.shape == (2, 3, 16, 48) and rows.dtype == np.uint8
    np.testing.assert_array_equal(rows.reshape(pixels.shape), pixels)
    convert = jax.jit(emu2.pixel_rows_to_images) if jit else emu2.pixel_rows_to_images
    out = convert(jnp.asarray(rows))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), image_lib.normalize(pixels), rtol=0, atol=1e-6)


def test_pixel_rows_of_anything_but_uint8_images_are_refused():
    with pytest.raises(ValueError, match=r"uint8 \[\.\.\., H, W, 3\] images, not float32\[2, 4, 4, 3\]"):
        image_lib.to_pixel_rows(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"not uint8\[4, 4\]"):
        image_lib.to_pixel_rows(np.zeros((4, 4), np.uint8))


def test_embed_inputs_refuses_images_that_are_not_pixel_rows(model_and_params):
    """One format: float images, [B, N, H, W, 3] ones and rows of the wrong width are one-line errors."""
    model, params, batch = model_and_params
    size = CFG.vision.image_size
    rows = batch["images"]
    wrong = {"float32": rows.astype(np.float32),
             "rank 5": rows.reshape(2, 2, size, size, 3),
             "width": rows[..., :-3]}
    for what, images in wrong.items():
        with pytest.raises(AssertionError, match=r"images must be uint8 pixel rows \[B, N, H, W \* 3\]") as e:
            model.apply(params, batch["tokens"], images, batch["image_valid"], batch["image_is_frame"],
                        method=model.embed_inputs)
        assert "\n" not in str(e.value), what
    with pytest.raises(AssertionError, match="images must be uint8 pixel rows"):  # no slots: still checked
        model.apply(params, batch["tokens"], np.zeros((2, 0, size, size, 3), np.float32), batch["image_valid"][:, :0],
                    batch["image_is_frame"][:, :0], method=model.embed_inputs)


def test_forward_shapes_and_regression_targets(model_and_params):
    model, params, batch = model_and_params
    out = model.apply(params, batch)
    length = batch["tokens"].shape[1]
    chex.assert_shape(out.text_logits, (2, length, CFG.llm.vocab_size))
    chex.assert_shape((out.visual_pred, out.visual_target), (2, length, CFG.vision.width))
    chex.assert_type((out.text_logits, out.visual_pred, out.visual_target), jnp.float32)
    _, visual_at = model.apply(params, batch["tokens"], batch["images"], batch["image_valid"],
                               batch["image_is_frame"], method=model.embed_inputs)
    np.testing.assert_array_equal(out.visual_target[:, :-1], visual_at[:, 1:])
    np.testing.assert_array_equal(out.visual_target[:, -1], 0.0)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    config = presets.get_config("tiny", dtype="bfloat16")
    batch = _batch(np.random.default_rng(0))
    model = emu2.Emu2Model(config)
    params = nn.unbox(model.init(jax.random.key(0), batch))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = model.apply(params, batch)
    chex.assert_type((out.text_logits, out.visual_pred), jnp.float32)
    ref = emu2.Emu2Model(CFG).apply(params, batch)
    np.testing.assert_allclose(out.text_logits, ref.text_logits, atol=0.1)


def test_losses_match_hand_computation():
    logits = np.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]], np.float32)  # [1, 3, 3]
    targets = np.array([[0, 2, 2]], np.int32)
    pred = np.array([[[1.0, 1.0], [0.0, 2.0], [5.0, 5.0]]], np.float32)
    target = np.array([[[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]], np.float32)
    batch = {"targets": targets, "text_loss_mask": np.array([[1.0, 1.0, 0.0]], np.float32),
             "image_loss_mask": np.array([[1.0, 1.0, 0.0]], np.float32)}
    outputs = emu2.Emu2Output(text_logits=jnp.asarray(logits), visual_pred=jnp.asarray(pred),
                              visual_target=jnp.asarray(target))
    total, metrics = emu2.compute_losses(outputs, batch, text_weight=1.0, image_weight=0.5)
    log_z0, log_z1 = np.log(np.exp(2) + 2), np.log(np.e + 2)
    text = ((log_z0 - 2.0) + (log_z1 - 0.0)) / 2
    image = ((1.0 + 0.0) / 2 + (0.0 + 4.0) / 2) / 2
    np.testing.assert_allclose(metrics["text_loss"], text, rtol=1e-6)
    np.testing.assert_allclose(metrics["image_loss"], image, rtol=1e-6)
    np.testing.assert_allclose(total, text + 0.5 * image, rtol=1e-6)
    np.testing.assert_allclose(metrics["text_accuracy"], 0.5)
    assert metrics["text_tokens"] == 2 and metrics["image_tokens"] == 2


def test_losses_without_supervised_positions_are_zero():
    outputs = emu2.Emu2Output(text_logits=jnp.ones((1, 2, 4)), visual_pred=jnp.ones((1, 2, 3)),
                              visual_target=jnp.zeros((1, 2, 3)))
    zeros = np.zeros((1, 2), np.float32)
    total, metrics = emu2.compute_losses(outputs, {"targets": np.zeros((1, 2), np.int32),
                                                   "text_loss_mask": zeros, "image_loss_mask": zeros})
    assert float(total) == 0.0 and float(metrics["image_loss"]) == 0.0


def test_gradients_reach_every_trainable_component(model_and_params):
    model, params, batch = model_and_params

    def loss(p):
        return emu2.compute_losses(model.apply(p, batch), batch)[0]

    grads = jax.grad(loss)(params)["params"]
    for name in emu2.COMPONENTS:
        norm = float(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads[name])))
        assert norm > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("preset", ["emu1_14b", "emu1_release"])
def test_causal_transformer_connector_model(preset):
    """Both block styles: shapes, targets, and logical axes on every connector parameter. The
    release's style regresses LLM-width embeddings and reads CLS too (ln_visual, T5 blocks)."""
    ct = dataclasses.replace(presets.get_config(preset).causal_transformer, num_queries=N, width=32, depth=2,
                             num_heads=4, mlp_dim=64)
    config = dataclasses.replace(CFG, connector="causal_transformer", causal_transformer=ct)
    batch = _batch(np.random.default_rng(0))
    model = emu2.Emu2Model(config)
    boxed = model.init(jax.random.key(0), batch)
    params = nn.unbox(boxed)
    out = model.apply(params, batch)
    width = CFG.llm.hidden_size if preset == "emu1_release" else 32
    chex.assert_shape(out.visual_pred, (2, batch["tokens"].shape[1], width))
    assert float(jnp.abs(out.visual_target).sum()) > 0
    specs = nn.get_partition_spec(boxed)["params"]["connector"]
    for (path, spec), leaf in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, tuple)),
                                  jax.tree.leaves(params["params"]["connector"])):
        assert spec is not None and len(spec) == leaf.ndim and None not in spec, jax.tree_util.keystr(path)
    if preset == "emu1_release":
        assert params["params"]["connector"]["ln_visual"]["scale"].shape == (CFG.vision.width,)
        assert params["params"]["connector"]["rel_bias"].shape == (32, 4)


def test_every_parameter_has_logical_axes(model_and_params):
    model, _, batch = model_and_params
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    specs = nn.get_partition_spec(boxed)
    shapes = nn.unbox(boxed)
    for (path, spec), leaf in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: x is not None
                                                                       and not isinstance(x, dict)),
                                  jax.tree.leaves(shapes)):
        named = spec is not None and len(spec) == leaf.ndim
        assert named and all(n is not None or d == 1 for n, d in zip(spec, leaf.shape)), \
            f"{jax.tree_util.keystr(path)}: spec {spec} for shape {leaf.shape}"


def test_runtime_path_does_not_import_torch():
    code = ("import sys, emu2_jax.models.emu2, emu2_jax.models.presets, emu2_jax.summary; "
            "bad = [m for m in ('torch', 'transformers', 'timm', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("chunk", [3, 7])  # 3 splits the row unevenly (padding); 7 is a single chunk + pad
def test_chunked_text_loss_equals_the_full_loss(model_and_params, chunk):
    """Loss, metrics and gradients of `losses` with the cross-entropy in chunks equal the whole-sequence
    computation from the model's logits."""
    model, params, batch = model_and_params

    def loss(p, text_loss_chunk):
        total, metrics = model.apply(p, batch, text_weight=1.0, image_weight=0.5, text_loss_chunk=text_loss_chunk,
                                     method=emu2.Emu2Model.losses)
        return total, metrics

    (full, full_metrics), full_grads = jax.value_and_grad(loss, has_aux=True)(params, 0)
    (chunked, chunked_metrics), chunked_grads = jax.value_and_grad(loss, has_aux=True)(params, chunk)
    reference, _ = emu2.compute_losses(model.apply(params, batch), batch, text_weight=1.0, image_weight=0.5)
    np.testing.assert_allclose(full, reference, rtol=1e-6)
    np.testing.assert_allclose(chunked, full, rtol=1e-5)
    for key in ("text_loss", "image_loss", "text_accuracy", "text_tokens"):
        np.testing.assert_allclose(chunked_metrics[key], full_metrics[key], rtol=1e-5, err_msg=key)
    assert float(full_metrics["text_loss"]) > 0 and float(full_metrics["image_loss"]) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chunked_grads, full_grads)
    assert float(jnp.abs(chunked_grads["params"]["llm"]["lm_head"]["kernel"]).max()) > 0
