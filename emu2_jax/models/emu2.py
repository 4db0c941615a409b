"""The Emu2 model: visual encoder -> connector -> LLaMA decoder -> text logits and regressed
visual embeddings, plus its two losses.

Batch layout (see `emu2_jax.data`): `tokens`, `targets`, `text_loss_mask`, `image_loss_mask`,
`segment_ids`, `positions` of shape [B, L]; `images` uint8 pixel rows [B, N, H, W * 3] (CLIP-normalised
on device by `pixel_rows_to_images`) with `image_valid` and `image_is_frame` [B, N]. Each valid still
image fills, in order, `n_query` `<image>` placeholder positions of its row; each video frame fills
`v_query` `[gIMG]` positions.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.data.images import CLIP_MEAN, CLIP_STD
from emu2_jax.models import layers
from emu2_jax.models.causal_transformer import CausalTransformerConfig, CausalTransformerConnector
from emu2_jax.models.eva_vit import EvaVisionTransformer, VisionConfig
from emu2_jax.models.llama import LlamaConfig, LlamaDecoder
from emu2_jax.models.projector import MeanPoolProjector

# Top-level parameter collections; training selects frozen / trainable components by these names.
COMPONENTS = ("visual", "connector", "llm", "project_down")


@dataclasses.dataclass(frozen=True)
class Emu2Config:
    vision: VisionConfig
    llm: LlamaConfig
    connector: str = "mean_pool"      # "mean_pool" (Emu2) or "causal_transformer" (Emu v1)
    causal_transformer: CausalTransformerConfig | None = None
    n_query: int = 64                 # visual tokens per still image
    v_query: int = 64                 # visual tokens per video frame
    image_token_id: int = 32003       # `<image>`
    frame_token_id: int = 32004       # `[gIMG]`

    def __post_init__(self):
        if self.connector not in ("mean_pool", "causal_transformer"):
            raise ValueError(f"connector={self.connector!r}; expected 'mean_pool' or 'causal_transformer'")
        if self.connector == "causal_transformer" and self.causal_transformer is None:
            raise ValueError("connector='causal_transformer' needs a causal_transformer config")

    @property
    def boi_token_id(self) -> int:
        """`[IMG]`: the added tokens are [PAD], [IMG], [/IMG], <image>, ... in the checkpoint's order."""
        return self.image_token_id - 2

    @property
    def eoi_token_id(self) -> int:
        """`[/IMG]`."""
        return self.image_token_id - 1

    @property
    def video_token_id(self) -> int:
        """`[VIDEO]`: after <image> come [gIMG], [/gIMG], [EOC], [VIDEO]."""
        return self.image_token_id + 4

    @property
    def visual_embed_dim(self) -> int:
        """Width of the regressed visual embeddings: the connector's output before project_up, or
        after it for the released Emu v1 (`causal_transformer.output="llm"`: the LLM width)."""
        if self.connector == "causal_transformer":
            ct = self.causal_transformer
            return self.llm.hidden_size if ct.output == "llm" else ct.width
        return self.vision.width


@chex.dataclass
class Emu2Output:
    text_logits: jax.Array     # [B, L, V] float32
    visual_pred: jax.Array     # [B, L, Dv] regressed embedding of the element after each position
    visual_target: jax.Array   # [B, L, Dv] the embedding actually at position p+1 (zeros if none)


