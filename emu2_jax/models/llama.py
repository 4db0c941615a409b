"""LLaMA decoder (Emu2's LLaMA-33B and Emu v1's LLaMA-13B) in Flax linen.

Layers are always scanned (`layers.scan_blocks`): every per-layer parameter and cache variable has a
leading `layers` axis. Parameter tree (see `emu2_jax.convert.llama` for the Hugging Face mapping):

    embed_tokens/embedding                [V, D]
    layers/input_norm/scale               [N, D]
    layers/attn/{q,k,v}/kernel            [N, D, heads | kv_heads, head_dim]
    layers/attn/o/kernel                  [N, heads, head_dim, D]
    layers/attn/{q,k,v,o}/{lora_a,lora_b} only when lora_rank > 0
    layers/post_attention_norm/scale      [N, D]
    layers/mlp/{gate,up}/kernel           [N, D, F]
    layers/mlp/down/kernel                [N, F, D]
    norm/scale                            [D]
    lm_head/kernel                        [D, V]

`LlamaDecoder.__call__` only touches `layers` and `norm`; initialise every parameter with
`model.init(rng, tokens, positions, method=LlamaDecoder.forward)` (or from a parent module that calls
`embed`, `__call__` and `logits`).

KV-cache decoding: `cache = init_cache(config, batch_size, slots)` (zeros), then
`hidden, cache = model.apply({"params": params}, embeds, positions, segment_ids, cache,
method=LlamaDecoder.decode)`. The cache is an explicit pytree, not a Flax collection: one
`{"key", "value"}` pair per layer in head-major layout [B, kv_heads, slots, head_dim], the slots'
segment ids [B, slots] and the write index. Decoding loops over the layers in Python, so every
layer's cache is updated in place; `nn.scan` over a stacked cache copies it on every token
(benchmarks/decode.py). The weights may be the scanned stack (sliced per layer on every call: a
copy of each layer's weights per token) or, for serving, `unstack_layers` of it (one array per
layer, prepared once; about 1.5x faster decoding on CPU). Each call writes its L tokens at the
index and advances it by L; the caller keeps index + L <= slots.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from emu2_jax import sharding as sh
from emu2_jax.models import attention, layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_cache_length: int = 2048       # KV-cache slots for decoding
    dtype: Any = jnp.float32           # compute dtype
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"         # a key of layers.REMAT_POLICIES
    attention: str = "auto"            # a key of attention.BACKENDS (the full forward; decoding is xla)
    lora_rank: int = 0                 # LoRA on q, k, v, o when > 0 (Emu v1 chat tuning)
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        attention.check_backend(self.attention)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, L, head_dim] (float32), rotate_half layout: dim i pairs with i + head_dim / 2."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, L, heads, head_dim] in float32 and casts back to x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class LoRADense(nn.Module):
    """`layers.dense` plus an optional low-rank update: y = x W + (alpha / rank) (x A) B.

    A (`lora_a`, inputs -> rank) uses the kaiming-uniform init of the LoRA reference code; B (`lora_b`)
    starts at zero, so a fresh adapter is the identity change. Both sit next to `kernel` in one scope.
    """
    features: int | tuple[int, ...]
    kernel_axes: Sequence[str]
    axis: int | tuple[int, ...] = -1
    rank: int = 0
    alpha: float = 16.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.base = layers.dense(self.features, self.kernel_axes, axis=self.axis, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        nn.share_scope(self, self.base)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if self.rank == 0:
            return y
        n_in = len(self.axis) if isinstance(self.axis, tuple) else 1
        in_shape = x.shape[x.ndim - n_in:]
        out_shape = self.features if isinstance(self.features, tuple) else (self.features,)
        a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                                  in_axis=tuple(range(n_in)), out_axis=-1)
        a = self.param("lora_a", layers.partitioned(a_init, (*self.kernel_axes[:n_in], sh.LORA_RANK)),
                       (*in_shape, self.rank), self.param_dtype)
        b = self.param("lora_b", layers.partitioned(nn.initializers.zeros_init(),
                                                    (sh.LORA_RANK, *self.kernel_axes[n_in:])),
                       (self.rank, *out_shape), self.param_dtype)
        low = jnp.tensordot(x.astype(self.dtype), a.astype(self.dtype), axes=n_in)
        update = jnp.tensordot(low, b.astype(self.dtype), axes=1)
        return y + (self.alpha / self.rank) * update


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None = None, *,
                 mask: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """(output, updated layer cache). Without a cache: causal self-attention within `segment_ids`
        [B, T] (None = one segment per row) by `config.attention`. With a `cache`, the new keys and
        values are written at slot `index` and the queries attend over all its slots by `mask`
        [B, 1, T, S] (True = attend)."""
        cfg = self.config
        proj = functools.partial(LoRADense, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype)
        q_axes = (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_HEADS, sh.ACT_HEAD_DIM)
        kv_axes = (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_KV_HEADS, sh.ACT_HEAD_DIM)
        q = checkpoint_name(proj((cfg.num_heads, cfg.head_dim), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), name="q")(x),
                            layers.QUERY_PROJ)
        k = checkpoint_name(proj((cfg.num_kv_heads, cfg.head_dim), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM),
                                 name="k")(x), layers.KEY_PROJ)
        v = checkpoint_name(proj((cfg.num_kv_heads, cfg.head_dim), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM),
                                 name="v")(x), layers.VALUE_PROJ)
        q = nn.with_logical_constraint(apply_rotary(q, cos, sin), q_axes)
        k = nn.with_logical_constraint(apply_rotary(k, cos, sin), kv_axes)
        v = nn.with_logical_constraint(v, kv_axes)
        if cache is None:
            out = attention.attention(q, k, v, implementation=cfg.attention, causal=True, segment_ids=segment_ids,
                                      dtype=cfg.dtype)
        else:
            write = lambda old, new: nn.with_logical_constraint(
                jax.lax.dynamic_update_slice(old, jnp.swapaxes(new, 1, 2).astype(old.dtype), (0, 0, index, 0)),
                CACHE_AXES)
            cache = {"key": write(cache["key"], k), "value": write(cache["value"], v)}
            out = cached_attention(q, cache["key"], cache["value"], mask, dtype=cfg.dtype)
        out = nn.with_logical_constraint(out, q_axes)
        out = proj(cfg.hidden_size, (sh.HEADS, sh.HEAD_DIM, sh.EMBED), axis=(-2, -1), name="o")(out)
        return checkpoint_name(out, layers.OUT_PROJ), cache


# Logical axes of a layer's cached keys / values [B, kv_heads, slots, head_dim].
CACHE_AXES = (sh.ACT_BATCH, sh.ACT_KV_HEADS, sh.ACT_LENGTH, sh.ACT_HEAD_DIM)


def cached_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, *, dtype: Any
                     ) -> jax.Array:
    """`layers.dot_product_attention` over a head-major cache: query [B, T, H, D], key / value
    [B, K, S, D] (no transpose of the cache per step), mask [B, 1, T, S]; float32 logits."""
    batch, q_len, n_heads, head_dim = query.shape
    n_kv = key.shape[1]
    q = query.reshape(batch, q_len, n_kv, n_heads // n_kv, head_dim)
    logits = jnp.einsum("btkgd,bksd->bkgts", q, key, preferred_element_type=jnp.float32) * head_dim ** -0.5
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", weights, value.astype(dtype))
    return out.reshape(batch, q_len, n_heads, head_dim)


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = functools.partial(layers.dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        gate = dense(cfg.intermediate_size, (sh.EMBED, sh.MLP), name="gate")(x)
        up = dense(cfg.intermediate_size, (sh.EMBED, sh.MLP), name="up")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_MLP))
        return checkpoint_name(dense(cfg.hidden_size, (sh.MLP, sh.EMBED), name="down")(h), layers.MLP_OUT)


class LlamaBlock(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then h + MLP(RMSNorm(h)). Scan-shaped: returns (x, the
    updated layer cache, None without one)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None = None, *,
                 mask: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """`LlamaAttention`'s arguments."""
        cfg = self.config
        act_axes = (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED)
        norm = functools.partial(layers.RMSNorm, epsilon=cfg.rms_norm_eps, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype)
        attended, cache = LlamaAttention(cfg, name="attn")(norm(name="input_norm")(x), cos, sin, segment_ids,
                                                           mask=mask, cache=cache, index=index)
        h = nn.with_logical_constraint(x + attended, act_axes)
        out = h + LlamaMLP(cfg, name="mlp")(norm(name="post_attention_norm")(h))
        return nn.with_logical_constraint(out, act_axes), cache


