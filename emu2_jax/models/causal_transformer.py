"""Emu (v1)'s Causal Transformer connector, in two block styles.

N learned queries pass through blocks of causal self-attention (query i sees queries <= i),
cross-attention to the encoder's tokens and a feed-forward layer, giving N visual embeddings per
image with a causal order the LLM can regress one by one.

- `block="pre_ln"` (the `emu1_14b` training preset): pre-LayerNorm blocks with biases, GELU MLP, a
  final LayerNorm, then a bias-free `project_up` to the LLM width; the regressed visual embeddings
  are the blocks' output (connector width).
- `block="t5"` (the released Emu v1, `Emu1/models/causal_former.py`): a T5 decoder stack
  (transformers' `T5Stack` with the cross-attention keys / values read from the encoder width).
  RMS norms without bias, bias-free projections, no 1/sqrt(d) logit scaling, a learned relative
  position bias (T5's causal log buckets) made by the first block and added in every block's
  self-attention, ReLU MLP, final RMS norm; then `project_up` (with bias: the release's
  `cformer.projection`) to the LLM width. The release puts `ln_visual` (a LayerNorm) on the encoder
  tokens first (`input_norm`), cross-attends to all of them, CLS included (`include_cls`), and
  regresses the projected, LLM-width embeddings (`output="llm"`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.models import layers


@dataclasses.dataclass(frozen=True)
class CausalTransformerConfig:
    num_queries: int = 32
    width: int = 1408
    depth: int = 12
    num_heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    block: str = "pre_ln"         # "pre_ln" (emu1_14b) or "t5" (the released Emu v1)
    input_norm: bool = False      # LayerNorm `ln_visual` (eps 1e-6) on the encoder tokens first
    include_cls: bool = False     # cross-attend to the encoder's CLS token as well as its patches
    output: str = "width"         # regressed embeddings: "width" (the blocks' output; project_up has no
    #                               bias) or "llm" (project_up's output, with a bias: the release)
    rel_buckets: int = 32         # t5: relative position buckets of the self-attention bias
    rel_max_distance: int = 128   # t5: distance from which all offsets share the last bucket
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"

    def __post_init__(self):
        if self.block not in ("pre_ln", "t5"):
            raise ValueError(f"causal_transformer.block={self.block!r}; expected 'pre_ln' or 't5'")
        if self.output not in ("width", "llm"):
            raise ValueError(f"causal_transformer.output={self.output!r}; expected 'width' or 'llm'")
        if self.width % self.num_heads:
            raise ValueError(f"causal_transformer.width={self.width} is not divisible by num_heads={self.num_heads}")


def _attention(cfg: CausalTransformerConfig, x: jax.Array, context: jax.Array,
               mask: jax.Array | None, name: str) -> jax.Array:
    head_dim = cfg.width // cfg.num_heads
    proj = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=True)
    q = layers.dense((cfg.num_heads, head_dim), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), name=f"{name}_q", **proj)(x)
    k = layers.dense((cfg.num_heads, head_dim), (sh.VISION_EMBED, sh.HEADS, sh.HEAD_DIM), name=f"{name}_k",
                     **proj)(context)
    v = layers.dense((cfg.num_heads, head_dim), (sh.VISION_EMBED, sh.HEADS, sh.HEAD_DIM), name=f"{name}_v",
                     **proj)(context)
    out = layers.dot_product_attention(q, k, v, mask, dtype=cfg.dtype)
    return layers.dense(cfg.width, (sh.HEADS, sh.HEAD_DIM, sh.EMBED), axis=(-2, -1), name=f"{name}_out",
                        **proj)(out)


class CausalTransformerBlock(nn.Module):
    config: CausalTransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, patches: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        norm = lambda name: layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                              param_dtype=cfg.param_dtype, name=name)
        h = norm("self_attn_norm")(x)
        x = x + _attention(cfg, h, h, layers.causal_mask(x.shape[1], x.shape[1]), "self_attn")
        x = x + _attention(cfg, norm("cross_attn_norm")(x), patches, None, "cross_attn")
        h = norm("mlp_norm")(x)
        h = layers.dense(cfg.mlp_dim, (sh.EMBED, sh.MLP), use_bias=True, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name="fc1")(h)
        h = layers.dense(cfg.width, (sh.MLP, sh.EMBED), use_bias=True, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name="fc2")(nn.gelu(h, approximate=False))
        x = nn.with_logical_constraint(x + h, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))
        return x, None


def t5_causal_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[length, length] int32 bucket of each (query i, key j) offset, T5's unidirectional scheme:
    d = max(i - j, 0); d < num_buckets / 2 is its own bucket, larger d share log-spaced buckets up to
    `max_distance` (float32 arithmetic truncated to an integer, as transformers computes it)."""
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    distance = np.maximum(i - j, 0)
    exact = num_buckets // 2
    scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact)) * np.float32(num_buckets - exact))
    large = np.minimum(exact + scaled.astype(np.int64), num_buckets - 1)
    return np.where(distance < exact, distance, large).astype(np.int32)


