"""Named model sizes. `get_config(name, **overrides)` is how configs and tools pick a model.

Overrides address nested fields with dots, e.g. `get_config("small", **{"llm.remat_policy": "full"})`;
`dtype=`/`param_dtype=`/`remat_policy=`/`attention=` without a prefix apply to every component that has
the field (`attention`: the vision tower and the LLM).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from emu2_jax.models.causal_transformer import CausalTransformerConfig
from emu2_jax.models.emu2 import Emu2Config
from emu2_jax.models.eva_vit import VisionConfig
from emu2_jax.models.llama import LlamaConfig

# Emu2's added tokens follow the base sentencepiece vocabulary (32000 for LLaMA, 1024 for the
# embedded tiny tokenizer): [PAD], [IMG], [/IMG], <image>, [gIMG], ...; 272 tokens, +2 for chat.
_IMAGE_OFFSET, _FRAME_OFFSET, _NUM_ADDED, _NUM_CHAT = 3, 4, 272, 2
TINY_BASE_VOCAB = 1024


def _token_ids(base_vocab: int) -> dict[str, int]:
    return dict(image_token_id=base_vocab + _IMAGE_OFFSET, frame_token_id=base_vocab + _FRAME_OFFSET)


def tiny() -> Emu2Config:
    """A forward pass in well under a second on a laptop CPU; the `:tiny` configs train it."""
    return Emu2Config(
        vision=VisionConfig(image_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128),
        llm=LlamaConfig(vocab_size=TINY_BASE_VOCAB + _NUM_ADDED + _NUM_CHAT, hidden_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=4, intermediate_size=256, max_cache_length=256),
        n_query=4, v_query=4, **_token_ids(TINY_BASE_VOCAB))


def small() -> Emu2Config:
    """~250M parameters: a ViT-B/14 at 224 px and an 8-layer 1024-wide LLaMA; for benchmarks."""
    return Emu2Config(
        vision=VisionConfig(image_size=224, patch_size=14, width=768, depth=12, num_heads=12, mlp_dim=3072),
        llm=LlamaConfig(vocab_size=32000 + _NUM_ADDED, hidden_size=1024, num_layers=8, num_heads=16,
                        num_kv_heads=16, intermediate_size=2816),
        n_query=64, v_query=64, **_token_ids(32000))


def medium() -> Emu2Config:
    """~1.7B parameters: a ViT-L/14 at 224 px (Emu2's post-norm block, q/v biases) and a 24-layer
    2048-wide LLaMA (16 heads of 128); sized for one GPU/TPU chip, e.g. `benchmarks/mfu.py`."""
    return Emu2Config(
        vision=VisionConfig(image_size=224, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                            qkv_bias=True, post_norm=True, layer_norm_eps=1e-6),
        llm=LlamaConfig(vocab_size=32000 + _NUM_ADDED, hidden_size=2048, num_layers=24, num_heads=16,
                        num_kv_heads=16, intermediate_size=5632),
        n_query=64, v_query=64, **_token_ids(32000))


def emu2_37b(chat: bool = False) -> Emu2Config:
    """The released Emu2 (chat=False, vocab 32272) / Emu2-Chat (chat=True: vocab 32274, 16x16 tokens)."""
    return Emu2Config(
        vision=VisionConfig(image_size=448, patch_size=14, width=1792, depth=64, num_heads=16, mlp_dim=15360,
                            qkv_bias=True, post_norm=True, layer_norm_eps=1e-6),
        llm=LlamaConfig(vocab_size=32000 + _NUM_ADDED + (_NUM_CHAT if chat else 0), hidden_size=6656,
                        num_layers=60, num_heads=52, num_kv_heads=52, intermediate_size=17920, rms_norm_eps=1e-6),
        n_query=256 if chat else 64, v_query=64, **_token_ids(32000))


def emu1_14b() -> Emu2Config:
    """Emu (v1): EVA-CLIP-1B-class pre-norm ViT-g/14 at 224 px, 12-block Causal Transformer with
    32 queries, LLaMA-13B."""
    return Emu2Config(
        vision=VisionConfig(image_size=224, patch_size=14, width=1408, depth=40, num_heads=16, mlp_dim=6144,
                            qkv_bias=True, post_norm=False),
        llm=LlamaConfig(vocab_size=32000 + _NUM_ADDED, hidden_size=5120, num_layers=40, num_heads=40,
                        num_kv_heads=40, intermediate_size=13824),
        connector="causal_transformer",
        causal_transformer=CausalTransformerConfig(num_queries=32, width=1408, depth=12, num_heads=16, mlp_dim=6144),
        n_query=32, v_query=32, **_token_ids(32000))


# The released Emu v1 tokenizer adds [PAD], [IMG], [/IMG], <image> to LLaMA's 32000 pieces, and
# [USER], [ASSISTANT] for instruction tuning (Emu-I).
EMU1_ADDED, EMU1_INSTRUCT_ADDED = 4, 6


def emu1_release(instruct: bool = False) -> Emu2Config:
    """The released Emu v1 (`Emu1/models/modeling_emu.py`, BAAI/Emu): EVA-CLIP-g/14 at 224 px (pre-norm,
    no final norm), `ln_visual` on all 257 tokens, a T5-base-shaped Causal Transformer (768 wide,
    12 blocks, 12 heads, ReLU MLP 3072, 32 queries) projected to 5120, LLaMA-13B, regression head
    5120 -> 5120. instruct=True: Emu-I's vocabulary (32006); its LoRA is merged at conversion."""
    vocab = 32000 + (EMU1_INSTRUCT_ADDED if instruct else EMU1_ADDED)
    return Emu2Config(
        vision=VisionConfig(image_size=224, patch_size=14, width=1408, depth=40, num_heads=16, mlp_dim=6144,
                            qkv_bias=True, post_norm=False),
        llm=LlamaConfig(vocab_size=vocab, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                        intermediate_size=13824),
        connector="causal_transformer",
        causal_transformer=CausalTransformerConfig(
            num_queries=32, width=768, depth=12, num_heads=12, mlp_dim=3072, block="t5", input_norm=True,
            include_cls=True, output="llm"),
        n_query=32, v_query=32, **_token_ids(32000))


PRESETS: dict[str, Callable[[], Emu2Config]] = {
    "tiny": tiny,
    "small": small,
    "medium": medium,
    "emu2_37b": emu2_37b,
    "emu2_chat_37b": lambda: emu2_37b(chat=True),
    "emu1_14b": emu1_14b,
    "emu1_release": emu1_release,
    "emu1_instruct_release": lambda: emu1_release(instruct=True),
}

_COMPONENTS = ("vision", "llm", "causal_transformer")
_EVERYWHERE = ("dtype", "param_dtype", "remat_policy", "attention")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _coerce(field: str, value: Any) -> Any:
    if field in ("dtype", "param_dtype") and isinstance(value, str):
        if value not in _DTYPES:
            raise ValueError(f"{field}={value!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[value]
    return value


def get_config(name: str, **overrides: Any) -> Emu2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    return apply_overrides(PRESETS[name](), name, **overrides)


def apply_overrides(config: Emu2Config, name: str, **overrides: Any) -> Emu2Config:
    """`config` with `overrides` (see the module docstring); `name` is for error messages."""
    for key, value in overrides.items():
        if key in _EVERYWHERE:
            parts = {c: dataclasses.replace(getattr(config, c), **{key: _coerce(key, value)})
                     for c in _COMPONENTS if hasattr(getattr(config, c), key)}
            config = dataclasses.replace(config, **parts)
        elif "." in key:
            component, field = key.split(".", 1)
            if component not in _COMPONENTS or getattr(config, component) is None:
                raise ValueError(f"override {key}: {name!r} has no component {component!r}")
            sub = dataclasses.replace(getattr(config, component), **{field: _coerce(field, value)})
            config = dataclasses.replace(config, **{component: sub})
        else:
            config = dataclasses.replace(config, **{key: value})
    return config
