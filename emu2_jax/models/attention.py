"""Self-attention backends, chosen by a model config's `attention` field (docs/sharding.md#attention-backends).

- `xla`: `layers.dot_product_attention`, plain XLA with the [B, H, T, S] float32 logits materialised.
- `splash`: JAX's Pallas TPU splash attention kernel (flash-style, blockwise; causal / full masks,
  segment ids, grouped-query heads). On CPU it runs in Pallas interpret mode (slow; for tests).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on GPU
  (bfloat16 / float16 only).
- `auto`: splash on TPU, cudnn on GPU with a half-precision compute dtype, xla otherwise.

Queries whose segment id is 0 (padding) get unspecified outputs from splash and cudnn (they attend
among the padding, where xla averages over every key); no other token attends to them, so real
tokens' outputs, losses and gradients are the same with every backend.
"""
from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from emu2_jax import sharding as sh
from emu2_jax.models import layers

BACKENDS = ("xla", "splash", "cudnn", "auto")
# Splash tiles must be multiples of the TPU lane width (128) and divide the (padded) length; the
# largest that does is used (fewer grid steps).
SPLASH_LANES = 128
SPLASH_BLOCKS = (512, 256, 128)
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_backend(name: str) -> None:
    """The config-time check of an `attention` field."""
    if name not in BACKENDS:
        raise ValueError(f"attention={name!r}; expected one of {BACKENDS}")


def resolve(name: str, dtype: Any) -> str:
    """The backend `name` runs as on this host (`auto` picked by `jax.default_backend()`), or a
    one-line error when it cannot run here."""
    check_backend(name)
    platform = jax.default_backend()
    if name == "auto":
        if platform == "tpu":
            return "splash"
        return "cudnn" if platform == "gpu" and jnp.dtype(dtype) in _HALF else "xla"
    if name == "cudnn" and platform != "gpu":
        raise ValueError(f"attention='cudnn' needs a GPU, but JAX's backend is {platform!r}; "
                         "set the model's attention to 'xla' or 'auto'")
    if name == "cudnn" and jnp.dtype(dtype) not in _HALF:
        raise ValueError(f"attention='cudnn' needs a bfloat16 or float16 compute dtype, got {jnp.dtype(dtype)}; "
                         "set the model's attention to 'xla' or 'auto'")
    if name == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"attention='splash' is a TPU kernel (interpreted on CPU); JAX's backend is {platform!r}")
    return name


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, q_offset: jax.Array | int = 0, *,
                   causal: bool = True) -> jax.Array:
    """[B, 1, T, S] (True = attend): same segment, query not padding (segment 0) and, if `causal`,
    key slot <= query slot (query i sits at slot q_offset + i)."""
    same = (q_segments[:, :, None] == kv_segments[:, None, :]) & (q_segments != 0)[:, :, None]
    if not causal:
        return same[:, None]
    return layers.causal_mask(q_segments.shape[1], kv_segments.shape[1], q_offset) & same[:, None]


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *, implementation: str, causal: bool,
              segment_ids: jax.Array | None = None, scale: float | None = None, dtype: Any = jnp.float32
              ) -> jax.Array:
    """Self-attention with the backend `implementation` (a key of BACKENDS).

    query [B, T, H, D]; key, value [B, T, K, D] with H a multiple of K; segment_ids [B, T] (tokens
    attend to tokens of the same id, 0 = padding; None = one segment per row). Returns [B, T, H, D]
    in `dtype`. `scale` defaults to D ** -0.5.
    """
    chex.assert_rank([query, key, value], 4)
    chex.assert_equal_shape([key, value])
    chex.assert_equal_shape_prefix([query, key], 2)
    chex.assert_axis_dimension(key, 3, query.shape[3])
    if segment_ids is not None:
        chex.assert_shape(segment_ids, query.shape[:2])
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"{query.shape[2]} query heads are not a multiple of {key.shape[2]} key/value heads")
    backend = resolve(implementation, dtype)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if backend == "cudnn":
        return _cudnn(query, key, value, segment_ids, causal=causal, scale=scale, dtype=dtype)
    if backend == "splash":
        return _splash_sharded(query, key, value, segment_ids, causal=causal, scale=scale).astype(dtype)
    mask = None
    if segment_ids is not None:
        mask = attention_mask(segment_ids, segment_ids, causal=causal)
    elif causal:
        mask = layers.causal_mask(query.shape[1], key.shape[1])
    return layers.dot_product_attention(query, key, value, mask, scale=scale, dtype=dtype)


