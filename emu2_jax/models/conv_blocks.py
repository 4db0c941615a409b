"""Convolutional building blocks shared by the UNet (emu2_jax.models.unet) and the VAE
(emu2_jax.models.vae), NHWC, with logical axis names on every parameter: `conv`, `group_norm`,
`ResnetBlock`, `Downsample`, `Upsample` and the attention core `attend`.

Parameter names follow diffusers (`conv1`, `norm1`, `time_emb_proj`, `to_q`, ...) so that
`emu2_jax.convert.diffusers` maps both models' keys by the same rules.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.models import layers

Dtype = Any

CONV_KERNEL_AXES = (sh.CONV_SPATIAL, sh.CONV_SPATIAL_W, sh.CONV_IN, sh.CONV_OUT)
IMAGE_ACT_AXES = (sh.ACT_BATCH, None, None, sh.ACT_EMBED)  # NHWC feature maps


def conv(features: int, kernel: int, *, strides: int = 1, padding: Any = "SAME", dtype: Dtype,
         param_dtype: Dtype, name: str) -> nn.Conv:
    """NHWC conv with kernel [kh, kw, in, out] and logically named axes."""
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
                   param_dtype=param_dtype,
                   kernel_init=layers.partitioned(layers.default_kernel_init, CONV_KERNEL_AXES),
                   bias_init=layers.partitioned(nn.initializers.zeros_init(), (sh.CONV_OUT,)), name=name)


def group_norm(groups: int, epsilon: float, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm equivalent on NHWC: contiguous channel groups, two-pass variance."""
    return nn.GroupNorm(num_groups=groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False,
                        scale_init=layers.partitioned(nn.initializers.ones_init(), (sh.NORM,)),
                        bias_init=layers.partitioned(nn.initializers.zeros_init(), (sh.NORM,)), name=name)


def maybe_remat(module_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    return module_cls if policy == "none" else nn.remat(module_cls, policy=layers.REMAT_POLICIES[policy])


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` (pre-norm, additive time embedding, 1x1 shortcut on width change)."""
    out_channels: int
    groups: int
    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.silu(group_norm(self.groups, self.epsilon, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = layers.dense(self.out_channels, (sh.MLP, sh.EMBED), use_bias=True, name="time_emb_proj",
                             **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.epsilon, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return nn.with_logical_constraint(x + h, IMAGE_ACT_AXES)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding=0 pads only bottom/right by one (the VAE encoder's variant)."""
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv(x.shape[-1], 3, strides=2, padding=pad, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


def attend(x: jax.Array, context: jax.Array | None = None, *, heads: int, head_dim: int, qkv_bias: bool,
           dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """Multi-head (cross-)attention over tokens [B, T, C] -> [B, T, C] (diffusers `Attention` core).

    Call it inside a compact method: it creates `to_q`, `to_k`, `to_v`, `to_out_0` in the calling
    module, which lets the VAE put them next to its GroupNorm as diffusers does.
    """
    context = x if context is None else context
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    head_act_axes = (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_HEADS, sh.ACT_HEAD_DIM)
    q, k, v = (
        nn.with_logical_constraint(
            layers.dense((heads, head_dim), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), use_bias=qkv_bias, name=name,
                         **kw)(src), head_act_axes)
        for name, src in (("to_q", x), ("to_k", context), ("to_v", context)))
    out = layers.dot_product_attention(q, k, v, dtype=dtype)
    return layers.dense(x.shape[-1], (sh.HEADS, sh.HEAD_DIM, sh.EMBED), axis=(-2, -1), use_bias=True,
                        name="to_out_0", **kw)(out)

