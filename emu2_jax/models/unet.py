"""SDXL / SD-1.5 style conditional UNet (diffusers `UNet2DConditionModel` equivalent), NHWC.

Parameter names mirror the diffusers module tree (`down_blocks_0/resnets_1/conv1/kernel` for
`down_blocks.0.resnets.1.conv1.weight`) so that `emu2_jax.convert.diffusers` can map keys by rule.
The stacks of transformer blocks inside each `Transformer2DModel` are `nn.scan`ned (leading
`layers` axis): SDXL has 70 of them and scanning keeps compile time flat.

The convolutional blocks it shares with the VAE live in `emu2_jax.models.conv_blocks`. Everything
here is UNet-only (config, presets and diffusers reader, embeddings, the `Transformer2D` stack, the
down / mid / up blocks), so the file stays over 400 lines rather than spread one model over two.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.models import layers
from emu2_jax.models.conv_blocks import (
    IMAGE_ACT_AXES,
    Downsample,
    ResnetBlock,
    Upsample,
    attend,
    conv,
    group_norm,
    maybe_remat,
)

Dtype = Any

TOKEN_ACT_AXES = (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED)  # flattened feature maps / context

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
NUM_TIME_IDS = 6  # SDXL micro-conditioning: original size (2) + crop top-left (2) + target size (2)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Topology of the UNet. Per-block tuples index the down blocks; the mid block uses the last
    entry and the up blocks the reversed tuples (as diffusers does).

    `num_attention_heads` are head COUNTS (head_dim = block channels // heads). Diffusers configs
    with `num_attention_heads: null` store these counts in `attention_head_dim`; see
    `unet_config_from_diffusers`. Linear (SDXL) and 1x1-conv (SD-1.5) `proj_in`/`proj_out` are the
    same operation on NHWC maps, so both layouts load into the same model.
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    num_attention_heads: tuple[int, ...] = (5, 10, 20)
    cross_attention_dim: int = 1792
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    addition_embed_type: str | None = "text_time"   # None or "text_time" (SDXL micro-conditioning)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 3328  # text_embeds dim + 6 * addition_time_embed_dim
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"  # a key of layers.REMAT_POLICIES; applied to resnets and transformer blocks

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "transformer_layers_per_block",
                     "num_attention_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNetConfig.{name}={getattr(self, name)} needs {n} entries "
                                 f"(one per block_out_channels)")
        if any(t not in DOWN_BLOCK_TYPES for t in self.down_block_types):
            raise ValueError(f"down_block_types={self.down_block_types}; supported: {DOWN_BLOCK_TYPES}")
        mirrored = tuple(t.replace("Down", "Up") for t in reversed(self.down_block_types))
        if self.up_block_types != mirrored:
            raise ValueError(f"up_block_types={self.up_block_types} must mirror down_block_types ({mirrored})")
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if c % h or c % self.norm_num_groups:
                raise ValueError(f"block channels {c} must divide by heads {h} and groups {self.norm_num_groups}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r}; supported: None, 'text_time'")
        if self.addition_embed_type and self.text_embeds_dim <= 0:
            raise ValueError(f"projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} "
                             f"leaves no room for text_embeds next to {NUM_TIME_IDS} x {self.addition_time_embed_dim}")
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {sorted(layers.REMAT_POLICIES)}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def text_embeds_dim(self) -> int:
        return self.projection_class_embeddings_input_dim - NUM_TIME_IDS * self.addition_time_embed_dim


def sdxl_emu2_unet_config(**overrides: Any) -> UNetConfig:
    """Emu2-Gen's visual decoder UNet (docs/model.md#visual-decoder): SDXL-base with 1792-dim cross-attention."""
    return UNetConfig(**overrides)


def sd15_unet_config(cross_attention_dim: int = 768, **overrides: Any) -> UNetConfig:
    """Stable Diffusion 1.5 topology (Emu v1's decoder): 8 heads everywhere, no added embedding."""
    kwargs: dict[str, Any] = {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "transformer_layers_per_block": (1, 1, 1, 1),
        "num_attention_heads": (8, 8, 8, 8),
        "cross_attention_dim": cross_attention_dim,
        "addition_embed_type": None,
    }
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


