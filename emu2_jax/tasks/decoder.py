"""Emu2's visual decoder as an image autoencoder: the model, its training loss and its sampler.

The frozen Emu2 visual encoder (EVA-02) reads an image; its patch features mean-pooled to
`n_query` tokens (the embeddings the LLM regresses, SPEC.md §2) condition an SDXL-style UNet
(cross-attention context [B, n, Dv]; `text_embeds` = their mean over tokens; `time_ids` =
original_size + crop_coords + target_size) that denoises latents of a frozen VAE (SPEC.md §5, §8).
Training (stage `decoder`, see configs/decoder.py) is epsilon prediction on the scaled-linear
1000-step schedule with noise offset, and the condition is replaced by the unconditional embedding
(the encoding of a zero image in normalised space, SPEC.md §4) for a fraction of the samples so
that classifier-free guidance works at sampling time.

The parameters are `{"visual": ..., "unet": ..., "vae": ...}`; `visual` is laid out like
Emu2Model's, so converted or trained Emu2 encoder weights load with `init_from`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from emu2_jax import diffusion
from emu2_jax.data import layout, pipeline, tokenizer as tokenizer_lib
from emu2_jax.models import presets, unet as unet_lib, vae as vae_lib
from emu2_jax.models.eva_vit import EvaVisionTransformer, VisionConfig
from emu2_jax.models.projector import mean_pool_patches

PyTree = Any
COMPONENTS = ("visual", "unet", "vae")

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


def model_config(config: ml_collections.ConfigDict) -> DecoderModelConfig:
    """The decoder model of a `decoder` stage config: `model` (an Emu2 preset, for its encoder and
    n_query), `decoder.unet` / `decoder.vae` presets; `model_overrides.dtype` etc. apply to all three."""
    overrides = {k: v for k, v in config.model_overrides.items() if not isinstance(v, ml_collections.ConfigDict)}
    emu2_cfg = presets.get_config(config.model, **{k: v for k, v in overrides.items()
                                                   if k in ("dtype", "param_dtype", "remat_policy")})
    vision = emu2_cfg.vision
    if "vision" in config.model_overrides:
        vision = dataclasses.replace(vision, **config.model_overrides.vision.to_dict())
    common = dict(dtype=vision.dtype, param_dtype=vision.param_dtype, remat_policy=vision.remat_policy)
    unet_cfg = UNET_PRESETS[config.decoder.unet](**common)
    unet_cfg = dataclasses.replace(
        unet_cfg, cross_attention_dim=vision.width,
        projection_class_embeddings_input_dim=vision.width + unet_lib.NUM_TIME_IDS * unet_cfg.addition_time_embed_dim)
    return DecoderModelConfig(vision=vision, unet=unet_cfg, vae=VAE_PRESETS[config.decoder.vae](**common),
                              n_query=emu2_cfg.n_query, decoder_image_size=config.data.decoder_image_size)


def time_ids(original_size: jax.Array, crop_coords: jax.Array, target_size: jax.Array) -> jax.Array:
    """SDXL micro-conditioning [B, 6] float32."""
    return jnp.concatenate([original_size, crop_coords, target_size], axis=-1).astype(jnp.float32)


def drop_condition(rng: jax.Array, cond: jax.Array, uncond: jax.Array, rate: float) -> tuple[jax.Array, jax.Array]:
    """(cond with each row [B, ...] replaced by uncond [1, ...] with probability `rate`, dropped mask [B])."""
    dropped = jax.random.bernoulli(rng, rate, (cond.shape[0],))
    mask = dropped.reshape((-1,) + (1,) * (cond.ndim - 1))
    return jnp.where(mask, uncond.astype(cond.dtype), cond), dropped


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


@dataclasses.dataclass(frozen=True)
class DecoderTask:
    """What the training loop (emu2_jax.train) needs of the `decoder` stage."""
    config: ml_collections.ConfigDict
    model_cfg: DecoderModelConfig
    model: VisualDecoderModel
    components = COMPONENTS
    lora = False
    batch_layout = layout.DECODER
    metric_names = ("denoise_loss", "cond_dropped")

    @classmethod
    def create(cls, config: ml_collections.ConfigDict) -> "DecoderTask":
        model_cfg = model_config(config)
        return cls(config=config, model_cfg=model_cfg, model=VisualDecoderModel(model_cfg))

    def dummy_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        return layout.abstract(layout.DECODER, rows=rows, image_size=self.model_cfg.vision.image_size,
                               decoder_size=self.model_cfg.decoder_image_size)

    def loss_normalizers(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return {"rows": jnp.asarray(batch["images"].shape[0] * batch["images"].shape[1], jnp.float32)}

    def micro_loss(self, params: PyTree, micro: Mapping[str, jax.Array], normalizers: Mapping[str, jax.Array],
                   rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Epsilon-prediction MSE of one microbatch, weighted by its share of the batch's rows."""
        cfg, variables = self.config.decoder, {"params": params}
        rng_drop, rng_latent, rng_noise = jax.random.split(rng, 3)
        apply = self.model.apply
        # The frozen encoder and VAE get no gradient (only the UNet is differentiated).
        context = apply(variables, micro["images"], method=VisualDecoderModel.condition)
        uncond = apply(variables, jnp.zeros((1, *micro["images"].shape[1:]), micro["images"].dtype),
                       method=VisualDecoderModel.condition)
        context, dropped = drop_condition(rng_drop, context, uncond, cfg.condition_dropout)
        latents = apply(variables, micro["target_images"], rng_latent, method=VisualDecoderModel.encode_latents)
        noisy, timesteps, noise = diffusion.diffusion_training_inputs(rng_noise, latents, cfg.noise_offset)
        ids = time_ids(micro["original_size"], micro["crop_coords"], micro["target_size"])
        eps = apply(variables, noisy, timesteps, context, ids, method=VisualDecoderModel.predict_noise)
        mse = jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))
        share = micro["images"].shape[0] / normalizers["rows"]
        return mse * share, {"denoise_loss": mse * share, "cond_dropped": dropped.mean() * share}

    def counts(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        rows = batch["images"].shape[0] * batch["images"].shape[1]
        return {"tokens": jnp.zeros((), jnp.float32), "images": jnp.asarray(rows, jnp.float32)}

    def training_flops(self, abstract_params: PyTree) -> float:
        """XLA's FLOP count of one row's forward (encoder x2 for the unconditional embedding, VAE
        encoder, UNet), plus 2x the UNet forward for its backward, times the global batch."""
        rows = self.config.global_batch_size
        batch = self.dummy_batch(1)
        rng = jax.random.key(0)
        forward = jax.jit(lambda p, b: self.micro_loss(p, b, {"rows": jnp.ones(())}, rng)[0])
        unet = jax.jit(lambda p, b: self.model.apply(
            {"params": p}, jnp.zeros((1, *self.model_cfg.latent_shape)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, self.model_cfg.n_query, self.model_cfg.vision.width)), jnp.zeros((1, 6)),
            method=VisualDecoderModel.predict_noise))

        def count(fn) -> float:
            cost = fn.lower(abstract_params, batch).cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return float((cost or {}).get("flops", 0.0))

        return rows * (count(forward) + 2 * count(unet))

    def create_iterator(self, batch_size: int, shard_index: int, shard_count: int):
        config = self.config
        # The decoder data path reads no text; the embedded tokenizer satisfies the interface.
        return pipeline.create_train_iterator(
            config.data, tokenizer=tokenizer_lib.load_tokenizer(config.data.tokenizer_path or None),
            seq_len=1, batch_size=batch_size, image_size=self.model_cfg.vision.image_size,
            n_query=self.model_cfg.n_query, v_query=1, max_images_per_row=1, seed=config.seed,
            shard_index=shard_index, shard_count=shard_count)

    def create_sampler(self, mesh: jax.sharding.Mesh, rules: Any, workdir: str) -> None:
        """None: no samples during training; decode images of a checkpoint with emu2_jax.autoencode."""
        del mesh, rules, workdir
        return None


