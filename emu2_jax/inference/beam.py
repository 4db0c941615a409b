"""Beam search as the Emu2 release runs it: transformers 4.31's `BeamSearchScorer` with
`early_stopping=False`, generating from input embeddings.

The release calls `generate(inputs_embeds=...)`, so 4.31 starts the output ids with `<s>` and a
finished hypothesis scores `sum of its log-probs / length ** length_penalty`, where `length`
counts that `<s>` plus the generated tokens before the stop token (4.31 stores a hypothesis
without the stop token that ends it). At each step the (1 + len(stop_ids)) * num_beams best
continuations are read in order: a stop token ranked among the first num_beams ends a hypothesis,
the first num_beams others continue. A row is done once it holds num_beams hypotheses and the
worst of them scores at least the best continuation's log-prob sum / (1 + generated) **
length_penalty. Rows still running after `max_new_tokens` add their beams as hypotheses of length
1 + max_new_tokens. The best-scoring hypothesis is returned.

Transformers 5 differs (`convention="transformers5"`, docs/inference.md#beam-search): a hypothesis
cut by `max_new_tokens` counts max_new_tokens (no `<s>`), only continuations ranked among the first
num_beams are cut there, and the early-stopping check divides the best *running* beam's sum (not
the best continuation's). Hypotheses ended by a stop token score the same in both.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from emu2_jax.inference.text import Decoding, feed_tokens
from emu2_jax.models.emu2 import Emu2Model

PyTree = Any
NEG_INF = -1e9


def _gather_rows(state: Decoding, index: jax.Array) -> Decoding:
    """The state's rows `index` [R]: cache arrays are [rows, ...]; the write index is shared."""
    cache = jax.tree.map(lambda x: jnp.take(x, index, axis=0) if x.ndim else x, state.cache)
    return Decoding(cache=cache, logits=state.logits[index], visual=state.visual[index],
                    next_position=state.next_position[index])


def _add_hypothesis(hyps: dict[str, jax.Array], add: jax.Array, tokens: jax.Array, length: jax.Array,
                    score: jax.Array) -> dict[str, jax.Array]:
    """4.31's `BeamHypotheses.add` for every row at once: rows where `add` [B] keep the new
    hypothesis if they hold fewer than num_beams or it beats their worst (which it then replaces)."""
    num_beams = hyps["scores"].shape[1]
    full = hyps["count"] >= num_beams
    worst = jnp.argmin(hyps["scores"], axis=1)
    slot = jnp.where(full, worst, jnp.minimum(hyps["count"], num_beams - 1))
    keep = add & (~full | (score > jnp.take_along_axis(hyps["scores"], worst[:, None], axis=1)[:, 0]))
    onehot = (jnp.arange(num_beams)[None] == slot[:, None]) & keep[:, None]
    return {"tokens": jnp.where(onehot[..., None], tokens[:, None], hyps["tokens"]),
            "scores": jnp.where(onehot, score[:, None], hyps["scores"]),
            "lengths": jnp.where(onehot, length[:, None], hyps["lengths"]),
            "count": jnp.where(keep, jnp.minimum(hyps["count"] + 1, num_beams), hyps["count"])}


CONVENTIONS = ("release", "transformers5")


def beam_search(model: Emu2Model, params: PyTree, state: Decoding, length_penalty: jax.Array, *, num_beams: int,
                max_new_tokens: int, stop_ids: tuple[int, ...], convention: str = "release"
                ) -> tuple[jax.Array, jax.Array]:
    """(tokens [B, max_new_tokens] of each row's best hypothesis, -1 after its end; lengths [B])."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}; expected one of {CONVENTIONS}")
    release = convention == "release"
    batch, vocab = state.logits.shape
    k, steps = num_beams, max_new_tokens
    candidates = (1 + len(stop_ids)) * k
    state = _gather_rows(state, jnp.repeat(jnp.arange(batch), k))
    stops = jnp.asarray(stop_ids, jnp.int32)
    penalty = lambda length: length.astype(jnp.float32) ** length_penalty

    def cond(carry):
        t, _, _, _, _, done = carry
        return (t < steps) & ~jnp.all(done)

    def body(carry):
        t, state, run_tokens, run_scores, hyps, done = carry
        log_probs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
        scores, flat = jax.lax.top_k((log_probs + run_scores[..., None]).reshape(batch, k * vocab), candidates)
        beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        is_stop = jnp.isin(token, stops)
        # Release: `<s>` and the t tokens before the stop token; transformers 5: the t + 1 new tokens.
        length = 1 + t
        ends = is_stop if release else is_stop | (t + 1 == steps)
        for rank in range(k):  # only continuations ranked among the first num_beams end a hypothesis
            parent = jnp.take_along_axis(run_tokens, beam[:, rank, None, None], axis=1)[:, 0]
            kept = jnp.where(is_stop[:, rank], t, t + 1)
            hyps = _add_hypothesis(hyps, ends[:, rank] & ~done, parent.at[:, t].set(token[:, rank]), kept,
                                   scores[:, rank] / penalty(length))
        # The first num_beams continuations that are not stop tokens, in rank order.
        chosen = jnp.argsort(is_stop, axis=1, stable=True)[:, :k]
        beam, token, new_scores = (jnp.take_along_axis(x, chosen, axis=1) for x in (beam, token, scores))
        best = scores[:, 0] if release else new_scores[:, 0]
        heuristic = hyps["scores"].min(axis=1) >= best / penalty(length)
        done = done | ((hyps["count"] >= k) & heuristic)
        run_tokens = jnp.take_along_axis(run_tokens, beam[..., None], axis=1).at[:, :, t].set(token)
        rows = (jnp.arange(batch)[:, None] * k + beam).reshape(-1)
        state = jax.lax.cond(t + 1 < steps, lambda s: feed_tokens(model, params, _gather_rows(s, rows),
                                                                  token.reshape(-1)), lambda s: s, state)
        return t + 1, state, run_tokens, new_scores, hyps, done

    run_scores = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
    hyps = {"tokens": jnp.full((batch, k, steps), -1, jnp.int32), "scores": jnp.full((batch, k), -jnp.inf),
            "lengths": jnp.zeros((batch, k), jnp.int32), "count": jnp.zeros(batch, jnp.int32)}
    init = (jnp.int32(0), state, jnp.full((batch, k, steps), -1, jnp.int32), run_scores, hyps, jnp.zeros(batch, bool))
    t, _, run_tokens, run_scores, hyps, done = jax.lax.while_loop(cond, body, init)
    for i in range(k if release else 0):  # rows cut by max_new_tokens: their running beams at length 1 + t
        hyps = _add_hypothesis(hyps, ~done, run_tokens[:, i], jnp.full(batch, t), run_scores[:, i] / penalty(1 + t))
    best = jnp.argmax(hyps["scores"], axis=1)
    tokens = jnp.take_along_axis(hyps["tokens"], best[:, None, None], axis=1)[:, 0]
    lengths = jnp.take_along_axis(hyps["lengths"], best[:, None], axis=1)[:, 0]
    return jnp.where(jnp.arange(steps)[None] < lengths[:, None], tokens, -1), lengths
