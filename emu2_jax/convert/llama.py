"""Hugging Face `LlamaForCausalLM` state dict -> `LlamaDecoder` params.

Key mapping (`{p}` = prefix, `{i}` = layer; Linear weights [out, in] are transposed to [in, out]):

    {p}model.embed_tokens.weight [V, D]                      -> embed_tokens/embedding [V, D]
    {p}model.layers.{i}.input_layernorm.weight [D]           -> layers/input_norm/scale [N, D]
    {p}model.layers.{i}.self_attn.q_proj.weight [H*hd, D]    -> layers/attn/q/kernel [N, D, H, hd]
    {p}model.layers.{i}.self_attn.{k,v}_proj.weight [K*hd, D]-> layers/attn/{k,v}/kernel [N, D, K, hd]
    {p}model.layers.{i}.self_attn.o_proj.weight [D, H*hd]    -> layers/attn/o/kernel [N, H, hd, D]
    {p}model.layers.{i}.post_attention_layernorm.weight [D]  -> layers/post_attention_norm/scale [N, D]
    {p}model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]     -> layers/mlp/{gate,up}/kernel [N, D, F]
    {p}model.layers.{i}.mlp.down_proj.weight [D, F]          -> layers/mlp/down/kernel [N, F, D]
    {p}model.norm.weight [D]                                 -> norm/scale [D]
    {p}lm_head.weight [V, D]                                 -> lm_head/kernel [D, V]

`...self_attn.rotary_emb.inv_freq` buffers are ignored (RoPE is recomputed from `rope_theta`); keys
outside `{p}model.` / `{p}lm_head.` are ignored, so a whole Emu2 state dict can be passed with
prefix "decoder.lm." (native) or "model.decoder.lm." (Hugging Face Emu2). q/k rows are used as stored:
the model implements the same rotate_half RoPE layout as transformers.

LoRA parameters (`lora_a`, `lora_b`, present when config.lora_rank > 0) do not exist in the checkpoint
and are not produced: take them from a fresh `init` and merge the converted tree into it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from emu2_jax.models.llama import LlamaConfig

_INV_FREQ = ".self_attn.rotary_emb.inv_freq"


Entry = tuple[str, tuple[int, ...], tuple[str, ...], Callable[[np.ndarray], np.ndarray]]


def llama_entries(config: LlamaConfig) -> tuple[list[Entry], list[Entry]]:
    """(per-layer entries, top-level entries): (HF key suffix, HF shape, Flax path, conversion).
    Per-layer entries are stacked on axis 0 of their Flax leaf; the streaming converter writes them
    one layer slot at a time."""
    c = config
    d, hd, f, v = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size

    def transpose_to(*shape: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda w: w.T.reshape(shape)

    def keep(w: np.ndarray) -> np.ndarray:
        return w

    layer_entries = [
        ("input_layernorm.weight", (d,), ("input_norm", "scale"), keep),
        ("self_attn.q_proj.weight", (c.num_heads * hd, d), ("attn", "q", "kernel"),
         transpose_to(d, c.num_heads, hd)),
        ("self_attn.k_proj.weight", (c.num_kv_heads * hd, d), ("attn", "k", "kernel"),
         transpose_to(d, c.num_kv_heads, hd)),
        ("self_attn.v_proj.weight", (c.num_kv_heads * hd, d), ("attn", "v", "kernel"),
         transpose_to(d, c.num_kv_heads, hd)),
        ("self_attn.o_proj.weight", (d, c.num_heads * hd), ("attn", "o", "kernel"),
         transpose_to(c.num_heads, hd, d)),
        ("post_attention_layernorm.weight", (d,), ("post_attention_norm", "scale"), keep),
        ("mlp.gate_proj.weight", (f, d), ("mlp", "gate", "kernel"), transpose_to(d, f)),
        ("mlp.up_proj.weight", (f, d), ("mlp", "up", "kernel"), transpose_to(d, f)),
        ("mlp.down_proj.weight", (d, f), ("mlp", "down", "kernel"), transpose_to(f, d)),
    ]
    top_entries = [
        ("model.embed_tokens.weight", (v, d), ("embed_tokens", "embedding"), keep),
        ("model.norm.weight", (d,), ("norm", "scale"), keep),
        ("lm_head.weight", (v, d), ("lm_head", "kernel"), transpose_to(d, v)),
    ]
    return layer_entries, top_entries


def convert_llama(state_dict: Mapping[str, np.ndarray], config: LlamaConfig, prefix: str = "") -> dict:
    """Returns the `LlamaDecoder` params tree (numpy arrays in `config.param_dtype`).

    Raises ValueError on missing or unexpected keys under `{prefix}model.` / `{prefix}lm_head.` and on
    shape mismatches, naming the key and shapes.
    """
    n = config.num_layers
    dtype = np.dtype(config.param_dtype)
    layer_entries, top_entries = llama_entries(config)

    expected = {prefix + key: shape for key, shape, _, _ in top_entries}
    for i in range(n):
        expected.update({f"{prefix}model.layers.{i}.{key}": shape for key, shape, _, _ in layer_entries})
    in_scope = [k for k in state_dict
                if k.startswith((prefix + "model.", prefix + "lm_head.")) and not k.endswith(_INV_FREQ)]
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(in_scope) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LLaMA state dict (prefix {prefix!r}) does not match the config: "
                         f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                         f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for key, shape in expected.items():
        got = tuple(np.shape(state_dict[key]))
        if got != shape:
            raise ValueError(f"{key}: shape {got}, expected {shape} for this config")

    params: dict = {}

    def put(path: tuple[str, ...], value: np.ndarray) -> None:
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value

    for key, _, path, fn in top_entries:
        put(path, fn(np.asarray(state_dict[prefix + key])).astype(dtype))
    for key, _, path, fn in layer_entries:
        stacked = None  # filled in place so a 33B checkpoint is not held twice in host memory
        for i in range(n):
            w = fn(np.asarray(state_dict[f"{prefix}model.layers.{i}.{key}"]))
            if stacked is None:
                stacked = np.empty((n, *w.shape), dtype)
            stacked[i] = w
        put(("layers", *path), stacked)
    return params
