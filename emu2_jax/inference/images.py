"""Image generation: the LLM regresses an image's visual embeddings, the visual decoder draws them.

`generate_image_embeddings` appends `[IMG]` to each prompt row and regresses the `n_query`
embeddings one at a time over the KV cache: the output after `[IMG]` is the first embedding, and
each embedding goes back in, through the connector's `project_up`, as the input of the next
position, exactly as the release's `generate_image` (which recomputes the whole sequence at every
step; tests/inference/test_images.py checks the two agree). No `[/IMG]` is appended.

`ImageGenerator` pairs an LLM with a visual decoder: Euler sampling with classifier-free guidance
against the regression from an empty prompt (`<s>[IMG]`, computed once per negative prompt and
kept) or from a `negative_prompt`, then the VAE. A prompt that is exactly one image and no text is
autoencoded instead, conditioned on the image's own pooled encoding (docs/inference.md).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emu2_jax import sharding as sh
from emu2_jax.inference import text
from emu2_jax.models import visual_decoder
from emu2_jax.models.emu2 import Emu2Config, Emu2Model

PyTree = Any


def append_token(prompt: Mapping[str, Any], token_id: int) -> dict[str, np.ndarray]:
    """The prompt with one more column: `token_id` at each row's next position."""
    tokens, positions = np.asarray(prompt["tokens"]), np.asarray(prompt["positions"])
    column = lambda x: np.concatenate([np.asarray(x[0]), np.asarray(x[1])], axis=1).astype(np.int32)
    return {**prompt, "tokens": column((tokens, np.full((len(tokens), 1), token_id))),
            "positions": column((positions, positions.max(axis=1, keepdims=True) + 1)),
            "segment_ids": column((prompt["segment_ids"], np.ones((len(tokens), 1))))}


