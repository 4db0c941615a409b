"""Emu2's visual decoder as an image autoencoder: the model and its sampler.

The frozen Emu2 visual encoder (EVA-02) reads an image; its patch features mean-pooled to
`n_query` tokens (the embeddings the LLM regresses) condition an SDXL-style UNet (cross-attention
context [B, n, Dv]; `text_embeds` = their mean over tokens; `time_ids` = original_size +
crop_coords + target_size) that denoises latents of a frozen VAE (docs/model.md#visual-decoder).
`sample_images` decodes with Euler sampling and classifier-free guidance against the unconditional
embedding, the encoding of a zero image in normalised space (docs/model.md#image-generation).
Training is emu2_jax.tasks.decoder.

The parameters are `{"visual": ..., "unet": ..., "vae": ...}`; `visual` is laid out like
Emu2Model's, so converted or trained Emu2 encoder weights load with `init_from`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from emu2_jax import diffusion
from emu2_jax.models import unet as unet_lib
from emu2_jax.models import vae as vae_lib
from emu2_jax.models.eva_vit import EvaVisionTransformer, VisionConfig
from emu2_jax.models.projector import mean_pool_patches

PyTree = Any

UNET_PRESETS = {"sdxl_emu2": unet_lib.sdxl_emu2_unet_config, "tiny": unet_lib.tiny_sdxl_unet_config}
VAE_PRESETS = {"sdxl": vae_lib.sdxl_vae_config, "tiny": vae_lib.tiny_vae_config}


@dataclasses.dataclass(frozen=True)
class DecoderModelConfig:
    vision: VisionConfig           # the Emu2 encoder (frozen)
    unet: unet_lib.UNetConfig      # cross_attention_dim = text_embeds dim = vision.width
    vae: vae_lib.VAEConfig
    n_query: int                   # pooled tokens per image (64 for Emu2)
    decoder_image_size: int        # pixels of the generated image (1024 for Emu2)

    def __post_init__(self):
        if self.unet.cross_attention_dim != self.vision.width or self.unet.text_embeds_dim != self.vision.width:
            raise ValueError(f"UNet cross_attention_dim {self.unet.cross_attention_dim} / text_embeds dim "
                             f"{self.unet.text_embeds_dim} must equal the encoder width {self.vision.width}")
        factor = self.vae.downsample_factor * 2 ** (len(self.unet.block_out_channels) - 1)
        if self.decoder_image_size % factor:
            raise ValueError(f"decoder_image_size={self.decoder_image_size} must divide by {factor} (VAE x UNet)")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.decoder_image_size // self.vae.downsample_factor
        return side, side, self.vae.latent_channels


def time_ids(original_size: jax.Array, crop_coords: jax.Array, target_size: jax.Array) -> jax.Array:
    """SDXL micro-conditioning [B, 6] float32."""
    return jnp.concatenate([original_size, crop_coords, target_size], axis=-1).astype(jnp.float32)


class VisualDecoderModel(nn.Module):
    config: DecoderModelConfig

    def setup(self):
        cfg = self.config
        self.visual = EvaVisionTransformer(cfg.vision)
        self.unet = unet_lib.UNet(cfg.unet)
        self.vae = vae_lib.AutoencoderKL(cfg.vae)

    def condition(self, images: jax.Array) -> jax.Array:
        """Normalised encoder images [B, S, S, 3] -> pooled EVA features [B, n_query, Dv]."""
        chex.assert_rank(images, 4)
        return mean_pool_patches(self.visual(images)[:, 1:], self.config.n_query)  # CLS dropped, as Emu2

    def encode_latents(self, target_images: jax.Array, rng: jax.Array) -> jax.Array:
        """Images [B, D, D, 3] in [-1, 1] -> scaled latents (a posterior sample times scaling_factor)."""
        mean, logvar = self.vae.encode(target_images)
        return vae_lib.sample_latents(rng, mean, logvar).astype(jnp.float32) * self.config.vae.scaling_factor

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Scaled latents -> images in [0, 1] (as the Emu2 pipeline: / scaling, decode, x/2 + 0.5, clamp)."""
        images = self.vae.decode(latents / self.config.vae.scaling_factor).astype(jnp.float32)
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    def predict_noise(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array,
                      time_ids: jax.Array) -> jax.Array:
        """eps [B, h, w, C]; `text_embeds` is the mean of the context over its tokens."""
        added = {"text_embeds": context.astype(jnp.float32).mean(axis=1), "time_ids": time_ids}
        return self.unet(latents, timesteps, context, added)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Touches every parameter (for `init`): encoder, VAE round trip, one UNet call."""
        context = self.condition(batch["images"])
        latents = self.vae.encode(batch["target_images"])[0]
        self.vae.decode(latents)
        ids = time_ids(batch["original_size"], batch["crop_coords"], batch["target_size"])
        return self.predict_noise(latents, jnp.zeros(latents.shape[:1], jnp.int32), context, ids)


@functools.lru_cache(maxsize=8)
def _sampling_fns(config: DecoderModelConfig):
    """(noise prediction for diffusion.euler_sample, jitted condition, jitted VAE decode) of a config:
    one function object per config, so repeated sampling reuses the compiled programs."""
    model = VisualDecoderModel(config)

    def predict(params, latents, timesteps, context, added):
        return model.apply({"params": params}, latents, timesteps, context, added["time_ids"],
                           method=VisualDecoderModel.predict_noise)

    condition = jax.jit(lambda params, images: model.apply({"params": params}, images,
                                                           method=VisualDecoderModel.condition))
    decode = jax.jit(lambda params, latents: model.apply({"params": params}, latents,
                                                         method=VisualDecoderModel.decode_latents))
    return predict, condition, decode


def autoencoding_condition(model: VisualDecoderModel, params: PyTree, images: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
    """(cond [B, n, Dv], uncond [1, n, Dv]) of normalised encoder images [B, S, S, 3]: their own
    pooled encoding and the zero image's (docs/model.md#image-generation)."""
    _, condition, _ = _sampling_fns(model.config)
    return condition(params, images), condition(params, jnp.zeros((1, *images.shape[1:]), images.dtype))