def sample_images(model: VisualDecoderModel, params: PyTree, images: jax.Array, rng: jax.Array, *,
                  num_steps: int = 50, guidance_scale: float = 3.0,
                  original_size: tuple[int, int] | None = None) -> jax.Array:
    """Autoencoding: normalised encoder images [B, S, S, 3] -> decoded images [B, D, D, 3] in [0, 1].

    Euler sampling with classifier-free guidance against the zero-image encoding (SPEC.md §4, §5);
    time_ids = original_size (default (D, D)) + (0, 0) + (D, D).
    """
    cfg = model.config
    d = cfg.decoder_image_size
    variables = {"params": params}
    cond = model.apply(variables, images, method=VisualDecoderModel.condition)
    uncond = model.apply(variables, jnp.zeros((1, *images.shape[1:]), images.dtype),
                         method=VisualDecoderModel.condition)
    batch = images.shape[0]
    ids = jnp.tile(jnp.asarray([*(original_size or (d, d)), 0, 0, d, d], jnp.float32), (batch, 1))

    def apply_fn(p, latents, timesteps, context, added):
        return model.apply({"params": p}, latents, timesteps, context, added["time_ids"],
                           method=VisualDecoderModel.predict_noise)

    latents = diffusion.euler_sample(apply_fn, params, cond, uncond, (batch, *cfg.latent_shape), rng,
                                     num_steps=num_steps, guidance_scale=guidance_scale,
                                     added_cond={"time_ids": ids})
    return model.apply(variables, latents, method=VisualDecoderModel.decode_latents)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., 3] floats in [0, 1] -> uint8."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)