def tiny_sdxl_unet_config(**overrides: Any) -> UNetConfig:
    """A few-thousand-parameter SDXL-shaped UNet for tests (text_embeds dim 48, 16x16 latents)."""
    kwargs: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "num_attention_heads": (2, 4),
        "cross_attention_dim": 48,
        "norm_num_groups": 8,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 48 + NUM_TIME_IDS * 8,
    }
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


def unet_config_from_diffusers(cfg: Mapping[str, Any], **overrides: Any) -> UNetConfig:
    """`UNetConfig` from a diffusers `UNet2DConditionModel` config dict (its config.json).

    Rejects features this port does not implement instead of silently ignoring them.
    """
    n = len(cfg["block_out_channels"])

    def per_block(value: Any) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

    only_supported = {"class_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
                   "dual_cross_attention": False, "only_cross_attention": False, "upcast_attention": False,
                   "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
                   "attention_type": "default", "mid_block_type": "UNetMidBlock2DCrossAttn",
                   "act_fn": "silu", "center_input_sample": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
                   "downsample_padding": 1, "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
                   "reverse_transformer_layers_per_block": None, "cross_attention_norm": None,
                   "time_embedding_dim": None, "timestep_post_act": None}
    for key, supported in only_supported.items():
        if cfg.get(key, supported) != supported:
            raise ValueError(f"diffusers UNet config {key}={cfg[key]!r} is not supported (only {supported!r})")
    if not isinstance(cfg.get("layers_per_block", 2), int):
        raise ValueError(f"per-block layers_per_block={cfg['layers_per_block']} is not supported")  # noqa: TRY004
    # diffusers issue #2011: with num_attention_heads null, attention_head_dim holds head counts.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    kwargs: dict[str, Any] = {
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "block_out_channels": tuple(cfg["block_out_channels"]),
        "down_block_types": tuple(cfg["down_block_types"]),
        "up_block_types": tuple(cfg["up_block_types"]),
        "layers_per_block": cfg.get("layers_per_block", 2),
        "transformer_layers_per_block": per_block(cfg.get("transformer_layers_per_block", 1)),
        "num_attention_heads": per_block(heads),
        "cross_attention_dim": cfg["cross_attention_dim"],
        "norm_num_groups": cfg.get("norm_num_groups", 32),
        "norm_eps": cfg.get("norm_eps", 1e-5),
        "flip_sin_to_cos": cfg.get("flip_sin_to_cos", True),
        "freq_shift": float(cfg.get("freq_shift", 0)),
        "addition_embed_type": cfg.get("addition_embed_type"),
    }
    if kwargs["addition_embed_type"] is not None:
        kwargs["addition_time_embed_dim"] = cfg["addition_time_embed_dim"]
        kwargs["projection_class_embeddings_input_dim"] = cfg["projection_class_embeddings_input_dim"]
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


def unet_dummy_inputs(config: UNetConfig, batch: int = 1) -> dict[str, Any]:
    """Smallest well-formed inputs (keyword arguments of `UNet.__call__`), e.g. for `init`."""
    size = 2 ** (len(config.block_out_channels) - 1)
    inputs: dict[str, Any] = {
        "sample": jnp.zeros((batch, size, size, config.in_channels), jnp.float32),
        "timesteps": jnp.zeros((batch,), jnp.float32),
        "encoder_hidden_states": jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32),
        "added_cond": None,
    }
    if config.addition_embed_type == "text_time":
        inputs["added_cond"] = {"text_embeds": jnp.zeros((batch, config.text_embeds_dim), jnp.float32),
                                    "time_ids": jnp.zeros((batch, NUM_TIME_IDS), jnp.float32)}
    return inputs


# ----------------------------------------------------------------------------------------------
# Embeddings and attention.


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [N] -> [N, dim] (float32), as diffusers `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`)."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"use_bias": True, "dtype": self.dtype, "param_dtype": self.param_dtype}
        x = layers.dense(self.features, (sh.EMBED, sh.MLP), name="linear_1", **kw)(x)
        return layers.dense(self.features, (sh.MLP, sh.EMBED), name="linear_2", **kw)(nn.silu(x))


