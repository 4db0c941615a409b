"""Emu2's connector: mean-pool the encoder's patch grid to n x n tokens, then a linear map.

The pooled features (encoder width) are also the regression targets of the LLM; the
projected ones (LLM width) replace the image placeholder embeddings.
"""
from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.models import layers


def mean_pool_patches(patches: jax.Array, num_tokens: int) -> jax.Array:
    """[B, g*g, D] row-major patch grid -> [B, num_tokens, D] by non-overlapping average pooling.

    Same as Emu2's `F.avg_pool2d(kernel=stride, stride=stride)` with stride = g // sqrt(num_tokens).
    """
    batch, num_patches, width = patches.shape
    grid = math.isqrt(num_patches)
    side = math.isqrt(num_tokens)
    if grid * grid != num_patches:
        raise ValueError(f"patch count {num_patches} is not a square grid")
    if side * side != num_tokens or grid % side:
        raise ValueError(f"num_tokens={num_tokens} must be n*n with n dividing the {grid}x{grid} patch grid")
    stride = grid // side
    x = patches.reshape(batch, side, stride, side, stride, width)
    return x.mean(axis=(2, 4), dtype=jnp.float32).astype(patches.dtype).reshape(batch, num_tokens, width)


class MeanPoolProjector(nn.Module):
    """Patch tokens -> (pooled features [B, n, Dv], LLM embeddings [B, n, D])."""
    llm_width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(patches, 3)
        pooled = mean_pool_patches(patches, num_tokens)
        projected = layers.dense(self.llm_width, (sh.VISION_EMBED, sh.EMBED), dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="project_up")(pooled)
        return pooled, projected