def _cudnn(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array | None, *,
           causal: bool, scale: float, dtype: Any) -> jax.Array:
    # jax.nn.dot_product_attention takes no segment ids: packed rows become a [B, 1, T, T] mask (cuDNN
    # adds it as a bias). Padding attends to padding, so no row is fully masked.
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    query, key, value = (t.astype(dtype) for t in (query, key, value))
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=causal,
                                        implementation="cudnn")


def _splash_sharded(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array | None, *,
                    causal: bool, scale: float) -> jax.Array:
    """`_splash` under `jax.shard_map` when a mesh is in context (a Pallas kernel is not partitioned by
    XLA): batch and heads split as the logical rules in force place the activations; the sequence
    must not be split (the kernel sees whole rows)."""
    run = functools.partial(_splash, causal=causal, scale=scale)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(query, key, value, segment_ids)
    rules = nn.get_logical_axis_rules()
    q_spec = nn.logical_to_mesh_axes((sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_HEADS, sh.ACT_HEAD_DIM), rules)
    kv_spec = nn.logical_to_mesh_axes((sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_KV_HEADS, sh.ACT_HEAD_DIM), rules)
    if q_spec[1] is not None:
        raise ValueError(f"attention='splash' needs whole sequences per device, but {sh.ACT_LENGTH!r} maps to "
                         f"mesh axes {q_spec[1]!r}")
    for tensor, spec, what in ((query, q_spec, "query heads"), (key, kv_spec, "key/value heads")):
        shards = sh.shard_count(mesh, spec[2])
        if tensor.shape[2] % shards:
            raise ValueError(f"attention='splash': {tensor.shape[2]} {what} do not split over the {shards} "
                             f"shards of mesh axes {spec[2]!r}")
    seg_spec = jax.P(q_spec[0], None)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: run(q, k, v, None), mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                             out_specs=q_spec, check_vma=False)(query, key, value)
    return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(query, key, value, segment_ids)


def _splash(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array | None, *,
            causal: bool, scale: float) -> jax.Array:
    """Splash attention on one device's [B, T, H, D] / [B, T, K, D] (query's dtype out)."""
    batch, length, heads, _ = query.shape
    padded = -(-length // SPLASH_LANES) * SPLASH_LANES
    if padded != length:
        # Rows are padded to a whole number of tiles; the appended positions are padding (segment 0):
        # they come after every real token (invisible under a causal mask) and no real segment is 0.
        ids = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
        pad = lambda t: jnp.pad(t, [(0, 0), (0, padded - length)] + [(0, 0)] * (t.ndim - 2))
        query, key, value, segment_ids = pad(query), pad(key), pad(value), pad(ids)
    kernel = _splash_kernel(heads, padded, causal)
    # The kernel takes one example in head-major layout [H, T, D] and does not scale the logits.
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (query * jnp.asarray(scale, query.dtype), key, value))
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        ids = segment_ids.astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(q, k, v, ids)
    return jnp.swapaxes(out, 1, 2)[:, :length]


def _splash_kernel(heads: int, length: int, causal: bool) -> splash.SplashAttentionKernel:
    """The splash kernel for [heads, length, D] queries: causal or full mask, one block size for the
    forward and both backward kernels."""
    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    head_mask = splash_mask.CausalMask((length, length)) if causal else splash_mask.FullMask((length, length))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=jax.default_backend() != "tpu")