class LlamaDecoder(nn.Module):
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=layers.partitioned(nn.initializers.normal(0.02), (sh.VOCAB, sh.EMBED)))
        self.layers = layers.scan_blocks(LlamaBlock, num_layers=cfg.num_layers, remat_policy=cfg.remat_policy)(cfg)
        self.norm = layers.RMSNorm(epsilon=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.lm_head = layers.dense(cfg.vocab_size, (sh.EMBED, sh.VOCAB), dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int token ids -> [B, L, D] embeddings in the compute dtype."""
        chex.assert_rank(tokens, 2)
        return nn.with_logical_constraint(self.embed_tokens(tokens),
                                          (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))

    def _inputs(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array | None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """(x in the compute dtype, RoPE cos, sin, segment ids or None) after the shape checks."""
        cfg = self.config
        chex.assert_shape(inputs_embeds, (None, None, cfg.hidden_size))
        chex.assert_shape(positions, inputs_embeds.shape[:2])
        if segment_ids is not None:
            chex.assert_shape(segment_ids, inputs_embeds.shape[:2])
        x = nn.with_logical_constraint(inputs_embeds.astype(cfg.dtype),
                                       (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)
        return x, cos, sin, segment_ids

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None
                 ) -> jax.Array:
        """Hidden states after the final RMSNorm, [B, L, D].

        positions [B, L] are the RoPE positions. segment_ids [B, L]: tokens attend causally to earlier
        tokens with the same non-zero id (packing); 0 marks padding; None means one segment per row.
        """
        x, cos, sin, segment_ids = self._inputs(inputs_embeds, positions, segment_ids)
        per_layer = self._per_layer_weights()
        if per_layer is None:
            x, _ = self.layers(x, cos, sin, segment_ids)
        for weights in per_layer or ():
            x, _ = LlamaBlock(self.config, parent=None).apply({"params": weights}, x, cos, sin, segment_ids)
        return self.norm(x)

    def _per_layer_weights(self) -> list[Any] | None:
        """Each layer's weights when the params are in the serving layout (`unstack_layers`), else None."""
        if self.is_initializing():
            return None
        stored = self.layers.variables["params"]
        return [stored[str(i)] for i in range(self.config.num_layers)] if "0" in stored else None

    def decode(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """`__call__` of tokens appended to the KV cache (module docstring): (hidden states, cache)."""
        x, cos, sin, segment_ids = self._inputs(inputs_embeds, positions, segment_ids)
        segment_ids = jnp.ones(positions.shape, jnp.int32) if segment_ids is None else segment_ids
        index = cache["index"]
        segments = jax.lax.dynamic_update_slice(cache["segment"], segment_ids.astype(jnp.int32), (0, index))
        mask = attention.attention_mask(segment_ids, segments, index)
        # An unbound block (parent=None) applied to each layer's weights.
        block = LlamaBlock(self.config, parent=None)
        per_layer = self._per_layer_weights() or [jax.tree.map(lambda w, i=i: w[i], self.layers.variables["params"])
                                                  for i in range(self.config.num_layers)]
        updated = []
        for weights, layer_cache in zip(per_layer, cache["layers"]):
            x, layer_cache = block.apply({"params": weights}, x, cos, sin, mask=mask, cache=layer_cache, index=index)
            updated.append(layer_cache)
        cache = {"layers": tuple(updated), "segment": segments, "index": index + segment_ids.shape[1]}
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, V] float32 logits."""
        chex.assert_shape(hidden, (None, None, self.config.hidden_size))
        logits = self.lm_head(hidden).astype(jnp.float32)
        return nn.with_logical_constraint(logits, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_VOCAB))

    def forward(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Token ids -> float32 logits via embed, __call__, logits; touches every parameter (use for init)."""
        return self.logits(self(self.embed(tokens), positions, segment_ids))


def unstack_layers(params: dict[str, Any], *, donate: bool = False) -> dict[str, Any]:
    """The decoder's params with the scanned layer stack split into per-layer trees {"0": ..., ...}:
    the serving layout `LlamaDecoder.decode` reads fastest (the training forward needs the stack).
    With `donate`, each stacked array is deleted once split, so the peak is one array's extra copy."""
    num_layers = len(jax.tree.leaves(params["layers"])[0])
    per_layer: list[dict] = [{} for _ in range(num_layers)]

    def split(path, stacked):
        for i in range(num_layers):
            node = per_layer[i]
            for key in path[:-1]:
                node = node.setdefault(key.key, {})
            node[path[-1].key] = stacked[i]
        if donate:
            stacked.delete()

    jax.tree_util.tree_map_with_path(split, params["layers"])
    return {**params, "layers": {str(i): tree for i, tree in enumerate(per_layer)}}


def merge_lora(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, Any]:
    """The decoder's params with every LoRA update folded into its kernel, W + (alpha / rank) A B, and
    the adapters dropped: the weights of the same function at `lora_rank=0` (for export). Works on
    the scanned layer stack (a leading layer axis on W, A and B) and on the serving layout."""
    scale = config.lora_alpha / max(config.lora_rank, 1)
    contract = lambda a, b: jnp.tensordot(a, b, axes=1)

    def fold(node):
        if not isinstance(node, Mapping):
            return node
        if "lora_a" not in node:
            return {k: fold(v) for k, v in node.items()}
        kernel, a, b = node["kernel"], node["lora_a"], node["lora_b"]
        stacked = kernel.ndim == a.ndim + b.ndim - 3
        delta = jax.vmap(contract)(a, b) if stacked else contract(a, b)
        return {"kernel": (kernel + scale * delta).astype(kernel.dtype)}

    return fold(params)


def init_cache(config: LlamaConfig, batch_size: int, slots: int | None = None) -> dict[str, Any]:
    """An empty KV cache of `slots` positions (default `config.max_cache_length`) for `batch_size` rows."""
    shape = (batch_size, config.num_kv_heads, slots or config.max_cache_length, config.head_dim)
    layer = lambda: {"key": jnp.zeros(shape, config.dtype), "value": jnp.zeros(shape, config.dtype)}
    return {"layers": tuple(layer() for _ in range(config.num_layers)),
            "segment": jnp.zeros(shape[:1] + shape[2:3], jnp.int32), "index": jnp.zeros((), jnp.int32)}
