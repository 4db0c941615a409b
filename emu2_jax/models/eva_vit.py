"""EVA vision tower (Emu2's EVA-02-CLIP-E-plus encoder, Emu v1's EVA-CLIP encoder).

A plain ViT with a learned absolute position embedding and a CLS token, following the EVA
attention scheme (q and v biases, no k bias). `post_norm=True` is Emu2's "residual post-norm"
block, x + LN(attn(x)) then x + LN(mlp(x)); `post_norm=False` is the usual pre-norm block.
The output is the full token sequence after the last block (CLS first, then patches row-major),
optionally followed by a final LayerNorm: Emu2's tower has none (docs/model.md#visual-encoder).

The other EVA-02 ingredients (2D RoPE on patch tokens, SwiGLU MLP, sub-LN) are optional and off
for Emu2 and Emu v1; they follow timm's `Eva` (`use_rot_pos_emb`, `swiglu_mlp`, `scale_mlp` +
`scale_attn_inner`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from emu2_jax import sharding as sh
from emu2_jax.models import attention, layers

_RESIDUAL_AXES = (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 448
    patch_size: int = 14
    width: int = 1792
    depth: int = 64
    num_heads: int = 16
    mlp_dim: int = 15360
    qkv_bias: bool = True        # q and v biases; k has none (EVA scheme)
    post_norm: bool = True       # x + LN(attn(x)) (Emu2); False: x + attn(LN(x))
    use_rope: bool = False       # EVA-02 2D RoPE on the patch tokens' q and k (not on CLS)
    rope_ref_grid: int | None = None  # rescale RoPE positions to this pretraining grid (timm ref_feat_shape)
    swiglu: bool = False         # SiLU(fc1_g(x)) * fc1_x(x) -> fc2 instead of fc1 -> GELU -> fc2
    sub_ln: bool = False         # LayerNorm before attn.proj and before mlp.fc2
    layer_norm_eps: float = 1e-6
    final_norm: bool = False     # Emu2 has none
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attention: str = "auto"      # a key of attention.BACKENDS

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.use_rope and self.head_dim % 4:
            raise ValueError(f"use_rope needs head_dim={self.head_dim} divisible by 4")
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {sorted(layers.REMAT_POLICIES)}")
        attention.check_backend(self.attention)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


def rope_sin_cos(cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """sin, cos [grid**2, head_dim] of EVA-02's 2D RoPE (timm `RotaryEmbeddingCat`, interleaved pairs).

    The first half of each head's channels rotates with the patch row, the second half with the
    column, at frequencies 10000^(-k / (head_dim / 4)), k < head_dim / 4.
    """
    g, quarter = cfg.grid_size, cfg.head_dim // 4
    bands = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float32) / quarter)
    pos = np.arange(g, dtype=np.float32)
    if cfg.rope_ref_grid is not None:
        pos = pos / g * cfg.rope_ref_grid
    angles = pos[:, None] * bands                                   # [g, quarter]
    rows = np.broadcast_to(angles[:, None, :], (g, g, quarter))
    cols = np.broadcast_to(angles[None, :, :], (g, g, quarter))
    angles = np.concatenate([rows, cols], axis=-1).reshape(g * g, 2 * quarter)
    angles = np.repeat(angles, 2, axis=-1)                           # pairs (2i, 2i + 1) share an angle
    return np.sin(angles), np.cos(angles)


def _apply_rope(x: jax.Array, sin: np.ndarray, cos: np.ndarray) -> jax.Array:
    """Rotates channel pairs (2i, 2i + 1) of x [B, N, H, D] by the per-position angles (in float32)."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


class EvaAttention(nn.Module):
    """Multi-head self-attention without mask; q/v biases only (EVA's k bias is fixed at zero)."""
    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        proj_in = dict(features=(cfg.num_heads, cfg.head_dim), kernel_axes=(sh.EMBED, sh.HEADS, sh.HEAD_DIM),
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        head_axes = (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_HEADS, sh.ACT_HEAD_DIM)
        q, k, v = (nn.with_logical_constraint(checkpoint_name(layers.dense(**proj_in, use_bias=bias, name=n)(x), tag),
                                              head_axes)
                   for n, bias, tag in (("q", cfg.qkv_bias, layers.QUERY_PROJ), ("k", False, layers.KEY_PROJ),
                                        ("v", cfg.qkv_bias, layers.VALUE_PROJ)))
        if cfg.use_rope:
            sin, cos = rope_sin_cos(cfg)
            q, k = (jnp.concatenate([t[:, :1], _apply_rope(t[:, 1:], sin, cos)], axis=1) for t in (q, k))
        out = attention.attention(q, k, v, implementation=cfg.attention, causal=False, scale=cfg.head_dim ** -0.5,
                                  dtype=cfg.dtype)
        out = nn.with_logical_constraint(out, head_axes)
        if cfg.sub_ln:  # LayerNorm over all heads' channels together
            normed = layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                       name="norm")(out.reshape(*out.shape[:2], cfg.width))
            out = normed.reshape(out.shape)
        out = layers.dense(cfg.width, (sh.HEADS, sh.HEAD_DIM, sh.EMBED), axis=(-2, -1), use_bias=True,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="proj")(out)
        return checkpoint_name(out, layers.OUT_PROJ)


