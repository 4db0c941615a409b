"""Text generation over a static KV cache: prefill, greedy / sampling loop, the shared pieces.

A prompt is a batch in the training layout (`tokens`, `positions`, `segment_ids`, `images`,
`image_valid`, `image_is_frame`), left-padded so that every row ends at the last column: padding has
segment 0 and every prompt token segment 1. `prefill` writes a prompt (or, for a chat, the next
turn) into the cache and returns a `Decoding` state: the cache, the logits and regressed visual
embedding at each row's last position and the next position. Loops continue from a state, so a
conversation keeps one state and prefills only its new tokens.

`generate_text` pads the prompt to a length bucket (`bucket_length`), sizes the cache to that
bucket plus `max_new_tokens`, and runs one jitted program per (model, decoding settings, shapes):
a new prompt length inside the same bucket does not recompile, and neither do new values of
`temperature`, `top_k`, `top_p` or `length_penalty` (traced).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from emu2_jax import sharding as sh
from emu2_jax.models import llama
from emu2_jax.models.emu2 import Emu2Config, Emu2Model

PyTree = Any
LLAMA_EOS = 2          # `</s>` of LLaMA's sentencepiece model (and of the embedded tiny one)
BUCKET = 64            # prompt lengths are rounded up to a multiple of this (one compile per bucket)


@flax.struct.dataclass
class Decoding:
    """Where decoding stands: the cache and the model's outputs at each row's last position."""
    cache: PyTree
    logits: jax.Array          # [B, V] float32 text logits of the next token
    visual: jax.Array          # [B, Dv] regressed embedding of the next element
    next_position: jax.Array   # [B] int32 RoPE position of the next token


@dataclasses.dataclass(frozen=True)
class Generated:
    """New tokens of each row: `tokens[i, :lengths[i]]`, without the stop token; -1 after."""
    tokens: np.ndarray    # [B, max_new_tokens] int32
    lengths: np.ndarray   # [B] int32

    def rows(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


# ---------------------------------------------------------------------------------------------
# Prompts and shapes.

def bucket_length(length: int, bucket: int = BUCKET) -> int:
    return -(-length // bucket) * bucket


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> dict[str, np.ndarray]:
    """tokens / positions / segment_ids [B, length] of prompts left-padded to `length` (default the longest)."""
    length = length or max(len(r) for r in rows)
    if any(len(r) > length for r in rows):
        raise ValueError(f"a prompt of {max(len(r) for r in rows)} tokens does not fit {length} columns")
    tokens = np.full((len(rows), length), pad_id, np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
    positions = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        segment_ids[i, length - len(row):] = 1
        positions[i, length - len(row):] = np.arange(len(row))
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def pad_prompt(prompt: Mapping[str, Any], length: int) -> dict[str, np.ndarray]:
    """`prompt` left-padded with padding columns (segment 0) to `length` columns."""
    extra = length - prompt["tokens"].shape[1]
    if extra < 0:
        raise ValueError(f"prompt of {prompt['tokens'].shape[1]} columns does not fit {length}")
    pad = lambda key: np.pad(np.asarray(prompt[key]), ((0, 0), (extra, 0)))
    return {**prompt, "tokens": pad("tokens"), "positions": pad("positions"), "segment_ids": pad("segment_ids")}


def truncate_at(tokens: Sequence[int] | np.ndarray, stop_ids: int | Sequence[int]) -> list[int]:
    """The tokens before the first stop id (e.g. `</s>`, [EOC])."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    out = []
    for token in np.asarray(tokens).tolist():
        if token in stops:
            break
        out.append(token)
    return out


def init_cache(model: Emu2Model, batch_size: int, slots: int | None = None) -> PyTree:
    """An empty KV cache of `slots` positions (default the model's context, llm.max_cache_length)."""
    return llama.init_cache(model.config.llm, batch_size, slots)