def _t5_attention(cfg: CausalTransformerConfig, x: jax.Array, context: jax.Array, bias: jax.Array | None,
                  name: str, context_axis: str) -> jax.Array:
    """T5 attention: no projection biases, no logit scaling; `bias` [H, T, S] (float, the float32
    minimum where masked) is added to the float32 logits."""
    head_dim = cfg.width // cfg.num_heads
    proj = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    q = layers.dense((cfg.num_heads, head_dim), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), name=f"{name}_q", **proj)(x)
    kv_axes = (context_axis, sh.HEADS, sh.HEAD_DIM)
    k = layers.dense((cfg.num_heads, head_dim), kv_axes, name=f"{name}_k", **proj)(context)
    v = layers.dense((cfg.num_heads, head_dim), kv_axes, name=f"{name}_v", **proj)(context)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias[None]
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    out = jnp.einsum("bhts,bshd->bthd", weights, v.astype(cfg.dtype))
    return layers.dense(cfg.width, (sh.HEADS, sh.HEAD_DIM, sh.EMBED), axis=(-2, -1), name=f"{name}_out",
                        **proj)(out)


class T5CausalBlock(nn.Module):
    """One T5 decoder block: x + SelfAttn(RMS(x)) with the shared position bias, x + CrossAttn(RMS(x),
    encoder tokens), x + MLP(RMS(x)) with ReLU."""
    config: CausalTransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        norm = lambda name: layers.RMSNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                           param_dtype=cfg.param_dtype, name=name)
        h = norm("self_attn_norm")(x)
        x = x + _t5_attention(cfg, h, h, bias, "self_attn", sh.EMBED)
        x = x + _t5_attention(cfg, norm("cross_attn_norm")(x), context, None, "cross_attn", sh.VISION_EMBED)
        h = layers.dense(cfg.mlp_dim, (sh.EMBED, sh.MLP), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         name="fc1")(norm("mlp_norm")(x))
        h = layers.dense(cfg.width, (sh.MLP, sh.EMBED), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         name="fc2")(nn.relu(h))
        x = nn.with_logical_constraint(x + h, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))
        return x, None


class CausalTransformerConnector(nn.Module):
    """Encoder tokens [B, P, Dv] -> (visual embeddings [B, N, W or D], LLM embeddings [B, N, D]).

    `P` counts the tokens the caller passes (patches, plus CLS first with `include_cls`)."""
    config: CausalTransformerConfig
    llm_width: int

    @nn.compact
    def __call__(self, tokens: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        chex.assert_rank(tokens, 3)
        if num_tokens != cfg.num_queries:
            raise ValueError(f"the Causal Transformer makes {cfg.num_queries} tokens per image, asked for {num_tokens}")
        if cfg.input_norm:
            tokens = layers.layer_norm(epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                       name="ln_visual")(tokens)
        queries = self.param("queries", layers.partitioned(nn.initializers.normal(0.02), (sh.QUERIES, sh.EMBED)),
                             (cfg.num_queries, cfg.width), cfg.param_dtype)
        x = jnp.broadcast_to(queries.astype(cfg.dtype), (tokens.shape[0], *queries.shape))
        if cfg.block == "t5":
            table = self.param("rel_bias", layers.partitioned(nn.initializers.normal(0.02), (sh.POSITIONS, sh.HEADS)),
                               (cfg.rel_buckets, cfg.num_heads), cfg.param_dtype)
            buckets = t5_causal_buckets(cfg.num_queries, cfg.rel_buckets, cfg.rel_max_distance)
            bias = jnp.moveaxis(table.astype(jnp.float32)[buckets], -1, 0)  # [H, N, N]
            causal = layers.causal_mask(cfg.num_queries, cfg.num_queries)[0]
            bias = jnp.where(causal, bias, jnp.finfo(jnp.float32).min)
            stack = layers.scan_blocks(T5CausalBlock, num_layers=cfg.depth, remat_policy=cfg.remat_policy,
                                       in_axes=(nn.broadcast, nn.broadcast))
            x, _ = stack(cfg, name="blocks")(x, tokens.astype(cfg.dtype), bias)
            x = layers.RMSNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               name="norm")(x)
        else:
            stack = layers.scan_blocks(CausalTransformerBlock, num_layers=cfg.depth, remat_policy=cfg.remat_policy,
                                       in_axes=(nn.broadcast,))
            x, _ = stack(cfg, name="blocks")(x, tokens.astype(cfg.dtype))
            x = layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  name="norm")(x)
        projected = layers.dense(self.llm_width, (sh.VISION_EMBED, sh.EMBED), use_bias=cfg.output == "llm",
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="project_up")(x)
        return (projected if cfg.output == "llm" else x), projected
