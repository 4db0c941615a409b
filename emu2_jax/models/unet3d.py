"""Video UNet: the 2D denoising UNet (emu2_jax.models.unet) made 3D, as in the Emu2 paper's video
decoder and diffusers' `UNet3DConditionModel`.

Every spatial resnet is followed by a temporal conv block (four GroupNorm-SiLU-Conv(3x1x1) over
frames, residual) and every spatial transformer by a temporal transformer (self-attention over the
frames of each pixel). The last temporal conv and every temporal `proj_out` start at zero, so a
model inflated from a 2D UNet (`inflate_params`) computes exactly the 2D UNet on each frame.

Activations are [B*F, H, W, C] for the spatial layers (frames folded into the batch, a free reshape)
and [B, F, H, W, C] for the temporal ones. Parameter names follow diffusers' module tree
(`down_blocks_0/temp_convs_1/conv4_3/kernel` for `down_blocks.0.temp_convs.1.conv4.3.weight`) so
`emu2_jax.convert.diffusers.convert_unet3d` maps keys by the same rule as the 2D converter.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from emu2_jax import sharding as sh
from emu2_jax.models import layers
from emu2_jax.models.conv_blocks import (
    IMAGE_ACT_AXES,
    Downsample,
    ResnetBlock,
    Upsample,
    conv,
    group_norm,
    maybe_remat,
)
from emu2_jax.models.unet import (
    Transformer2D,
    TransformerBlock,
    UNetConfig,
    embed_timesteps,
    unet_config_from_diffusers,
)

Dtype = Any

VIDEO_ACT_AXES = (sh.ACT_BATCH, None, None, None, sh.ACT_EMBED)  # [B, F, H, W, C]
TEMPORAL_KERNEL_AXES = (sh.CONV_TEMPORAL, sh.CONV_SPATIAL, sh.CONV_SPATIAL_W, sh.CONV_IN, sh.CONV_OUT)


@dataclasses.dataclass(frozen=True)
class UNet3DConfig:
    """The spatial topology (`unet`, a 2D `UNetConfig` without added embeddings) plus temporal layers.

    `transformer_in_heads` x `transformer_in_head_dim` is the width of the temporal transformer
    after `conv_in` (diffusers: 8 heads of its int `attention_head_dim`). `temporal_positions` > 0
    gives every temporal transformer a learned, zero-initialised frame embedding for up to that many
    frames (diffusers' UNet3D has none: 0 keeps parity).
    """
    unet: UNetConfig = dataclasses.field(default_factory=lambda: UNetConfig(addition_embed_type=None))
    transformer_in_heads: int = 8
    transformer_in_head_dim: int = 64
    temporal_positions: int = 0

    def __post_init__(self):
        if self.unet.addition_embed_type is not None:
            raise ValueError(f"UNet3DConfig.unet.addition_embed_type={self.unet.addition_embed_type!r}; "
                             "the video UNet takes no added embedding")
        if self.temporal_positions < 0:
            raise ValueError(f"temporal_positions={self.temporal_positions} must be >= 0")


def sd21_unet3d_config(**unet_overrides: Any) -> UNet3DConfig:
    """SD-2.1 inflated (the Emu2 paper's video decoder): 4 levels, 5/10/20/20 heads of 64, 1024-wide
    cross-attention, learned frame positions for up to 32 frames. `unet_overrides` (dtype,
    remat_policy, ...) apply to the spatial config."""
    unet = UNetConfig(**{"block_out_channels": (320, 640, 1280, 1280),
                         "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                         "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                         "transformer_layers_per_block": (1, 1, 1, 1), "num_attention_heads": (5, 10, 20, 20),
                         "cross_attention_dim": 1024, "addition_embed_type": None, **unet_overrides})
    return UNet3DConfig(unet=unet, transformer_in_heads=8, transformer_in_head_dim=64, temporal_positions=32)


def tiny_unet3d_config(**unet_overrides: Any) -> UNet3DConfig:
    """A two-level, CPU-sized video UNet (64-wide cross-attention) for tests and `:tiny` runs."""
    unet = UNetConfig(**{"block_out_channels": (32, 64),
                         "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                         "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1,
                         "transformer_layers_per_block": (1, 1), "num_attention_heads": (2, 4),
                         "cross_attention_dim": 64, "norm_num_groups": 8, "addition_embed_type": None,
                         **unet_overrides})
    return UNet3DConfig(unet=unet, transformer_in_heads=2, transformer_in_head_dim=16, temporal_positions=16)


def unet3d_config_from_diffusers(cfg: Mapping[str, Any], **overrides: Any) -> UNet3DConfig:
    """`UNet3DConfig` from a diffusers `UNet3DConditionModel` config dict."""
    head_dim = cfg.get("attention_head_dim", 64)
    if not isinstance(head_dim, int):
        raise ValueError(f"per-block attention_head_dim={head_dim} is not supported by diffusers' transformer_in")
    # Unlike the 2D UNet's, the 3D blocks read attention_head_dim as a true head width
    # (heads = channels // attention_head_dim), for spatial and temporal attention alike.
    if any(c % head_dim for c in cfg["block_out_channels"]):
        raise ValueError(f"block_out_channels={cfg['block_out_channels']} must divide by attention_head_dim={head_dim}")
    two_d = {**cfg, "down_block_types": [t.replace("3D", "2D") for t in cfg["down_block_types"]],
             "up_block_types": [t.replace("3D", "2D") for t in cfg["up_block_types"]],
             "attention_head_dim": [c // head_dim for c in cfg["block_out_channels"]]}
    return UNet3DConfig(unet=unet_config_from_diffusers(two_d), transformer_in_heads=8,
                        transformer_in_head_dim=head_dim, **overrides)


def unet3d_dummy_inputs(config: UNet3DConfig, batch: int = 1, frames: int = 2) -> dict[str, Any]:
    """Smallest well-formed keyword arguments of `UNet3D.__call__`, e.g. for `init`."""
    size = 2 ** (len(config.unet.block_out_channels) - 1)
    return {"sample": jnp.zeros((batch, frames, size, size, config.unet.in_channels), jnp.float32),
            "timesteps": jnp.zeros((batch,), jnp.float32),
            "encoder_hidden_states": jnp.zeros((batch, 1, config.unet.cross_attention_dim), jnp.float32)}


def _unfold(x: jax.Array, frames: int) -> jax.Array:
    return x.reshape(x.shape[0] // frames, frames, *x.shape[1:])


class TemporalConv(nn.Module):
    """diffusers `TemporalConvLayer`: 4 x (GroupNorm over C/g x frames x pixels, SiLU, 3x1x1 conv), residual.

    Names follow its `nn.Sequential` indices (`conv1_0` norm, `conv1_2` conv, `conv2_3` conv after
    dropout). The last conv is zero-initialised, so the block starts as the identity.
    """
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, frames: int) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        identity = h = _unfold(x, frames)
        c = x.shape[-1]
        for i in range(1, 5):
            h = nn.silu(group_norm(self.groups, 1e-5, name=f"conv{i}_0", **kw)(h))
            init = nn.initializers.zeros_init() if i == 4 else layers.default_kernel_init
            h = nn.Conv(c, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), name=f"conv{i}_{2 if i == 1 else 3}",
                        kernel_init=layers.partitioned(init, TEMPORAL_KERNEL_AXES),
                        bias_init=layers.partitioned(nn.initializers.zeros_init(), (sh.CONV_OUT,)), **kw)(h)
            h = nn.with_logical_constraint(h, VIDEO_ACT_AXES)
        return (identity + h).reshape(x.shape)


class TemporalTransformer(nn.Module):
    """diffusers `TransformerTemporalModel`: GroupNorm (over frames too), proj_in, self-attention
    blocks over the frames of each pixel (attn2 is a second self-attention), proj_out, residual.

    `proj_out` is zero-initialised (the block starts as the identity); `positions` > 0 adds a learned
    frame embedding after proj_in.
    """
    heads: int
    head_dim: int
    groups: int
    positions: int = 0
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, frames: int) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        bf, height, width, c = x.shape
        b = bf // frames
        h = group_norm(self.groups, 1e-6, name="norm", **kw)(_unfold(x, frames))
        h = h.transpose(0, 2, 3, 1, 4).reshape(b * height * width, frames, c)  # tokens = frames
        inner = self.heads * self.head_dim
        h = layers.dense(inner, (sh.CONV_IN, sh.EMBED), use_bias=True, name="proj_in", **kw)(h)
        if self.positions:
            if frames > self.positions:
                raise ValueError(f"{frames} frames exceed temporal_positions={self.positions}")
            pos = self.param("pos_embed", layers.partitioned(nn.initializers.zeros_init(), (sh.POSITIONS, sh.EMBED)),
                             (self.positions, inner), self.param_dtype)
            h = h + pos[:frames].astype(h.dtype)
        blocks = layers.scan_blocks(TransformerBlock, num_layers=1, remat_policy=self.remat_policy)
        h, _ = blocks(heads=self.heads, head_dim=self.head_dim, name="transformer_blocks", **kw)(h, None)
        h = layers.dense(c, (sh.EMBED, sh.CONV_OUT), use_bias=True, name="proj_out",
                         kernel_init=nn.initializers.zeros_init(), **kw)(h)
        h = h.reshape(b, height, width, frames, c).transpose(0, 3, 1, 2, 4).reshape(x.shape)
        return nn.with_logical_constraint(h + x, IMAGE_ACT_AXES)


class _Layers3D(nn.Module):
    """Shared fields of the 3D down / mid / up blocks."""
    out_channels: int
    num_layers: int
    groups: int
    epsilon: float
    heads: int = 0
    transformer_layers: int = 1
    resample: bool = True
    positions: int = 0
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, i: int, x: jax.Array, temb: jax.Array, frames: int, channels: int | None = None) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = maybe_remat(ResnetBlock, self.remat_policy)(channels or self.out_channels, self.groups, self.epsilon,
                                                        name=f"resnets_{i}", **kw)(x, temb)
        return TemporalConv(self.groups, name=f"temp_convs_{i}", **kw)(x, frames)

    def attention(self, i: int, x: jax.Array, context: jax.Array, frames: int) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        c = x.shape[-1]
        x = Transformer2D(self.heads, self.transformer_layers, self.groups, self.remat_policy,
                          name=f"attentions_{i}", **kw)(x, context)
        return TemporalTransformer(self.heads, c // self.heads, self.groups, self.positions, self.remat_policy,
                                   name=f"temp_attentions_{i}", **kw)(x, frames)


class DownBlock3D(_Layers3D):
    """`DownBlock3D` / `CrossAttnDownBlock3D` (heads > 0); returns the output and its skip activations."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
                 frames: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(i, x, temb, frames)
            if self.heads:
                x = self.attention(i, x, context, frames)
            skips.append(x)
        if self.resample:
            x = Downsample(name="downsamplers_0", dtype=self.dtype, param_dtype=self.param_dtype)(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock3D(_Layers3D):
    """`UpBlock3D` / `CrossAttnUpBlock3D` (heads > 0): each resnet eats the latest skip activation."""

    @nn.compact
    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array, context: jax.Array,
                 frames: int) -> jax.Array:
        for i, skip in enumerate(reversed(skips)):
            x = self.resnet(i, jnp.concatenate([x, skip], axis=-1), temb, frames)
            if self.heads:
                x = self.attention(i, x, context, frames)
        if self.resample:
            x = Upsample(name="upsamplers_0", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class MidBlock3D(_Layers3D):
    """`UNetMidBlock3DCrossAttn`: resnet, temp conv, then (attention, temporal attention, resnet, temp conv)."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, frames: int) -> jax.Array:
        x = self.resnet(0, x, temb, frames)
        x = self.attention(0, x, context, frames)
        return self.resnet(1, x, temb, frames)


class UNet3D(nn.Module):
    """Video denoising UNet. `sample` [B,F,H,W,C] (H, W divisible by 2**(levels-1)), `timesteps` [B]
    (or scalar), `encoder_hidden_states` [B,S,cross_attention_dim] shared by all frames of a clip.
    Returns the prediction [B,F,H,W,out_channels] in `config.unet.dtype`."""
    config: UNet3DConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        cfg, u = self.config, self.config.unet
        kw = {"dtype": u.dtype, "param_dtype": u.param_dtype}
        batch, frames, height, width, _ = sample.shape
        chex.assert_shape(sample, (batch, frames, height, width, u.in_channels))
        emb = embed_timesteps(u, timesteps, encoder_hidden_states, height, width)
        emb = jnp.repeat(emb, frames, axis=0)  # frames fold into the batch: [B*F, E]
        context = jnp.repeat(encoder_hidden_states.astype(u.dtype), frames, axis=0)
        context = nn.with_logical_constraint(context, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))

        x = sample.astype(u.dtype).reshape(batch * frames, height, width, u.in_channels)
        x = conv(u.block_out_channels[0], 3, name="conv_in", **kw)(x)
        x = TemporalTransformer(cfg.transformer_in_heads, cfg.transformer_in_head_dim, u.norm_num_groups,
                                cfg.temporal_positions, u.remat_policy, name="transformer_in", **kw)(x, frames)
        skips: list[jax.Array] = [x]
        block = dict(groups=u.norm_num_groups, epsilon=u.norm_eps, positions=cfg.temporal_positions,
                     remat_policy=u.remat_policy, **kw)
        n = len(u.block_out_channels)
        for i, block_type in enumerate(u.down_block_types):
            x, block_skips = DownBlock3D(
                u.block_out_channels[i], u.layers_per_block,
                heads=u.num_attention_heads[i] if block_type.startswith("CrossAttn") else 0,
                transformer_layers=u.transformer_layers_per_block[i], resample=i < n - 1,
                name=f"down_blocks_{i}", **block)(x, emb, context, frames)
            skips.extend(block_skips)
        x = MidBlock3D(u.block_out_channels[-1], 1, heads=u.num_attention_heads[-1],
                       transformer_layers=u.transformer_layers_per_block[-1], name="mid_block",
                       **block)(x, emb, context, frames)
        for i, block_type in enumerate(u.up_block_types):
            level = n - 1 - i
            n_res = u.layers_per_block + 1
            block_skips, skips = tuple(skips[-n_res:]), skips[:-n_res]
            x = UpBlock3D(
                u.block_out_channels[level], n_res,
                heads=u.num_attention_heads[level] if block_type.startswith("CrossAttn") else 0,
                transformer_layers=u.transformer_layers_per_block[level], resample=i < n - 1,
                name=f"up_blocks_{i}", **block)(x, block_skips, emb, context, frames)
        x = nn.silu(group_norm(u.norm_num_groups, u.norm_eps, name="conv_norm_out", **kw)(x))
        x = conv(u.out_channels, 3, name="conv_out", **kw)(x)
        return x.reshape(batch, frames, height, width, u.out_channels)


def init_unet3d(config: UNet3DConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh (unboxed) params of `UNet3D(config)`."""
    return nn.unbox(UNet3D(config).init(rng, **unet3d_dummy_inputs(config))["params"])


def is_temporal(path: Sequence[Any]) -> bool:
    """Whether the param at `path` (keys inside `UNet3D`'s params) belongs to a temporal layer: the
    layers a 2D UNet lacks, which start as the identity."""
    return any(str(key).startswith(("temp_", "transformer_in")) for key in path)


def check_inflatable(params_2d: Mapping[str, Any], params_3d: Mapping[str, Any]) -> None:
    """Raises ValueError (one line) unless `params_2d` inflate into `params_3d`: every 2D leaf lands on a
    3D leaf of the same shape, and the 3D leaves left over are all temporal. Leaves need only a
    `.shape`, so checkpoint metadata and abstract params are checked before any weight is read."""
    flat2 = traverse_util.flatten_dict(dict(params_2d))
    flat3 = traverse_util.flatten_dict(dict(params_3d))
    for path, leaf in flat2.items():
        if path not in flat3:
            raise ValueError(f"2D UNet param {'/'.join(path)} has no place in the 3D UNet")
        if tuple(flat3[path].shape) != tuple(leaf.shape):
            raise ValueError(f"2D UNet param {'/'.join(path)} {tuple(leaf.shape)} != 3D {tuple(flat3[path].shape)}")
    leftover = [p for p in flat3 if p not in flat2 and not is_temporal(p)]
    if leftover:
        raise ValueError(f"3D UNet params not covered by the 2D UNet: {['/'.join(p) for p in leftover[:5]]}")


def inflate_params(params_2d: Mapping[str, Any], params_3d: Mapping[str, Any]) -> dict[str, Any]:
    """3D params whose spatial weights are `params_2d` (a converted `UNet` of the same topology) and
    whose temporal weights are those of `params_3d` (a fresh init: identity at start).

    Raises ValueError where `check_inflatable` does. The arrays are used as they are (cast to the 3D
    dtype if it differs), so sharded inputs stay sharded.
    """
    check_inflatable(params_2d, params_3d)
    flat3 = traverse_util.flatten_dict(dict(params_3d))
    flat2 = traverse_util.flatten_dict(dict(params_2d))
    return traverse_util.unflatten_dict({**flat3, **{p: jnp.asarray(v, flat3[p].dtype) for p, v in flat2.items()}})
