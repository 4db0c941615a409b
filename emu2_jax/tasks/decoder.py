"""The visual decoder's training task (stage `decoder`, see configs/decoder.py).

The model is emu2_jax.models.visual_decoder. Training is epsilon prediction on the scaled-linear
1000-step schedule with noise offset, and the condition is replaced by the unconditional (zero-image)
embedding for a fraction of the samples so that classifier-free guidance works at sampling time.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from PIL import Image

from emu2_jax import diffusion, metrics
from emu2_jax.data import images as image_lib
from emu2_jax.data import layout, pipeline
from emu2_jax.data import tokenizer as tokenizer_lib
from emu2_jax.models import presets, visual_decoder
from emu2_jax.models import unet as unet_lib
from emu2_jax.models.emu2 import Emu2Config
from emu2_jax.models.eva_vit import VisionConfig
from emu2_jax.models.visual_decoder import UNET_PRESETS, VAE_PRESETS, DecoderModelConfig, VisualDecoderModel, time_ids

PyTree = Any
COMPONENTS = ("visual", "unet", "vae")


def frozen_encoder(config: ml_collections.ConfigDict) -> tuple[Emu2Config, VisionConfig, dict[str, Any]]:
    """(the Emu2 preset `config.model` with the global dtype / remat overrides, its encoder with
    `model_overrides.vision` applied, the dtype and remat settings the decoders' UNet and VAE share)
    of a decoder stage config (image or video)."""
    overrides = {k: v for k, v in config.model_overrides.items() if not isinstance(v, ml_collections.ConfigDict)}
    emu2_cfg = presets.get_config(config.model, **{k: v for k, v in overrides.items()
                                                   if k in ("dtype", "param_dtype", "remat_policy", "attention")})
    vision = emu2_cfg.vision
    if "vision" in config.model_overrides:
        vision = dataclasses.replace(vision, **config.model_overrides.vision.to_dict())
    common = {"dtype": vision.dtype, "param_dtype": vision.param_dtype, "remat_policy": vision.remat_policy}
    return emu2_cfg, vision, common


def model_config(config: ml_collections.ConfigDict) -> DecoderModelConfig:
    """The decoder model of a `decoder` stage config: `model` (an Emu2 preset, for its encoder and
    n_query), `decoder.unet` / `decoder.vae` presets; `model_overrides.dtype` etc. apply to all three."""
    emu2_cfg, vision, common = frozen_encoder(config)
    unet_cfg = UNET_PRESETS[config.decoder.unet](**common)
    unet_cfg = dataclasses.replace(
        unet_cfg, cross_attention_dim=vision.width,
        projection_class_embeddings_input_dim=vision.width + unet_lib.NUM_TIME_IDS * unet_cfg.addition_time_embed_dim)
    return DecoderModelConfig(vision=vision, unet=unet_cfg, vae=VAE_PRESETS[config.decoder.vae](**common),
                              n_query=emu2_cfg.n_query, decoder_image_size=config.data.decoder_image_size)


def denoiser_training_flops(task: Any, abstract_params: PyTree, unet_forward: Callable[[PyTree], Any]) -> float:
    """Matmul + convolution FLOPs of a decoder task's step (`metrics.traced_flops`: scanned blocks
    times their count, no remat): per row, `task.micro_loss`'s forward plus 2x the UNet forward
    (`unet_forward` of one row) for its backward; per microbatch, the unconditional encoding that
    `micro_loss` computes once (the forward is linear in the rows plus that)."""
    rng = jax.random.key(0)
    forward = [metrics.traced_flops(lambda p, b: task.micro_loss(p, b, {"rows": jnp.ones(())}, rng)[0],
                                    abstract_params, task.dummy_batch(rows)) for rows in (1, 2)]
    per_row, per_microbatch = forward[1] - forward[0], 2 * forward[0] - forward[1]
    unet = metrics.traced_flops(unet_forward, abstract_params)
    microbatches = max(1, task.config.grad_accum_steps)
    return task.config.global_batch_size * (per_row + 2 * unet) + microbatches * per_microbatch


def drop_condition(rng: jax.Array, cond: jax.Array, uncond: jax.Array, rate: float) -> tuple[jax.Array, jax.Array]:
    """(cond with each row [B, ...] replaced by uncond [1, ...] with probability `rate`, dropped mask [B])."""
    dropped = jax.random.bernoulli(rng, rate, (cond.shape[0],))
    mask = dropped.reshape((-1,) + (1,) * (cond.ndim - 1))
    return jnp.where(mask, uncond.astype(cond.dtype), cond), dropped


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
    def create(cls, config: ml_collections.ConfigDict) -> DecoderTask:
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
        """`denoiser_training_flops` of one row (encoder, VAE encoder, UNet)."""
        return denoiser_training_flops(self, abstract_params, lambda p: self.model.apply(
            {"params": p}, jnp.zeros((1, *self.model_cfg.latent_shape)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, self.model_cfg.n_query, self.model_cfg.vision.width)), jnp.zeros((1, 6)),
            method=VisualDecoderModel.predict_noise))

    def create_iterator(self, batch_size: int, shard_index: int, shard_count: int):
        config = self.config
        # The decoder data path reads no text; the embedded tokenizer satisfies the interface.
        return pipeline.create_train_iterator(
            config.data, tokenizer=tokenizer_lib.load_tokenizer(config.data.tokenizer_path or None),
            seq_len=1, batch_size=batch_size, image_size=self.model_cfg.vision.image_size,
            n_query=self.model_cfg.n_query, v_query=1, max_images_per_row=1, seed=config.seed,
            shard_index=shard_index, shard_count=shard_count)

    def create_sampler(self, mesh: jax.sharding.Mesh, rules: Any, workdir: str):
        """Reconstructs `num_samples` images (the first batch of a differently seeded data stream) from
        their own encoding: `<workdir>/samples/step_<N>.png`, inputs above reconstructions, and
        TensorBoard `samples/grid`."""
        del mesh, rules
        config, size = self.config, self.model_cfg.decoder_image_size
        it = pipeline.create_train_iterator(
            config.data, tokenizer=tokenizer_lib.load_tokenizer(config.data.tokenizer_path or None),
            seq_len=1, batch_size=config.num_samples, image_size=self.model_cfg.vision.image_size,
            n_query=self.model_cfg.n_query, v_query=1, max_images_per_row=1, seed=config.seed + 1)
        try:
            inputs = next(it)["images"]
        finally:
            it.close()
        out_dir = epath.Path(workdir) / "samples"
        render = jax.jit(lambda p, images, rng: visual_decoder.sample_images(
            self.model, p, images, rng, num_steps=config.decoder.sample_steps,
            guidance_scale=config.decoder.guidance_scale))

        def sample(step: int, params: PyTree, writer: Any) -> None:
            drawn = visual_decoder.to_uint8(jax.device_get(render(params, jnp.asarray(inputs), jax.random.key(step))))
            if jax.process_index() != 0:
                return
            grid = image_lib.image_grid([list(image_lib.denormalize(inputs)), list(drawn)], size)
            out_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(out_dir / f"step_{step}.png")
            if writer is not None:
                writer.images(step, {"samples/grid": grid})

        return sample
