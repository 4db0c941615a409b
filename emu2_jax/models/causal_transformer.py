"""Emu (v1)'s Causal Transformer connector.

N learned queries pass through blocks of causal self-attention (query i sees queries <= i),
cross-attention to the encoder's patch features and a feed-forward layer, giving N visual
embeddings per image with a causal order the LLM can regress one by one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
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
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"


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


class CausalTransformerConnector(nn.Module):
    """Patch tokens [B, P, Dv] -> (visual embeddings [B, N, W], LLM embeddings [B, N, D])."""
    config: CausalTransformerConfig
    llm_width: int

    @nn.compact
    def __call__(self, patches: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        chex.assert_rank(patches, 3)
        if num_tokens != cfg.num_queries:
            raise ValueError(f"the Causal Transformer makes {cfg.num_queries} tokens per image, asked for {num_tokens}")
        queries = self.param("queries", layers.partitioned(nn.initializers.normal(0.02), (sh.QUERIES, sh.EMBED)),
                             (cfg.num_queries, cfg.width), cfg.param_dtype)
        x = jnp.broadcast_to(queries.astype(cfg.dtype), (patches.shape[0], *queries.shape))
        stack = layers.scan_blocks(CausalTransformerBlock, num_layers=cfg.depth, remat_policy=cfg.remat_policy,
                                   in_axes=(nn.broadcast,))
        x, _ = stack(cfg, name="blocks")(x, patches.astype(cfg.dtype))
        x = layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              name="norm")(x)
        projected = layers.dense(self.llm_width, (sh.VISION_EMBED, sh.EMBED), dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, name="project_up")(x)
        return x, projected
