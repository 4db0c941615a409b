"""KL autoencoder of Stable Diffusion / SDXL (diffusers `AutoencoderKL` equivalent), NHWC.

`decode` takes unscaled latents, as diffusers does: callers divide sampler latents by
`config.scaling_factor` first (and multiply encoder samples by it for diffusion training).
Parameter names mirror diffusers (`encoder/down_blocks_0/resnets_0/conv1/kernel`); the conv
blocks are `emu2_jax.models.conv_blocks`, shared with the UNet.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

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
VAE_NORM_EPS = 1e-6  # diffusers hard-codes this for every VAE GroupNorm


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"  # a key of layers.REMAT_POLICIES; applied to resnets

    def __post_init__(self):
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels} must divide by {self.norm_num_groups}")
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {sorted(layers.REMAT_POLICIES)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def sdxl_vae_config(**overrides: Any) -> VAEConfig:
    """SDXL VAE (Emu2-Gen's, docs/model.md#visual-decoder)."""
    return VAEConfig(**overrides)


def sd15_vae_config(**overrides: Any) -> VAEConfig:
    """SD-1.5 VAE (Emu v1's): same topology, scaling factor 0.18215."""
    return VAEConfig(**{"scaling_factor": 0.18215, **overrides})


def tiny_vae_config(**overrides: Any) -> VAEConfig:
    """A tiny VAE for tests (downsampling factor 2)."""
    return VAEConfig(**{"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4, **overrides})


def vae_config_from_diffusers(cfg: Mapping[str, Any], **overrides: Any) -> VAEConfig:
    """`VAEConfig` from a diffusers `AutoencoderKL` config dict; rejects unsupported variants."""
    n = len(cfg["block_out_channels"])
    if tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",) * n)) != ("DownEncoderBlock2D",) * n or \
            tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",) * n)) != ("UpDecoderBlock2D",) * n:
        raise ValueError("only DownEncoderBlock2D / UpDecoderBlock2D VAEs are supported")
    if cfg.get("act_fn", "silu") != "silu" or cfg.get("shift_factor") is not None:
        raise ValueError(f"unsupported VAE act_fn={cfg.get('act_fn')!r} / shift_factor={cfg.get('shift_factor')}")
    kwargs: dict[str, Any] = {
        "in_channels": cfg.get("in_channels", 3), "out_channels": cfg.get("out_channels", 3),
        "block_out_channels": tuple(cfg["block_out_channels"]), "layers_per_block": cfg.get("layers_per_block", 1),
        "latent_channels": cfg.get("latent_channels", 4), "norm_num_groups": cfg.get("norm_num_groups", 32),
        "scaling_factor": cfg.get("scaling_factor", 0.18215),
        "mid_block_add_attention": cfg.get("mid_block_add_attention", True),
        "use_quant_conv": cfg.get("use_quant_conv", True), "use_post_quant_conv": cfg.get("use_post_quant_conv", True)}
    kwargs.update(overrides)
    return VAEConfig(**kwargs)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, single-head attention over all pixels, residual."""
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        y = group_norm(self.groups, VAE_NORM_EPS, name="group_norm", **kw)(x).reshape(b, h * w, c)
        y = attend(y, heads=1, head_dim=c, qkv_bias=True, **kw)
        return y.reshape(b, h, w, c) + x


class MidBlock(nn.Module):
    """`UNetMidBlock2D` without time embedding: resnet, (attention), resnet."""
    groups: int
    add_attention: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        resnet_cls = maybe_remat(ResnetBlock, self.remat_policy)
        c = x.shape[-1]
        x = resnet_cls(c, self.groups, VAE_NORM_EPS, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, name="attentions_0", **kw)(x)
        return resnet_cls(c, self.groups, VAE_NORM_EPS, name="resnets_1", **kw)(x)


class ResnetStack(nn.Module):
    """diffusers' `DownEncoderBlock2D` (`resample="down"`, padded bottom/right only) and
    `UpDecoderBlock2D` (`resample="up"`): resnets without time embedding or skips, then an optional
    2x resampling."""
    out_channels: int
    num_layers: int
    groups: int
    resample: str | None = None  # "down", "up" or None
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        resnet_cls = maybe_remat(ResnetBlock, self.remat_policy)
        for i in range(self.num_layers):
            x = resnet_cls(self.out_channels, self.groups, VAE_NORM_EPS, name=f"resnets_{i}", **kw)(x)
        if self.resample == "down":
            x = Downsample(padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample(name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image [B,H,W,3] -> moments [B,H/f,W/f,2*latent] (mean and log-variance, before quant_conv)."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        n = len(cfg.block_out_channels)
        for i, channels in enumerate(cfg.block_out_channels):
            x = ResnetStack(channels, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < n - 1 else None,
                            cfg.remat_policy, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, cfg.remat_policy, name="mid_block", **kw)(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, VAE_NORM_EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latents [B,h,w,latent] (after post_quant_conv) -> image [B,h*f,w*f,3]."""
    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
        x = conv(cfg.block_out_channels[-1], 3, name="conv_in", **kw)(z)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, cfg.remat_policy, name="mid_block", **kw)(x)
        n = len(cfg.block_out_channels)
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            x = ResnetStack(channels, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < n - 1 else None,
                            cfg.remat_policy, name=f"up_blocks_{i}", **kw)(x)
            x = nn.with_logical_constraint(x, IMAGE_ACT_AXES)
        x = nn.silu(group_norm(cfg.norm_num_groups, VAE_NORM_EPS, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """`encode(x) -> (mean, logvar)`, `decode(z) -> x` on NHWC images in [-1, 1].
    `__call__` (encode, then decode the mean) exists to initialise every parameter."""
    config: VAEConfig

    def setup(self):
        cfg = self.config
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = conv(2 * cfg.latent_channels, 1, name="quant_conv", **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = (conv(cfg.latent_channels, 1, name="post_quant_conv", **kw)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,H,W,in_channels] -> (mean, logvar) [B,H/f,W/f,latent]; logvar clipped to [-30, 20]."""
        cfg = self.config
        b, h, w, _ = x.shape
        chex.assert_shape(x, (b, h, w, cfg.in_channels))
        if h % cfg.downsample_factor or w % cfg.downsample_factor:
            raise ValueError(f"image {h}x{w} must be divisible by {cfg.downsample_factor}")
        moments = self.encoder(x.astype(cfg.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents z [B,h,w,latent] -> image [B,h*f,w*f,out_channels]."""
        cfg = self.config
        chex.assert_rank(z, 4)
        chex.assert_axis_dimension(z, -1, cfg.latent_channels)
        z = z.astype(cfg.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


def sample_latents(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior N(mean, exp(logvar))."""
    noise = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)