class Attention(nn.Module):
    """`attend` as a module (the UNet's attn1 / attn2, no q/k/v bias)."""
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        return attend(x, context, heads=self.heads, head_dim=self.head_dim, qkv_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype)


# ----------------------------------------------------------------------------------------------
# Transformer blocks.


class GEGLU(nn.Module):
    """proj to 2 x inner, then value * gelu(gate) (exact erf GELU, as torch F.gelu)."""
    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(2 * self.inner_dim, (sh.EMBED, sh.MLP), use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width; submodule names follow diffusers' `ff.net.{0,2}`."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(4 * dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        h = nn.with_logical_constraint(h, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_MLP))
        return layers.dense(dim, (sh.MLP, sh.EMBED), use_bias=True, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock`: pre-LN self-attn, cross-attn, GEGLU MLP. Scan-compatible."""
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> tuple[jax.Array, None]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attn = dict(heads=self.heads, head_dim=self.head_dim, **kw)
        x = x + Attention(name="attn1", **attn)(layers.layer_norm(epsilon=1e-5, name="norm1", **kw)(x))
        x = x + Attention(name="attn2", **attn)(layers.layer_norm(epsilon=1e-5, name="norm2", **kw)(x), context)
        x = x + FeedForward(name="ff", **kw)(layers.layer_norm(epsilon=1e-5, name="norm3", **kw)(x))
        return nn.with_logical_constraint(x, TOKEN_ACT_AXES), None


class Transformer2D(nn.Module):
    """diffusers `Transformer2DModel` (continuous input): GroupNorm, proj_in, blocks, proj_out, residual."""
    heads: int
    num_layers: int
    groups: int
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = group_norm(self.groups, 1e-6, name="norm", **kw)(x).reshape(b, height * width, c)
        # A 1x1 conv (SD-1.5) and a Linear (SDXL) projection are the same op on channels-last tokens.
        h = layers.dense(c, (sh.CONV_IN, sh.EMBED), use_bias=True, name="proj_in", **kw)(h)
        blocks = layers.scan_blocks(TransformerBlock, num_layers=self.num_layers, remat_policy=self.remat_policy)
        h, _ = blocks(heads=self.heads, head_dim=c // self.heads, name="transformer_blocks", **kw)(h, context)
        h = layers.dense(c, (sh.EMBED, sh.CONV_OUT), use_bias=True, name="proj_out", **kw)(h)
        return h.reshape(b, height, width, c) + x


# ----------------------------------------------------------------------------------------------
# UNet blocks.


class DownBlock(nn.Module):
    """`DownBlock2D` / `CrossAttnDownBlock2D` (heads > 0).

    Returns the block output and the skip activations it contributes to the up path.
    """
    out_channels: int
    num_layers: int
    groups: int
    epsilon: float
    heads: int = 0
    transformer_layers: int = 1
    add_downsample: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None,
                 context: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        resnet_cls = maybe_remat(ResnetBlock, self.remat_policy)
        skips = []
        for i in range(self.num_layers):
            x = resnet_cls(self.out_channels, self.groups, self.epsilon, name=f"resnets_{i}", **kw)(x, temb)
            if self.heads:
                x = Transformer2D(self.heads, self.transformer_layers, self.groups, self.remat_policy,
                                  name=f"attentions_{i}", **kw)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nn.Module):
    """`UpBlock2D` / `CrossAttnUpBlock2D` (heads > 0): each resnet eats the latest skip activation."""
    out_channels: int
    num_layers: int
    groups: int
    epsilon: float
    heads: int = 0
    transformer_layers: int = 1
    add_upsample: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
                 context: jax.Array | None = None) -> jax.Array:
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock with {self.num_layers} resnets got {len(skips)} skip activations")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        resnet_cls = maybe_remat(ResnetBlock, self.remat_policy)
        for i, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)
            x = resnet_cls(self.out_channels, self.groups, self.epsilon, name=f"resnets_{i}", **kw)(x, temb)
            if self.heads:
                x = Transformer2D(self.heads, self.transformer_layers, self.groups, self.remat_policy,
                                  name=f"attentions_{i}", **kw)(x, context)
        if self.add_upsample:
            x = Upsample(name="upsamplers_0", **kw)(x)
        return x


class MidBlockCrossAttn(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnet, transformer, resnet."""
    heads: int
    transformer_layers: int
    groups: int
    epsilon: float
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        resnet_cls = maybe_remat(ResnetBlock, self.remat_policy)
        c = x.shape[-1]
        x = resnet_cls(c, self.groups, self.epsilon, name="resnets_0", **kw)(x, temb)
        x = Transformer2D(self.heads, self.transformer_layers, self.groups, self.remat_policy,
                          name="attentions_0", **kw)(x, context)
        return resnet_cls(c, self.groups, self.epsilon, name="resnets_1", **kw)(x, temb)


def embed_timesteps(cfg: UNetConfig, timesteps: jax.Array, encoder_hidden_states: jax.Array, height: int,
                    width: int) -> jax.Array:
    """The time embedding [B, E] of a UNet call (its `time_embedding` submodule, created in the calling
    module), after checking the context width and that the sample's sides survive the downsampling."""
    batch = encoder_hidden_states.shape[0]
    chex.assert_shape(encoder_hidden_states, (batch, None, cfg.cross_attention_dim))
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"sample {height}x{width} must be divisible by {factor}")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift).astype(cfg.dtype)
    return TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype)(t_emb)


class UNet(nn.Module):
    """Noise-prediction UNet. `sample` [B,H,W,C] NHWC (H, W divisible by 2**(levels-1)),
    `timesteps` [B] (or scalar), `encoder_hidden_states` [B,S,cross_attention_dim],
    `added_cond` {"text_embeds": [B,Dt], "time_ids": [B,6]} for addition_embed_type "text_time".
    Returns eps [B,H,W,out_channels] in `config.dtype`."""
    config: UNetConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 added_cond: Mapping[str, jax.Array] | None = None) -> jax.Array:
        cfg = self.config
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
        batch, height, width, _ = sample.shape
        chex.assert_shape(sample, (batch, height, width, cfg.in_channels))
        emb = embed_timesteps(cfg, timesteps, encoder_hidden_states, height, width)
        if cfg.addition_embed_type == "text_time":
            if added_cond is None:
                raise ValueError('addition_embed_type "text_time" needs added_cond with text_embeds and time_ids')
            text_embeds, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
            chex.assert_shape(text_embeds, (batch, cfg.text_embeds_dim))
            chex.assert_shape(time_ids, (batch, NUM_TIME_IDS))
            time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                             flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
            add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(batch, -1)], -1)
            emb = emb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(add_embeds.astype(cfg.dtype))
        context = nn.with_logical_constraint(encoder_hidden_states.astype(cfg.dtype), TOKEN_ACT_AXES)

        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(sample.astype(cfg.dtype))
        x = nn.with_logical_constraint(x, IMAGE_ACT_AXES)
        skips: list[jax.Array] = [x]
        block = dict(groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, remat_policy=cfg.remat_policy, **kw)
        n = len(cfg.block_out_channels)
        for i, block_type in enumerate(cfg.down_block_types):
            x, block_skips = DownBlock(
                cfg.block_out_channels[i], cfg.layers_per_block,
                heads=cfg.num_attention_heads[i] if block_type.startswith("CrossAttn") else 0,
                transformer_layers=cfg.transformer_layers_per_block[i], add_downsample=i < n - 1,
                name=f"down_blocks_{i}", **block)(x, emb, context)
            skips.extend(block_skips)

        x = MidBlockCrossAttn(cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                              name="mid_block", **block)(x, emb, context)

        for i, block_type in enumerate(cfg.up_block_types):
            level = n - 1 - i
            n_res = cfg.layers_per_block + 1
            block_skips, skips = tuple(skips[-n_res:]), skips[:-n_res]
            x = UpBlock(
                cfg.block_out_channels[level], n_res,
                heads=cfg.num_attention_heads[level] if block_type.startswith("CrossAttn") else 0,
                transformer_layers=cfg.transformer_layers_per_block[level], add_upsample=i < n - 1,
                name=f"up_blocks_{i}", **block)(x, block_skips, emb, context)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(x)
