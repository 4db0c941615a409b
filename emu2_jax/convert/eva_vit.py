"""timm `Eva` / Emu2-native EVA tower state dict -> `EvaVisionTransformer` params.

Key layout (docs/model.md#checkpoint-layouts): `{prefix}patch_embed.proj.{weight,bias}`,
`{prefix}cls_token`, `{prefix}pos_embed`,
`{prefix}blocks.{i}.norm1.*`, `...attn.qkv.weight` (fused [3 * width, width], rows Q, K, V, head-major),
`...attn.q_bias`, `...attn.v_bias`, `...attn.proj.*`, `...norm2.*`, `...mlp.fc1.*`, `...mlp.fc2.*` and,
only with `config.final_norm`, `{prefix}norm.*`. Prefixes: "" (timm), "visual." (Emu2 native),
"model.visual." (HF Emu2).
EVA-02 variants as timm saves them: unfused `attn.{q,k,v}_proj` (timm's `qkv_fused=False`), SwiGLU as
`mlp.fc1_g` / `mlp.fc1_x` or packed `mlp.fc1` ([gate | x] rows), sub-LN `attn.norm` / `mlp.norm`.

Ignored on purpose: keys outside `prefix` (LLM, projector, ...); timm's `attn.k_bias` (a zero buffer,
present only in state dicts saved with non-persistent buffers); timm's classifier `head.*` and pooled
`fc_norm.*`, which act after pooling and so have no counterpart in a tower that returns all tokens.
Any other key under `prefix` is an error.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from emu2_jax.models.eva_vit import VisionConfig

_IGNORED = re.compile(r"(blocks\.\d+\.attn\.k_bias|head\.(weight|bias)|fc_norm\.(weight|bias))")


class _Reader:
    """Fetches `prefix + name` with a shape check and records which keys were used."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str):
        self.state_dict, self.prefix, self.used = state_dict, prefix, set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = self.prefix + name
        if key not in self.state_dict:
            raise ValueError(f"EVA state dict is missing key {key!r}")
        value = np.asarray(self.state_dict[key])
        if value.shape != shape:
            raise ValueError(f"EVA state dict key {key!r} has shape {value.shape}, expected {shape}")
        self.used.add(key)
        return value

    def has(self, name: str) -> bool:
        return self.prefix + name in self.state_dict


def _layer_norm(read: _Reader, name: str, width: int) -> dict[str, np.ndarray]:
    return {"scale": read(f"{name}.weight", (width,)), "bias": read(f"{name}.bias", (width,))}


def _attention(read: _Reader, p: str, cfg: VisionConfig) -> dict:
    e, h, d = cfg.width, cfg.num_heads, cfg.head_dim
    # torch Linear weight [out, in]; the fused qkv rows are [Q | K | V], each head-major.
    if read.has(p + "qkv.weight") or not read.has(p + "q_proj.weight"):
        kernels = read(p + "qkv.weight", (3 * e, e)).T.reshape(e, 3, h, d).transpose(1, 0, 2, 3)
        biases = ("q_bias", "v_bias")
    else:
        kernels = [read(f"{p}{n}_proj.weight", (e, e)).T.reshape(e, h, d) for n in "qkv"]
        biases = ("q_proj.bias", "v_proj.bias")
    attn = {name: {"kernel": kernel} for name, kernel in zip("qkv", kernels)}
    if cfg.qkv_bias:
        attn["q"]["bias"] = read(p + biases[0], (e,)).reshape(h, d)
        attn["v"]["bias"] = read(p + biases[1], (e,)).reshape(h, d)
    if cfg.sub_ln:
        attn["norm"] = _layer_norm(read, p + "norm", e)
    attn["proj"] = {"kernel": read(p + "proj.weight", (e, e)).T.reshape(h, d, e), "bias": read(p + "proj.bias", (e,))}
    return attn


def _mlp(read: _Reader, p: str, cfg: VisionConfig) -> dict:
    e, m = cfg.width, cfg.mlp_dim
    dense = lambda name, n_out, n_in: {"kernel": read(f"{p}{name}.weight", (n_out, n_in)).T,
                                       "bias": read(f"{p}{name}.bias", (n_out,))}
    if not cfg.swiglu:
        mlp = {"fc1": dense("fc1", m, e)}
    elif read.has(p + "fc1.weight"):  # timm's packed SwiGLU (GluMlp): rows [gate | x]
        packed = dense("fc1", 2 * m, e)
        mlp = {name: {k: np.split(v, 2, axis=-1)[j] for k, v in packed.items()}
               for j, name in enumerate(("fc1_g", "fc1_x"))}
    else:
        mlp = {"fc1_g": dense("fc1_g", m, e), "fc1_x": dense("fc1_x", m, e)}
    if cfg.sub_ln:
        mlp["norm"] = _layer_norm(read, p + "norm", m)
    mlp["fc2"] = dense("fc2", e, m)
    return mlp


def _block(read: _Reader, i: int, cfg: VisionConfig) -> dict:
    p = f"blocks.{i}."
    return {"norm1": _layer_norm(read, p + "norm1", cfg.width), "attn": _attention(read, p + "attn.", cfg),
            "norm2": _layer_norm(read, p + "norm2", cfg.width), "mlp": _mlp(read, p + "mlp.", cfg)}


def _stack(trees: list[dict]) -> dict:
    """Stacks per-block param dicts along a new leading `layers` axis."""
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def _cast(tree: dict, dtype) -> dict:
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.ascontiguousarray(tree).astype(dtype, copy=False)


def eva_top(read: _Reader, cfg: VisionConfig) -> dict:
    """The tower's parameters outside the blocks (the streaming converter reads blocks one at a time)."""
    e, p = cfg.width, cfg.patch_size
    top = {
        # Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out].
        "patch_embed": {"kernel": read("patch_embed.proj.weight", (e, 3, p, p)).transpose(2, 3, 1, 0),
                        "bias": read("patch_embed.proj.bias", (e,))},
        "cls_token": read("cls_token", (1, 1, e)),
        "pos_embed": read("pos_embed", (1, 1 + cfg.num_patches, e)),
    }
    if cfg.final_norm:
        top["norm"] = _layer_norm(read, "norm", e)
    return top


def unexpected_eva_keys(keys: Iterable[str], prefix: str, used: set[str]) -> list[str]:
    """Keys under `prefix` that were not read and are not ignored on purpose."""
    return sorted(k for k in keys if k.startswith(prefix) and k not in used and not _IGNORED.fullmatch(k[len(prefix):]))


def convert_eva_vit(state_dict: Mapping[str, np.ndarray], config: VisionConfig, prefix: str = "") -> dict:
    """Returns the `params` tree of `EvaVisionTransformer(config)` (numpy arrays in `config.param_dtype`)."""
    cfg = config
    read = _Reader(state_dict, prefix)
    params = {**eva_top(read, cfg), "blocks": _stack([_block(read, i, cfg) for i in range(cfg.depth)])}
    unexpected = unexpected_eva_keys(state_dict, prefix, read.used)
    if unexpected:
        raise ValueError(f"EVA state dict has unexpected keys under prefix {prefix!r} for this config: "
                         f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    return _cast(params, jnp.dtype(cfg.param_dtype))
