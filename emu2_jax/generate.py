"""Greedy text decoding with the LLM's KV cache (captions, answers).

The prompt is a batch in the training layout (`tokens`, `positions`, `segment_ids`, `images`,
`image_valid`, `image_is_frame`), left-padded so that every row ends at the last column: padding
has segment 0 and every prompt token segment 1. One prefill call writes the whole prompt into the
cache; each new token is then one cached step at position (prompt length + i).

    generate = make_greedy_generate(model, max_new_tokens=32)
    new_tokens = generate(params, prompt)            # [B, max_new_tokens] int32
    texts = [tokenizer.decode(truncate_at(row, eos_id)) for row in np.asarray(new_tokens)]
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from emu2_jax.models import llama
from emu2_jax.models.emu2 import Emu2Model


def init_cache(model: Emu2Model, batch_size: int) -> dict[str, Any]:
    """An empty KV cache (`cache` collection) of `Emu2Model` for `batch_size` rows."""
    return {"llm": llama.init_cache(model.config.llm, batch_size)}


def make_greedy_generate(model: Emu2Model, *, max_new_tokens: int
                         ) -> Callable[[Mapping[str, Any], Mapping[str, jax.Array]], jax.Array]:
    """A jitted `generate(params, prompt) -> [B, max_new_tokens]` of argmax tokens.

    params: the model's params dict (without the `params` collection key). Rows keep generating
    after their end-of-sequence token; `truncate_at` cuts them on the host.
    """
    max_cache = model.config.llm.max_cache_length

    def generate(params: Mapping[str, Any], prompt: Mapping[str, jax.Array]) -> jax.Array:
        tokens, positions, segment_ids = prompt["tokens"], prompt["positions"], prompt["segment_ids"]
        chex.assert_equal_shape((tokens, positions, segment_ids))
        batch, prompt_len = tokens.shape
        if prompt_len + max_new_tokens > max_cache:
            raise ValueError(f"prompt length {prompt_len} + {max_new_tokens} new tokens exceeds the KV cache "
                             f"({max_cache} slots, llm.max_cache_length)")
        variables = {"params": params}
        embeds, _ = model.apply(variables, tokens, prompt["images"], prompt["image_valid"],
                                prompt["image_is_frame"], method=Emu2Model.embed_inputs)
        (logits, _), mutated = model.apply(
            {**variables, "cache": init_cache(model, batch)}, embeds, positions, segment_ids,
            method=Emu2Model.decode_step, mutable=["cache"])
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        next_position = jnp.max(positions, axis=1) + 1
        ones = jnp.ones((batch, 1), jnp.int32)

        def step(carry, i):
            cache, token = carry
            embed = model.apply(variables, token[:, None], method=lambda m, t: m.llm.embed(t))
            (logits, _), mutated = model.apply(
                {**variables, "cache": cache}, embed, (next_position + i)[:, None], ones,
                method=Emu2Model.decode_step, mutable=["cache"])
            following = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            return (mutated["cache"], following), following

        _, rest = jax.lax.scan(step, (mutated["cache"], first), jnp.arange(max_new_tokens - 1))
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return jax.jit(generate)


def truncate_at(tokens: Sequence[int] | np.ndarray, stop_ids: int | Sequence[int]) -> list[int]:
    """The tokens before the first stop id (e.g. `</s>`, [EOC])."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    out = []
    for token in np.asarray(tokens).tolist():
        if token in stops:
            break
        out.append(token)
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, np.ndarray]:
    """tokens / positions / segment_ids [B, P] of prompts left-padded to the longest one."""
    length = max(len(r) for r in rows)
    tokens = np.full((len(rows), length), pad_id, np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
    positions = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        segment_ids[i, length - len(row):] = 1
        positions[i, length - len(row):] = np.arange(len(row))
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