class EvaMlp(nn.Module):
    """fc1 -> exact (erf) GELU, as torch's nn.GELU() (or SwiGLU) -> [sub-LN] -> fc2."""
    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        fc1 = lambda name: layers.dense(cfg.mlp_dim, (sh.EMBED, sh.MLP), use_bias=True, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, name=name)
        if cfg.swiglu:
            h = nn.silu(fc1("fc1_g")(x)) * fc1("fc1_x")(x)
        else:
            h = nn.gelu(fc1("fc1")(x), approximate=False)
        h = nn.with_logical_constraint(h, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_MLP))
        if cfg.sub_ln:
            h = layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  name="norm")(h)
        out = layers.dense(cfg.width, (sh.MLP, sh.EMBED), use_bias=True, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, name="fc2")(h)
        return checkpoint_name(out, layers.MLP_OUT)


class EvaBlock(nn.Module):
    """One transformer block; `__call__(x, None)` returns `(x, None)` for `layers.scan_blocks`."""
    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        cfg = self.config
        norm = dict(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        norm1, norm2 = layers.layer_norm(**norm, name="norm1"), layers.layer_norm(**norm, name="norm2")
        attn, mlp = EvaAttention(cfg, name="attn"), EvaMlp(cfg, name="mlp")
        if cfg.post_norm:
            x = x + norm1(attn(x))
            x = nn.with_logical_constraint(x, _RESIDUAL_AXES)
            x = x + norm2(mlp(x))
        else:
            x = x + attn(norm1(x))
            x = nn.with_logical_constraint(x, _RESIDUAL_AXES)
            x = x + mlp(norm2(x))
        return nn.with_logical_constraint(x, _RESIDUAL_AXES), None


class EvaVisionTransformer(nn.Module):
    """images [B, H, W, 3] (normalised, NHWC, H == W == image_size) -> tokens [B, 1 + grid**2, width]."""
    config: VisionConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"EvaVisionTransformer expects images of shape [B, {cfg.image_size}, "
                             f"{cfg.image_size}, 3] (NHWC), got {tuple(images.shape)}")
        batch = images.shape[0]

        patches = nn.Conv(
            cfg.width, kernel_size=(cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID", use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=layers.partitioned(layers.default_kernel_init,
                                           (sh.CONV_SPATIAL, sh.CONV_SPATIAL_W, sh.CONV_IN, sh.CONV_OUT)),
            bias_init=layers.partitioned(nn.initializers.zeros_init(), (sh.CONV_OUT,)),
            name="patch_embed",
        )(images.astype(cfg.dtype))
        # [B, grid, grid, width] -> [B, grid * grid, width]: row-major (h * grid + w), as torch's flatten(2).
        x = patches.reshape(batch, cfg.num_patches, cfg.width)

        embed_init = nn.initializers.truncated_normal(0.02)
        cls_token = self.param("cls_token", layers.partitioned(embed_init, (None, None, sh.EMBED)),
                               (1, 1, cfg.width), cfg.param_dtype)
        pos_embed = self.param("pos_embed", layers.partitioned(embed_init, (None, sh.POSITIONS, sh.EMBED)),
                               (1, 1 + cfg.num_patches, cfg.width), cfg.param_dtype)
        cls = jnp.broadcast_to(cls_token.astype(cfg.dtype), (batch, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + pos_embed.astype(cfg.dtype)
        x = nn.with_logical_constraint(x, _RESIDUAL_AXES)

        blocks = layers.scan_blocks(EvaBlock, num_layers=cfg.depth, remat_policy=cfg.remat_policy)
        x, _ = blocks(cfg, name="blocks")(x, None)

        if cfg.final_norm:
            x = layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  name="norm")(x)
        chex.assert_shape(x, (batch, 1 + cfg.num_patches, cfg.width))
        return nn.with_logical_constraint(x, _RESIDUAL_AXES)
