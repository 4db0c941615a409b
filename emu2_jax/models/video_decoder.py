"""Emu2's video decoder (the paper's temporal UNet): renders a clip from Emu2's visual embeddings.

The frozen Emu2 encoder reads every frame; its patch features mean-pooled to `v_query` tokens per
frame (what the LLM regresses for video) are mapped to the UNet's cross-attention width by the
learned `cond_proj` (a dense layer plus a learned per-frame embedding, so that tokens say which
frame they come from), then laid out as ONE sequence of F * v_query tokens that every frame's
cross-attention sees (docs/model.md#video-decoder says why). A frozen VAE maps each frame to latents;
`UNet3D` (emu2_jax.models.unet3d, inflated from SD 2.1) denoises all frames at once with
v-prediction. `sample_video` is Euler sampling with classifier-free guidance against the
zero-clip embedding. Training is emu2_jax.tasks.video_decoder.

Parameters: `{"visual", "cond_proj", "unet", "vae"}`; `visual` is laid out like Emu2Model's.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from emu2_jax import diffusion
from emu2_jax import sharding as sh
from emu2_jax.models import layers
from emu2_jax.models import unet3d as unet3d_lib
from emu2_jax.models import vae as vae_lib
from emu2_jax.models.eva_vit import EvaVisionTransformer, VisionConfig
from emu2_jax.models.projector import mean_pool_patches

PyTree = Any

UNET3D_PRESETS = {"sd21": unet3d_lib.sd21_unet3d_config, "tiny": unet3d_lib.tiny_unet3d_config}


def sd21_vae_config(**overrides: Any) -> vae_lib.VAEConfig:
    """SD 2.1's VAE: the SDXL architecture with SD's latent scaling 0.18215."""
    return vae_lib.sdxl_vae_config(**{"scaling_factor": 0.18215, **overrides})


VAE_PRESETS = {"sd21": sd21_vae_config, "tiny": vae_lib.tiny_vae_config}


@dataclasses.dataclass(frozen=True)
class VideoDecoderModelConfig:
    vision: VisionConfig            # the Emu2 encoder (frozen)
    unet: unet3d_lib.UNet3DConfig
    vae: vae_lib.VAEConfig          # frozen, applied per frame
    v_query: int                    # pooled tokens per frame (64 for Emu2)
    num_frames: int
    decoder_image_size: int         # pixels of each generated frame

    def __post_init__(self):
        factor = self.vae.downsample_factor * 2 ** (len(self.unet.unet.block_out_channels) - 1)
        if self.decoder_image_size % factor:
            raise ValueError(f"decoder_image_size={self.decoder_image_size} must divide by {factor} (VAE x UNet)")
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames} must be >= 1")
        if self.unet.temporal_positions and self.num_frames > self.unet.temporal_positions:
            raise ValueError(f"num_frames={self.num_frames} exceeds temporal_positions={self.unet.temporal_positions}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        side = self.decoder_image_size // self.vae.downsample_factor
        return self.num_frames, side, side, self.vae.latent_channels


class ConditionProjection(nn.Module):
    """Per-frame embeddings [B, F, Q, Dv] -> one context sequence [B, F*Q, D] shared by all frames."""
    width: int
    num_frames: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        b, f, q, _ = features.shape
        if f != self.num_frames:
            raise ValueError(f"condition has {f} frames; the model was built for {self.num_frames}")
        h = layers.dense(self.width, (sh.VISION_EMBED, sh.EMBED), use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="proj")(features.astype(self.dtype))
        frame = self.param("frame_embed", layers.partitioned(nn.initializers.normal(0.02), (sh.POSITIONS, sh.EMBED)),
                           (self.num_frames, self.width), self.param_dtype)
        h = h + frame[None, :, None, :].astype(h.dtype)
        return nn.with_logical_constraint(h.reshape(b, f * q, self.width), (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))


class VideoDecoderModel(nn.Module):
    config: VideoDecoderModelConfig

    def setup(self):
        cfg = self.config
        self.visual = EvaVisionTransformer(cfg.vision)
        self.cond_proj = ConditionProjection(cfg.unet.unet.cross_attention_dim, cfg.num_frames,
                                             dtype=cfg.unet.unet.dtype, param_dtype=cfg.unet.unet.param_dtype)
        self.unet = unet3d_lib.UNet3D(cfg.unet)
        self.vae = vae_lib.AutoencoderKL(cfg.vae)

    def condition(self, frames: jax.Array) -> jax.Array:
        """Normalised encoder frames [B, F, S, S, 3] -> pooled EVA features [B, F, v_query, Dv]."""
        chex.assert_rank(frames, 5)
        b, f = frames.shape[:2]
        feats = mean_pool_patches(self.visual(frames.reshape(b * f, *frames.shape[2:]))[:, 1:], self.config.v_query)
        return feats.reshape(b, f, *feats.shape[1:])

    def project(self, features: jax.Array) -> jax.Array:
        return self.cond_proj(features)

    def encode_latents(self, target_frames: jax.Array, rng: jax.Array) -> jax.Array:
        """Frames [B, F, D, D, 3] in [-1, 1] -> scaled latents [B, F, h, w, C] (per-frame VAE)."""
        b, f = target_frames.shape[:2]
        mean, logvar = self.vae.encode(target_frames.reshape(b * f, *target_frames.shape[2:]))
        latents = vae_lib.sample_latents(rng, mean, logvar).astype(jnp.float32) * self.config.vae.scaling_factor
        return latents.reshape(b, f, *latents.shape[1:])

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Scaled latents [B, F, h, w, C] -> frames [B, F, D, D, 3] in [0, 1]."""
        b, f = latents.shape[:2]
        images = self.vae.decode(latents.reshape(b * f, *latents.shape[2:]) / self.config.vae.scaling_factor)
        return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0).reshape(b, f, *images.shape[1:])

    def predict(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        """The UNet's v-prediction [B, F, h, w, C]."""
        return self.unet(latents, timesteps, context)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Touches every parameter (for `init`): encoder, projection, VAE round trip, one UNet call."""
        context = self.project(self.condition(batch["frames"]))
        frames = batch["target_frames"]
        b, f = frames.shape[:2]
        latents = self.vae.encode(frames.reshape(b * f, *frames.shape[2:]))[0]
        self.vae.decode(latents)
        latents = latents.reshape(b, f, *latents.shape[1:])
        return self.predict(latents, jnp.zeros((b,), jnp.int32), context)


def unconditional_features(model: VideoDecoderModel, params: PyTree) -> jax.Array:
    """The features of an all-zero clip [1, F, Q, Dv] (the CFG / condition-dropout null condition):
    one zero frame through the encoder, repeated (every frame's encoding is the same)."""
    cfg = model.config
    zero = jnp.zeros((1, 1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
    feats = model.apply({"params": params}, zero, method=VideoDecoderModel.condition)
    return jnp.repeat(feats, cfg.num_frames, axis=1)


def sample_video(model: VideoDecoderModel, params: PyTree, rng: jax.Array, *, frames: jax.Array | None = None,
                 features: jax.Array | None = None, num_steps: int = 50, guidance_scale: float = 3.0) -> jax.Array:
    """Clips from normalised encoder frames [B, F, S, S, 3] (their own encoding) or from `features`
    [B, F, Q, Dv] (e.g. regressed by the LLM) -> decoded frames [B, F, D, D, 3] in [0, 1]. Euler
    sampling of all frames at once, v-prediction, CFG against the zero-clip encoding."""
    if (frames is None) == (features is None):
        raise ValueError("sample_video takes frames or features, not both and not neither")
    variables = {"params": params}
    if features is None:
        features = model.apply(variables, frames, method=VideoDecoderModel.condition)
    chex.assert_shape(features, (None, model.config.num_frames, model.config.v_query, model.config.vision.width))
    cond = model.apply(variables, features, method=VideoDecoderModel.project)
    uncond = model.apply(variables, unconditional_features(model, params), method=VideoDecoderModel.project)

    def apply_fn(p, latents, timesteps, context, added):
        del added
        return model.apply({"params": p}, latents, timesteps, context, method=VideoDecoderModel.predict)

    latents = diffusion.euler_sample(apply_fn, params, cond, uncond, (features.shape[0], *model.config.latent_shape),
                                     rng, num_steps=num_steps, guidance_scale=guidance_scale,
                                     config=diffusion.ScheduleConfig(prediction_type="v_prediction"))
    return model.apply(variables, latents, method=VideoDecoderModel.decode_latents)