def sample_images(model: VisualDecoderModel, params: PyTree, images: jax.Array, rng: jax.Array, *,
                  num_steps: int = 50, guidance_scale: float = 3.0,
                  original_size: tuple[int, int] | None = None) -> jax.Array:
    """Autoencoding: normalised encoder images [B, S, S, 3] -> decoded images [B, D, D, 3] in [0, 1]."""
    cond, uncond = autoencoding_condition(model, params, images)
    return sample_from_embeddings(model, params, cond, uncond, rng, num_steps=num_steps,
                                  guidance_scale=guidance_scale, original_size=original_size)


def sample_from_embeddings(model: VisualDecoderModel, params: PyTree, cond: jax.Array, uncond: jax.Array,
                           rng: jax.Array, *, num_steps: int = 50, guidance_scale: float = 3.0,
                           original_size: tuple[int, int] | None = None) -> jax.Array:
    """Visual embeddings cond [B, n, Dv] (regressed by the LLM or pooled from an image) -> decoded
    images [B, D, D, 3] in [0, 1]: Euler sampling with classifier-free guidance against uncond
    [1 or B, n, Dv], then the VAE. time_ids = original_size (default (D, D)) + (0, 0) + (D, D)."""
    cfg = model.config
    chex.assert_shape(cond, (None, cfg.n_query, cfg.vision.width))
    predict, _, decode = _sampling_fns(cfg)
    d = cfg.decoder_image_size
    batch = cond.shape[0]
    ids = jnp.tile(jnp.asarray([*(original_size or (d, d)), 0, 0, d, d], jnp.float32), (batch, 1))
    latents = diffusion.euler_sample(predict, params, jnp.asarray(cond), jnp.asarray(uncond),
                                     (batch, *cfg.latent_shape), rng, num_steps=num_steps,
                                     guidance_scale=guidance_scale, added_cond={"time_ids": ids})
    return decode(params, latents)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., 3] floats in [0, 1] -> uint8."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)