def check_fits(config: Emu2Config, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len + max_new_tokens > config.llm.max_cache_length:
        raise ValueError(f"prompt length {prompt_len} + {max_new_tokens} new tokens exceeds the model's context "
                         f"({config.llm.max_cache_length} positions, llm.max_cache_length)")


# ---------------------------------------------------------------------------------------------
# Traced building blocks (call inside jit).

def prefill(model: Emu2Model, params: PyTree, cache: PyTree, prompt: Mapping[str, jax.Array]) -> Decoding:
    """Appends the (left-padded) prompt to the cache; the state after its last column."""
    chex.assert_equal_shape((prompt["tokens"], prompt["positions"], prompt["segment_ids"]))
    variables = {"params": params}
    embeds, _ = model.apply(variables, prompt["tokens"], prompt["images"], prompt["image_valid"],
                            prompt["image_is_frame"], method=Emu2Model.embed_inputs)
    return extend(model, params, cache, embeds, prompt["positions"], prompt["segment_ids"])


def extend(model: Emu2Model, params: PyTree, cache: PyTree, embeds: jax.Array, positions: jax.Array,
           segment_ids: jax.Array) -> Decoding:
    """Appends input embeddings [B, L, D] at `positions` to the cache."""
    (logits, visual), cache = model.apply({"params": params}, embeds, positions, segment_ids, cache,
                                          method=Emu2Model.decode_step)
    return Decoding(cache=cache, logits=logits, visual=visual,
                    next_position=jnp.max(positions, axis=1).astype(jnp.int32) + 1)


def embed_tokens(model: Emu2Model, params: PyTree, tokens: jax.Array) -> jax.Array:
    return model.apply({"params": params}, tokens, method=lambda m, t: m.llm.embed(t))


def feed_tokens(model: Emu2Model, params: PyTree, state: Decoding, tokens: jax.Array) -> Decoding:
    """Appends one token per row [B] at each row's next position."""
    positions = state.next_position[:, None]
    return extend(model, params, state.cache, embed_tokens(model, params, tokens[:, None]), positions,
                  jnp.ones_like(positions))


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Transformers' sampling warpers in their order: temperature, then top-k (ties with the k-th
    value kept), then top-p (the smallest set of most likely tokens whose probability reaches
    top_p; at least one). Removed tokens get -inf. top_k = 0 and top_p = 1 disable those."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    index = jnp.broadcast_to(jnp.clip(top_k - 1, 0, vocab - 1), (*logits.shape[:-1], 1))
    kth = jnp.take_along_axis(descending, index, axis=-1)
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = cumulative <= 1 - top_p
    removed = removed.at[..., -1].set(False)
    # The cut-off is the smallest kept logit; every token below it goes (ties at it stay, as in sorting).
    threshold = jnp.min(jnp.where(removed, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where((top_p < 1) & (logits < threshold), -jnp.inf, logits)


def _is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))