def _compact_valid(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Moves the valid rows of values [B, M, D] (valid [B, M]) to the front, keeping their order."""
    order = jnp.argsort(~valid, axis=1, stable=True)
    return jnp.take_along_axis(values, order[..., None], axis=1)


def _scatter_into_placeholders(embeds: jax.Array, is_placeholder: jax.Array, values: jax.Array) -> jax.Array:
    """Writes values [B, M, D] in order into the True positions of is_placeholder [B, L] of embeds [B, L, D]."""
    index = jnp.clip(jnp.cumsum(is_placeholder, axis=1) - 1, 0, max(values.shape[1] - 1, 0))
    gathered = jnp.take_along_axis(values, index[..., None], axis=1)
    return jnp.where(is_placeholder[..., None], gathered.astype(embeds.dtype), embeds)


def pixel_rows_to_images(rows: jax.Array) -> jax.Array:
    """uint8 pixel rows [..., H, W * 3] -> float32 CLIP-normalised images [..., H, W, 3]: the float32
    math of the host's `images.normalize`, which XLA computes within 1e-6 of it (it turns divisions by
    constants into multiplications by their reciprocals). Normalised while W * 3 is still the minor
    dimension (the channel statistics tiled along it), which XLA:TPU lays out densely; the reshape
    to [..., W, 3] comes last, feeding the patch embedding."""
    width = rows.shape[-1] // 3
    mean, std = jnp.tile(jnp.asarray(CLIP_MEAN), width), jnp.tile(jnp.asarray(CLIP_STD), width)
    normalised = (rows.astype(jnp.float32) / 255.0 - mean) / std
    return normalised.reshape(*rows.shape[:-1], width, 3)


class Emu2Model(nn.Module):
    config: Emu2Config

    def setup(self):
        cfg = self.config
        self.visual = EvaVisionTransformer(cfg.vision)
        if cfg.connector == "mean_pool":
            self.connector = MeanPoolProjector(cfg.llm.hidden_size, dtype=cfg.llm.dtype,
                                               param_dtype=cfg.llm.param_dtype)
        else:
            self.connector = CausalTransformerConnector(cfg.causal_transformer, cfg.llm.hidden_size)
        self.llm = LlamaDecoder(cfg.llm)
        self.project_down = layers.dense(cfg.visual_embed_dim, (sh.EMBED, sh.VISION_EMBED), dtype=cfg.llm.dtype,
                                         param_dtype=cfg.llm.param_dtype)

    def visual_tokens(self, images: jax.Array) -> jax.Array:
        """images [M, H, W, 3] -> the encoder tokens the connector reads [M, T, Dv]."""
        chex.assert_rank(images, 4)
        tokens = self.visual(images)
        ct = self.config.causal_transformer
        if not (self.config.connector == "causal_transformer" and ct.include_cls):
            tokens = tokens[:, 1:]  # drop CLS: the connector reads patch tokens only
        return tokens

    def encode_images(self, images: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
        """images [M, H, W, 3] -> (visual embeddings [M, n, Dv], LLM-width embeddings [M, n, D])."""
        return self.connector(self.visual_tokens(images), num_tokens)

    def embed_inputs(self, tokens: jax.Array, images: jax.Array, image_valid: jax.Array,
                     image_is_frame: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Text embeddings with visual embeddings written into the placeholder positions; `images`
        are the batch's uint8 pixel rows [B, N, H, W * 3] (docs/batch.md).

        Returns (inputs_embeds [B, L, D], visual_at [B, L, Dv]: the visual embedding at each
        placeholder position, zeros elsewhere; the regression targets come from it).
        """
        cfg = self.config
        chex.assert_rank(tokens, 2)
        wanted = "images must be uint8 pixel rows [B, N, H, W * 3] (images.to_pixel_rows)"
        chex.assert_rank(images, 4, custom_message=wanted)
        chex.assert_type(images, jnp.uint8, custom_message=wanted)
        chex.assert_axis_dimension(images, 3, 3 * images.shape[2], custom_message=wanted)
        embeds = self.llm.embed(tokens)
        batch, length = tokens.shape
        visual_at = jnp.zeros((batch, length, cfg.visual_embed_dim), jnp.float32)
        if images.shape[1] == 0:
            return embeds, visual_at
        chex.assert_equal_shape_prefix((tokens, images, image_valid, image_is_frame), 1)
        num_slots = images.shape[1]
        flat = pixel_rows_to_images(images.reshape(batch * num_slots, *images.shape[2:]))
        kinds = [(cfg.image_token_id, cfg.n_query, image_valid & ~image_is_frame),
                 (cfg.frame_token_id, cfg.v_query, image_valid & image_is_frame)]
        # The encoder runs once; stills and frames differ only in how its tokens are pooled (Emu2-Chat:
        # 16x16 vs 8x8), so each pooling of every slot is computed and the kind's slots are kept.
        visual_tokens = self.visual_tokens(flat)
        encoded = {}
        for token_id, num_tokens, slot_valid in kinds:
            if num_tokens not in encoded:
                encoded[num_tokens] = self.connector(visual_tokens, num_tokens)
            visual, projected = encoded[num_tokens]
            token_valid = jnp.repeat(slot_valid, num_tokens, axis=1)
            visual = _compact_valid(visual.reshape(batch, num_slots * num_tokens, -1), token_valid)
            projected = _compact_valid(projected.reshape(batch, num_slots * num_tokens, -1), token_valid)
            is_placeholder = tokens == token_id
            embeds = _scatter_into_placeholders(embeds, is_placeholder, projected)
            visual_at = _scatter_into_placeholders(visual_at, is_placeholder, visual.astype(jnp.float32))
        embeds = nn.with_logical_constraint(embeds, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))
        return embeds, visual_at

    def _trunk(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(final-norm hidden states [B, L, D], visual targets [B, L, Dv])."""
        embeds, visual_at = self.embed_inputs(batch["tokens"], batch["images"], batch["image_valid"],
                                              batch["image_is_frame"])
        hidden = self.llm(embeds, batch["positions"], batch["segment_ids"])
        # The output at p regresses the element at p+1; targets never carry gradient into the encoder.
        return hidden, jax.lax.stop_gradient(jnp.pad(visual_at[:, 1:], ((0, 0), (0, 1), (0, 0))))

    def __call__(self, batch: Mapping[str, jax.Array]) -> Emu2Output:
        hidden, visual_target = self._trunk(batch)
        return Emu2Output(
            text_logits=self.llm.logits(hidden),
            visual_pred=self.project_down(hidden).astype(jnp.float32),
            visual_target=visual_target,
        )

    def losses(self, batch: Mapping[str, jax.Array], *, text_weight: float = 1.0, image_weight: float = 1.0,
               text_loss_chunk: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`compute_losses` of the batch; with `text_loss_chunk` > 0 the text cross-entropy takes the
        logits `text_loss_chunk` positions at a time (recomputed in the backward pass), so the
        [B, L, V] float32 logits never exist at once."""
        if not text_loss_chunk:
            return compute_losses(self(batch), batch, text_weight=text_weight, image_weight=image_weight)
        hidden, visual_target = self._trunk(batch)
        kernel = self.llm.lm_head.variables["params"]["kernel"]
        nll, correct = chunked_nll_and_correct(hidden, kernel, batch["targets"], chunk=text_loss_chunk,
                                               dtype=self.config.llm.dtype)
        return _losses(nll, correct, self.project_down(hidden).astype(jnp.float32), visual_target, batch,
                       text_weight, image_weight)

    def project_visual(self, visual: jax.Array) -> jax.Array:
        """Visual embeddings [..., Dv] -> LLM input embeddings [..., D]: the connector's `project_up`
        (what fills the placeholders; image generation feeds its own predictions back through it).
        The released Emu v1 regresses LLM-width embeddings, which go back in unchanged."""
        dtype = self.config.llm.dtype
        if self.config.connector == "causal_transformer" and self.config.causal_transformer.output == "llm":
            return visual.astype(dtype)
        kernel = self.connector.variables["params"]["project_up"]["kernel"]
        return jnp.einsum("...v,vd->...d", visual.astype(dtype), kernel.astype(dtype))

    def decode_step(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                    cache: dict[str, Any]) -> tuple[tuple[jax.Array, jax.Array], dict[str, Any]]:
        """One KV-cached LLM call (prefill or step): ((text logits [B, V], regressed embedding [B, Dv])
        at the last position, the updated cache). Only the last position's outputs are computed:
        generation reads nothing else, and a prefill's [B, L, V] logits would dominate its cost."""
        hidden, cache = self.llm.decode(inputs_embeds, positions, segment_ids, cache)
        last = hidden[:, -1:]
        return (self.llm.logits(last)[:, 0], self.project_down(last)[:, 0].astype(jnp.float32)), cache


def compute_losses(outputs: Emu2Output, batch: Mapping[str, jax.Array], *, text_weight: float = 1.0,
                   image_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy and next-visual-embedding MSE, separately weighted.

    Each loss is a mean over its supervised positions (the MSE also over feature channels);
    a batch without supervised positions of a kind contributes 0 for it.
    """
    logits = outputs.text_logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return _losses(nll, correct, outputs.visual_pred, outputs.visual_target, batch, text_weight, image_weight)


def chunked_nll_and_correct(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, chunk: int,
                            dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Next-token negative log-likelihood and argmax correctness [B, L] from hidden states [B, L, D]
    and the lm_head kernel [D, V], `chunk` positions at a time under `jax.checkpoint`: the backward
    pass recomputes each chunk's logits instead of keeping [B, L, V] float32 of them."""
    batch, length, _ = hidden.shape
    padded = -(-length // chunk) * chunk
    pad = ((0, 0), (0, padded - length))
    pieces = lambda x: jnp.moveaxis(x.reshape(batch, padded // chunk, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def piece(inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h, t = inputs
        logits = jnp.einsum("bld,dv->blv", h.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)
        logits = nn.with_logical_constraint(logits, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_VOCAB))
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked, (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)

    nll, correct = jax.lax.map(piece, (pieces(jnp.pad(hidden, (*pad, (0, 0)))),
                                       pieces(jnp.pad(targets.astype(jnp.int32), pad))))
    unpiece = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, padded)[:, :length]
    return unpiece(nll), unpiece(correct)


def _losses(nll: jax.Array, correct: jax.Array, visual_pred: jax.Array, visual_target: jax.Array,
            batch: Mapping[str, jax.Array], text_weight: float, image_weight: float
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The masked means of `compute_losses` from per-position text NLL / correctness [B, L]."""
    text_mask = batch["text_loss_mask"].astype(jnp.float32)
    image_mask = batch["image_loss_mask"].astype(jnp.float32)
    chex.assert_equal_shape((text_mask, image_mask, batch["targets"], nll, correct))
    text_count = text_mask.sum()
    text_loss = (nll * text_mask).sum() / jnp.maximum(text_count, 1.0)
    text_accuracy = (correct * text_mask).sum() / jnp.maximum(text_count, 1.0)

    squared = jnp.mean(jnp.square(visual_pred - visual_target), axis=-1)
    image_count = image_mask.sum()
    image_loss = (squared * image_mask).sum() / jnp.maximum(image_count, 1.0)

    total = text_weight * text_loss + image_weight * image_loss
    metrics = {
        "loss": total,
        "text_loss": text_loss,
        "image_loss": image_loss,
        "text_accuracy": text_accuracy,
        "text_tokens": text_count,
        "image_tokens": image_count,
    }
    return total, metrics
