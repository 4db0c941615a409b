"""Attention backends: splash (Pallas interpret mode on CPU) against xla, backend selection and errors.

cuDNN cannot run on CPU: only its selection and its CPU error are tested here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import stage2
from emu2_jax import sharding as sh
from emu2_jax import train
from emu2_jax.models import attention, presets
from emu2_jax.models.eva_vit import EvaVisionTransformer, VisionConfig
from emu2_jax.models.llama import LlamaDecoder
from tests.models.test_llama import arange_positions, init_params, tiny_config

TOL = 2e-5


def _qkv(batch: int, length: int, heads: int, kv_heads: int, head_dim: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, heads, head_dim)] + [(batch, length, kv_heads, head_dim)] * 2
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def _packed_segments(batch: int, length: int) -> jax.Array:
    """Row 0: two packed segments then padding (0); row 1: one segment then padding."""
    rows = [[1] * 70 + [2] * (length - 90) + [0] * 20, [3] * (length - 5) + [0] * 5]
    return jnp.asarray(rows[:batch], jnp.int32)


def _run(backend: str, q, k, v, **kwargs):
    return jax.jit(lambda q, k, v: attention.attention(q, k, v, implementation=backend, **kwargs))(q, k, v)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_splash_parity_causal_packed_with_padding(kv_heads):
    # 200 tokens: not a multiple of the 128-token tile, so the kernel also pads.
    q, k, v = _qkv(2, 200, 4, kv_heads)
    segments = _packed_segments(2, 200)
    got = _run("splash", q, k, v, causal=True, segment_ids=segments)
    want = _run("xla", q, k, v, causal=True, segment_ids=segments)
    real = np.asarray(segments != 0)  # padding queries' outputs are unspecified (module docstring)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("length", [65, 256], ids=["padded", "whole_tiles"])
def test_splash_parity_non_causal(length):
    q, k, v = _qkv(2, length, 4, 4, seed=1)
    got = _run("splash", q, k, v, causal=False, scale=0.1)
    want = _run("xla", q, k, v, causal=False, scale=0.1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=0)


def test_splash_parity_causal_without_segments():
    q, k, v = _qkv(1, 384, 2, 2, seed=2)  # 384 = 3 tiles of 128
    np.testing.assert_allclose(np.asarray(_run("splash", q, k, v, causal=True)),
                               np.asarray(_run("xla", q, k, v, causal=True)), atol=TOL, rtol=0)


def test_splash_gradient_parity():
    q, k, v = _qkv(2, 130, 4, 2, seed=3)
    segments = _packed_segments(2, 130)
    weight = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32) * (segments != 0)[..., None, None]

    def loss(backend):
        def f(q, k, v):
            out = attention.attention(q, k, v, implementation=backend, causal=True, segment_ids=segments)
            return jnp.sum(out * weight)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(loss("splash"), loss("xla")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


def test_splash_parity_under_mesh_shard_map():
    """Batch over (data, fsdp), heads over tensor: the kernel runs per shard inside shard_map."""
    q, k, v = _qkv(4, 128, 4, 2, seed=5)
    segments = jnp.concatenate([_packed_segments(2, 128)] * 2)
    mesh = sh.create_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
        got = _run("splash", q, k, v, causal=True, segment_ids=segments)
        text = jax.jit(lambda q, k, v: attention.attention(q, k, v, implementation="splash", causal=True,
                                                           segment_ids=segments)).lower(q, k, v).as_text()
    assert "shard_map" in text or "manual" in text
    want = _run("xla", q, k, v, causal=True, segment_ids=segments)
    real = np.asarray(segments != 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=TOL, rtol=0)


def test_splash_refuses_heads_that_do_not_split_over_the_mesh():
    q, k, v = _qkv(4, 128, 4, 1)
    with (jax.set_mesh(sh.create_mesh((2, 2, 2))), nn.logical_axis_rules(sh.LOGICAL_RULES),
          pytest.raises(ValueError, match="1 key/value heads do not split over the 2 shards")):
        _run("splash", q, k, v, causal=True)


def test_auto_is_xla_on_cpu_and_cudnn_is_a_clear_error():
    assert jax.default_backend() == "cpu"
    assert attention.resolve("auto", jnp.bfloat16) == "xla"
    q, k, v = _qkv(1, 8, 2, 2)
    with pytest.raises(ValueError, match=r"attention='cudnn' needs a GPU, but JAX's backend is 'cpu'"):
        _run("cudnn", q, k, v, causal=True)


def test_configs_check_the_backend_name_and_presets_set_both_towers():
    with pytest.raises(ValueError, match=r"attention='flash'; expected one of"):
        tiny_config(attention="flash")
    with pytest.raises(ValueError, match=r"attention='flash'; expected one of"):
        VisionConfig(attention="flash")
    config = presets.get_config("tiny", attention="splash")
    assert config.llm.attention == config.vision.attention == "splash"
    assert presets.get_config("tiny").llm.attention == "auto"


def test_llama_decoder_splash_parity():
    """Logits and parameter gradients (scanned, rematerialised layers) of packed rows with padding."""
    configs = {name: tiny_config(num_layers=1, num_kv_heads=2, attention=name, remat_policy="minimal")
               for name in ("xla", "splash")}
    params = init_params(configs["xla"])["params"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 24)))
    segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], jnp.int32)
    real = segments != 0

    def loss(params, config):
        logits = LlamaDecoder(config).apply({"params": params}, tokens, arange_positions(2, 24), segments,
                                            method=LlamaDecoder.forward)
        return jnp.sum(jnp.where(real[..., None], logits, 0.0) ** 2) / logits.size, logits

    results = {name: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, cfg)
               for name, cfg in configs.items()}
    (grads, logits), (want_grads, want_logits) = results["splash"], results["xla"]
    np.testing.assert_allclose(np.asarray(logits)[np.asarray(real)], np.asarray(want_logits)[np.asarray(real)],
                               atol=TOL, rtol=0)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=0)


def test_eva_tower_splash_parity():
    configs = {name: VisionConfig(image_size=56, patch_size=14, width=64, depth=2, num_heads=2, mlp_dim=128,
                                  attention=name) for name in ("xla", "splash")}
    images = jax.random.normal(jax.random.key(1), (2, 56, 56, 3))
    params = nn.unbox(EvaVisionTransformer(configs["xla"]).init(jax.random.key(0), images))
    tokens = {name: jax.jit(EvaVisionTransformer(cfg).apply)(params, images) for name, cfg in configs.items()}
    np.testing.assert_allclose(np.asarray(tokens["splash"]), np.asarray(tokens["xla"]), atol=TOL, rtol=0)


def test_paper_sized_train_step_lowers_with_splash_on_a_mesh():
    """Stage 2 (448-px tower: 1025 tokens, padded to 1152; 52 LLM heads over tensor 2) traces with the
    kernels inside shard_map under the trainer's mesh and rules; nothing is compiled."""
    config = stage2.get_config()
    config.update(allow_large_on_cpu=True, mesh_shape=(1, 4, 2), grad_accum_steps=1, global_batch_size=8,
                  seq_len=128, max_images_per_row=1)
    config.model_overrides.attention = "splash"
    config.model_overrides.remat_policy = "full"
    trainer = train.create_trainer(config)
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype, sharding=trainer.batch_sharding),
                         trainer.task.dummy_batch(8))
    assert "sdy.manual_computation" in trainer.train_step.lower(trainer.abstract_state, batch).as_text()