def sample_loop(model: Emu2Model, params: PyTree, state: Decoding, rng: jax.Array, knobs: Mapping[str, jax.Array],
                *, max_new_tokens: int, do_sample: bool, stop_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Greedy (argmax) or sampled decoding from `state`; rows stop independently at a stop id and
    the loop ends when all have. Returns (tokens [B, T] with -1 after each row's stop, lengths [B])."""
    batch = state.logits.shape[0]

    def choose(logits, key):
        if not do_sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = filter_logits(logits, knobs["temperature"], knobs["top_k"], knobs["top_p"])
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, state, out, lengths, done, rng = carry
        rng, key = jax.random.split(rng)
        token = choose(state.logits, key)
        stop = _is_stop(token, stop_ids) & ~done
        out = out.at[:, i].set(jnp.where(done | stop, -1, token))
        lengths = jnp.where(done | stop, lengths, i + 1)
        done = done | stop
        # The last token never needs its logits: skip that model call.
        state = jax.lax.cond(i + 1 < max_new_tokens, lambda s: feed_tokens(model, params, s, token), lambda s: s,
                             state)
        return i + 1, state, out, lengths, done, rng

    init = (jnp.int32(0), state, jnp.full((batch, max_new_tokens), -1, jnp.int32), jnp.zeros(batch, jnp.int32),
            jnp.zeros(batch, bool), rng)
    _, _, out, lengths, _, _ = jax.lax.while_loop(cond, body, init)
    return out, lengths


# ---------------------------------------------------------------------------------------------
# The entry point.

def decode(model: Emu2Model, params: PyTree, state: Decoding, rng: jax.Array, knobs: Mapping[str, jax.Array], *,
           max_new_tokens: int, num_beams: int, do_sample: bool, stop_ids: tuple[int, ...],
           beam_convention: str) -> tuple[jax.Array, jax.Array]:
    """New tokens from `state`: beam search when num_beams > 1, else greedy or sampled (traced)."""
    from emu2_jax.inference import beam

    if num_beams > 1:
        return beam.beam_search(model, params, state, knobs["length_penalty"], num_beams=num_beams,
                                max_new_tokens=max_new_tokens, stop_ids=stop_ids, convention=beam_convention)
    return sample_loop(model, params, state, rng, knobs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       stop_ids=stop_ids)


def _jit(fn, mesh: jax.sharding.Mesh | None, rules: sh.Rules):
    return jax.jit(sh.with_logical_rules(fn, mesh, rules) if mesh is not None else fn)


@functools.lru_cache(maxsize=64)
def _compiled_generate(config: Emu2Config, slots: int, mesh: jax.sharding.Mesh | None, rules: sh.Rules,
                       **settings: Any):
    """prompt -> new tokens, over a fresh `slots`-long cache."""
    model = Emu2Model(config)

    def run(params, prompt, rng, knobs):
        state = prefill(model, params, init_cache(model, prompt["tokens"].shape[0], slots), prompt)
        return decode(model, params, state, rng, knobs, **settings)

    return _jit(run, mesh, rules)


@functools.lru_cache(maxsize=64)
def _compiled_continue(config: Emu2Config, mesh: jax.sharding.Mesh | None, rules: sh.Rules, **settings: Any):
    """state -> new tokens (a conversation's cache is the config's max_cache_length long)."""
    model = Emu2Model(config)
    return _jit(lambda params, state, rng, knobs: decode(model, params, state, rng, knobs, **settings), mesh, rules)


@functools.lru_cache(maxsize=16)
def _compiled_prefill(config: Emu2Config, mesh: jax.sharding.Mesh | None, rules: sh.Rules):
    model = Emu2Model(config)
    return _jit(lambda params, cache, prompt: prefill(model, params, cache, prompt), mesh, rules)


def _settings(*, max_new_tokens: int, num_beams: int = 1, length_penalty: float = 1.0, do_sample: bool = False,
              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (LLAMA_EOS,),
              beam_convention: str = "release") -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """(static decoding settings, traced knobs) after checking the arguments."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams}: must be >= 1")
    if num_beams > 1 and do_sample:
        raise ValueError("do_sample with num_beams > 1 (beam sampling) is not supported")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
        raise ValueError(f"temperature={temperature} must be > 0, top_p={top_p} in (0, 1], top_k={top_k} >= 0")
    if not stop_ids:
        raise ValueError("stop_ids is empty: give at least the end-of-sequence id")
    if beam_convention not in ("release", "transformers5"):
        raise ValueError(f"beam_convention={beam_convention!r}; expected 'release' or 'transformers5'")
    settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                    stop_ids=tuple(int(s) for s in stop_ids), beam_convention=beam_convention)
    knobs = {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p),
             "length_penalty": jnp.float32(length_penalty)}
    return settings, knobs


def generate_text(model: Emu2Model, params: PyTree, prompt: Mapping[str, Any], *, max_new_tokens: int,
                  rng: jax.Array | None = None, bucket: int = BUCKET, mesh: jax.sharding.Mesh | None = None,
                  rules: sh.Rules = sh.LOGICAL_RULES, **options: Any) -> Generated:
    """New tokens after each (left-padded) prompt row: greedy, sampled (`do_sample`, `temperature`,
    `top_k`, `top_p`) or beam search (`num_beams` > 1, `length_penalty`; transformers 4.31's
    algorithm as the release uses it, or transformers 5's with `beam_convention="transformers5"`:
    see `emu2_jax.inference.beam`), each row stopping at any of `stop_ids` (default `</s>`).
    With a `mesh`, parameters keep the shardings they were placed with and activations and the
    cache follow the logical-axis `rules`."""
    settings, knobs = _settings(max_new_tokens=max_new_tokens, **options)
    length = bucket_length(prompt["tokens"].shape[1], bucket)
    check_fits(model.config, length, max_new_tokens)
    fn = _compiled_generate(model.config, length + max_new_tokens, mesh, rules, **settings)
    rng = jax.random.key(0) if rng is None else rng
    tokens, lengths = jax.device_get(fn(params, pad_prompt(prompt, length), rng, knobs))
    return Generated(np.asarray(tokens), np.asarray(lengths))


def continue_text(model: Emu2Model, params: PyTree, state: Decoding, *, max_new_tokens: int,
                  rng: jax.Array | None = None, mesh: jax.sharding.Mesh | None = None,
                  rules: sh.Rules = sh.LOGICAL_RULES, **options: Any) -> Generated:
    """`generate_text` from a state whose cache is `model.config.llm.max_cache_length` long (a
    conversation's); the state itself is left as it was."""
    settings, knobs = _settings(max_new_tokens=max_new_tokens, **options)
    fn = _compiled_continue(model.config, mesh, rules, **settings)
    rng = jax.random.key(0) if rng is None else rng
    tokens, lengths = jax.device_get(fn(params, state, rng, knobs))
    return Generated(np.asarray(tokens), np.asarray(lengths))


def prefill_prompt(model: Emu2Model, params: PyTree, cache: PyTree, prompt: Mapping[str, Any], *,
                   mesh: jax.sharding.Mesh | None = None, rules: sh.Rules = sh.LOGICAL_RULES) -> Decoding:
    """Jitted `prefill` of a prompt onto `cache` (of the config's length; `init_cache` for a new one)."""
    return _compiled_prefill(model.config, mesh, rules)(params, cache, prompt)
