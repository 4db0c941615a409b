"""diffusers `UNet2DConditionModel` / `UNet3DConditionModel` / `AutoencoderKL` state dicts -> Flax params.

The Flax modules mirror diffusers' module tree, so each Flax parameter path names its PyTorch key:
`down_blocks_0/resnets_1/conv1/kernel` <-> `down_blocks.0.resnets.1.conv1.weight`. The converter walks
the target parameter tree (from `jax.eval_shape` of `init`, nothing is allocated) and pulls every
leaf from the state dict, so missing, unexpected and mis-shaped keys are all caught by name.
Scanned transformer stacks (`transformer_blocks`, leading layer axis) gather
`transformer_blocks.{0..L-1}` and stack them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from emu2_jax.models.unet import UNet, UNetConfig, unet_dummy_inputs
from emu2_jax.models.unet3d import UNet3D, UNet3DConfig, unet3d_dummy_inputs
from emu2_jax.models.vae import AutoencoderKL, VAEConfig

Params = dict[str, Any]

# Flax `name_<i>` components that are `name.<i>` list indices in diffusers (`linear_1` is not).
_INDEXED = re.compile(r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out|net|temp_convs|"
                      r"temp_attentions|conv[1-4])_(\d+)")  # conv1_0: TemporalConvLayer's nn.Sequential
_SCANNED = "transformer_blocks"


def convert_unet(state_dict: Mapping[str, np.ndarray], config: UNetConfig, prefix: str = "") -> Params:
    """Flax params for `UNet(config)` from a diffusers UNet state dict (keys after `prefix`, e.g. "unet.")."""
    return _convert(state_dict, unet_target(config), prefix, config.param_dtype, "UNet")


def convert_unet3d(state_dict: Mapping[str, np.ndarray], config: UNet3DConfig, prefix: str = "") -> Params:
    """Flax params for `UNet3D(config)` from a diffusers `UNet3DConditionModel` state dict."""
    if config.temporal_positions:
        raise ValueError("diffusers' UNet3DConditionModel has no temporal position embedding: "
                         "convert with temporal_positions=0")
    model = UNet3D(config)
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), **unet3d_dummy_inputs(config)))["params"]
    return _convert(state_dict, nn.unbox(target), prefix, config.unet.param_dtype, "UNet3D")


def convert_vae(state_dict: Mapping[str, np.ndarray], config: VAEConfig, prefix: str = "") -> Params:
    """Flax params for `AutoencoderKL(config)` from a diffusers AutoencoderKL state dict."""
    return _convert(state_dict, vae_target(config), prefix, config.param_dtype, "VAE")


def unet_target(config: UNetConfig) -> Params:
    """`UNet(config)`'s params as ShapeDtypeStructs (nothing allocated)."""
    model = UNet(config)
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **unet_dummy_inputs(config)))["params"])


def vae_target(config: VAEConfig) -> Params:
    """`AutoencoderKL(config)`'s params as ShapeDtypeStructs (nothing allocated)."""
    size = config.downsample_factor
    sample = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    return nn.unbox(jax.eval_shape(lambda s: AutoencoderKL(config).init(jax.random.key(0), s), sample)["params"])


def _torch_stem(path: tuple[str, ...]) -> str:
    """Module path of a Flax leaf in diffusers naming, with `{}` standing in for a scanned layer index."""
    parts = []
    for name in path[:-1]:
        parts.append(_INDEXED.sub(r"\1.\2", name) if _INDEXED.fullmatch(name) else name)
        if name == _SCANNED:
            parts.append("{}")
    return ".".join(parts)


def _to_flax(name: str, array: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
    """One PyTorch tensor -> the Flax leaf `name` of `shape`, or ValueError naming `key`."""
    array = np.asarray(array)
    if name == "kernel" and len(shape) == 5:  # Conv3d [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
        out = array.transpose(2, 3, 4, 1, 0) if array.ndim == 5 else array
    elif name == "kernel" and len(shape) == 4:  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
        out = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    elif name == "kernel":
        # Linear [out, in] (or a 1x1 Conv2d [out, in, 1, 1]) -> [in..., out...]; Flax may split either
        # side (e.g. [C, heads, head_dim]), which a row-major reshape does iff some split point fits.
        if array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]
        fits = array.ndim == 2 and any(
            int(np.prod(shape[:k])) == array.shape[1] and int(np.prod(shape[k:])) == array.shape[0]
            for k in range(1, len(shape)))
        out = array.T.reshape(shape) if fits else array
    else:  # norm scale / bias (`weight` / `bias`), any bias possibly split into [heads, head_dim]
        out = array.reshape(shape) if array.ndim == 1 and array.size == int(np.prod(shape)) else array
    if out.shape != shape:
        raise ValueError(f"{key}: PyTorch shape {tuple(array.shape)} does not fit Flax {name} {shape}")
    return out


def _convert(state_dict: Mapping[str, np.ndarray], target: Params, prefix: str, dtype: Any,
             what: str) -> Params:
    consumed: set[str] = set()

    def fetch(key: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in state_dict:
            raise ValueError(f"{what} state dict is missing {key!r}")
        consumed.add(key)
        return _to_flax(name, state_dict[key], shape, key)

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for path, leaf in traverse_util.flatten_dict(target).items():
        name = path[-1]
        stem = prefix + _torch_stem(path) + "." + ("bias" if name == "bias" else "weight")
        if _SCANNED in path:
            flat[path] = np.stack([fetch(stem.format(i), name, leaf.shape[1:]) for i in range(leaf.shape[0])])
        else:
            flat[path] = fetch(stem, name, leaf.shape)
        flat[path] = flat[path].astype(dtype)
    unexpected = sorted(k for k in state_dict if k.startswith(prefix) and k not in consumed)
    if unexpected:
        raise ValueError(f"{what} state dict has {len(unexpected)} unexpected keys under prefix {prefix!r}: "
                         f"{unexpected[:10]}")
    return traverse_util.unflatten_dict(flat)