def append_boi(config: Emu2Config, prompt: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The prompt with `[IMG]` at each row's next position."""
    return append_token(prompt, config.boi_token_id)


def feed_visual(model: Emu2Model, params: PyTree, state: text.Decoding, visual: jax.Array) -> text.Decoding:
    """Appends one regressed embedding per row [B, Dv] (through `project_up`) at the next position."""
    embeds = model.apply({"params": params}, visual[:, None], method=Emu2Model.project_visual)
    positions = state.next_position[:, None]
    return text.extend(model, params, state.cache, embeds, positions, jnp.ones_like(positions))


def regress_embeddings(model: Emu2Model, params: PyTree, state: text.Decoding, count: int
                       ) -> tuple[text.Decoding, jax.Array]:
    """From the state after `[IMG]`: `count` regressed embeddings [B, count, Dv] (traced), and the
    state after all but the last went back in."""
    def step(state, _):
        following = feed_visual(model, params, state, state.visual)
        return following, following.visual

    state_after, rest = jax.lax.scan(step, state, None, length=count - 1)
    return state_after, jnp.concatenate([state.visual[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)


def regress_clip(model: Emu2Model, params: PyTree, state: text.Decoding, num_frames: int) -> jax.Array:
    """From the state after `[VIDEO]`: `num_frames` frames of `v_query` regressed embeddings each
    [B, F, v_query, Dv], each frame in the training layout `[IMG]` + embeddings + `[/IMG]`."""
    cfg = model.config
    rows = state.next_position.shape[0]

    def frame(state, _):
        state = text.feed_tokens(model, params, state, jnp.full((rows,), cfg.boi_token_id, jnp.int32))
        state, embeddings = regress_embeddings(model, params, state, cfg.v_query)
        state = feed_visual(model, params, state, embeddings[:, -1])
        state = text.feed_tokens(model, params, state, jnp.full((rows,), cfg.eoi_token_id, jnp.int32))
        return state, embeddings

    _, frames = jax.lax.scan(frame, state, None, length=num_frames)
    return jnp.moveaxis(frames, 0, 1)


@functools.lru_cache(maxsize=16)
def _compiled_regression(config: Emu2Config, slots: int, num_frames: int | None, mesh: jax.sharding.Mesh | None,
                         rules: sh.Rules):
    model = Emu2Model(config)

    def run(params, prompt):
        state = text.prefill(model, params, text.init_cache(model, prompt["tokens"].shape[0], slots), prompt)
        if num_frames is None:
            return regress_embeddings(model, params, state, config.n_query)[1]
        return regress_clip(model, params, state, num_frames)

    return jax.jit(sh.with_logical_rules(run, mesh, rules) if mesh is not None else run)


def _regress(model: Emu2Model, params: PyTree, prompt: Mapping[str, Any], new_positions: int,
             num_frames: int | None, bucket: int, mesh: jax.sharding.Mesh | None, rules: sh.Rules) -> np.ndarray:
    length = text.bucket_length(prompt["tokens"].shape[1], bucket)
    text.check_fits(model.config, length, new_positions)
    fn = _compiled_regression(model.config, length + new_positions, num_frames, mesh, rules)
    return np.asarray(jax.device_get(fn(params, text.pad_prompt(prompt, length))))


def generate_image_embeddings(model: Emu2Model, params: PyTree, prompt: Mapping[str, Any], *,
                              bucket: int = text.BUCKET, mesh: jax.sharding.Mesh | None = None,
                              rules: sh.Rules = sh.LOGICAL_RULES) -> np.ndarray:
    """[B, n_query, Dv] float32 visual embeddings regressed after each (left-padded) prompt row."""
    return _regress(model, params, append_boi(model.config, prompt), model.config.n_query, None, bucket, mesh,
                    rules)


def generate_video_embeddings(model: Emu2Model, params: PyTree, prompt: Mapping[str, Any], num_frames: int, *,
                              bucket: int = text.BUCKET, mesh: jax.sharding.Mesh | None = None,
                              rules: sh.Rules = sh.LOGICAL_RULES) -> np.ndarray:
    """[B, num_frames, v_query, Dv] float32 frame embeddings regressed after each prompt row + `[VIDEO]`."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: must be >= 1")
    new_positions = num_frames * (model.config.v_query + 2)  # [IMG] + embeddings + [/IMG] per frame
    return _regress(model, params, append_token(prompt, model.config.video_token_id), new_positions, num_frames,
                    bucket, mesh, rules)


@dataclasses.dataclass
class ImageGenerator:
    """An LLM (Emu2 / Emu2-Gen) and a visual decoder; `prompt_fn(text, images)` builds a prompt
    batch of one row (emu2_jax.inference.prompts.build_prompt with the model's tokenizer)."""
    llm: Emu2Model
    llm_params: PyTree
    decoder: visual_decoder.VisualDecoderModel
    decoder_params: PyTree
    prompt_fn: Any
    _unconditional: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        llm, dec = self.llm.config, self.decoder.config
        if (llm.n_query, llm.visual_embed_dim) != (dec.n_query, dec.vision.width):
            raise ValueError(f"the LLM regresses {llm.n_query} x {llm.visual_embed_dim} embeddings but the decoder "
                             f"takes {dec.n_query} x {dec.vision.width}")

    def unconditional(self, negative_prompt: str = "") -> np.ndarray:
        """[1, n, Dv]: the regression from `negative_prompt` ('' is `<s>[IMG]`), computed once each."""
        if negative_prompt not in self._unconditional:
            prompt = self.prompt_fn(negative_prompt, [])
            self._unconditional[negative_prompt] = generate_image_embeddings(self.llm, self.llm_params, prompt)
        return self._unconditional[negative_prompt]

    def generate(self, prompt: Mapping[str, Any], rng: jax.Array, *, num_steps: int = 50, guidance_scale: float = 3.0,
                 negative_prompt: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(images [B, D, D, 3] uint8, their regressed embeddings [B, n, Dv]) of a prompt batch."""
        cond = generate_image_embeddings(self.llm, self.llm_params, prompt)
        images = visual_decoder.sample_from_embeddings(
            self.decoder, self.decoder_params, cond, self.unconditional(negative_prompt), rng,
            num_steps=num_steps, guidance_scale=guidance_scale)
        return visual_decoder.to_uint8(jax.device_get(images)), cond

    def autoencode(self, pixels: np.ndarray, rng: jax.Array, *, num_steps: int = 50, guidance_scale: float = 3.0
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8, the conditioning [B, n, Dv]) from normalised encoder images [B, S, S, 3]:
        their own pooled encoding against the zero image's, no LLM (the release's autoencoding mode)."""
        cond, uncond = visual_decoder.autoencoding_condition(self.decoder, self.decoder_params, jnp.asarray(pixels))
        images = visual_decoder.sample_from_embeddings(self.decoder, self.decoder_params, cond, uncond, rng,
                                                       num_steps=num_steps, guidance_scale=guidance_scale)
        return visual_decoder.to_uint8(jax.device_get(images)), np.asarray(cond)
