"""The video decoder's training task (stage `video_decoder`, see configs/video_decoder.py).

The model is emu2_jax.models.video_decoder. Training follows SD 2.1: v-prediction on the
scaled-linear 1000-step schedule; the condition is replaced by the zero-clip embedding for
`condition_dropout` of the clips so that classifier-free guidance works at sampling time. The
encoder and VAE are frozen; the UNet and the condition projection train. Samples: every
`sample_every_steps`, clips of the first batch are rendered from their own encoding and written
as animated GIFs into `<workdir>/samples/` and as frame strips into TensorBoard.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from emu2_jax import diffusion, metrics, video_io
from emu2_jax.data import layout, pipeline
from emu2_jax.data import tokenizer as tokenizer_lib
from emu2_jax.models.video_decoder import (
    UNET3D_PRESETS,
    VAE_PRESETS,
    VideoDecoderModel,
    VideoDecoderModelConfig,
    sample_video,
    unconditional_features,
)
from emu2_jax.tasks.decoder import denoiser_training_flops, drop_condition, frozen_encoder

PyTree = Any
COMPONENTS = ("visual", "cond_proj", "unet", "vae")
SCHEDULE = diffusion.ScheduleConfig(prediction_type="v_prediction")  # SD 2.1


def model_config(config: ml_collections.ConfigDict) -> VideoDecoderModelConfig:
    """`model` (an Emu2 preset: encoder and v_query), `video_decoder.unet` / `.vae` presets, the
    clip length `data.video_frames` and frame side `data.decoder_image_size`."""
    emu2_cfg, vision, common = frozen_encoder(config)
    return VideoDecoderModelConfig(
        vision=vision, unet=UNET3D_PRESETS[config.video_decoder.unet](**common),
        vae=VAE_PRESETS[config.video_decoder.vae](**{k: v for k, v in common.items() if k != "remat_policy"}),
        v_query=emu2_cfg.v_query, num_frames=config.data.video_frames,
        decoder_image_size=config.data.decoder_image_size)


@dataclasses.dataclass(frozen=True)
class VideoDecoderTask:
    """What the training loop (emu2_jax.train) needs of the `video_decoder` stage."""
    config: ml_collections.ConfigDict
    model_cfg: VideoDecoderModelConfig
    model: VideoDecoderModel
    components = COMPONENTS
    lora = False
    batch_layout = layout.VIDEO_DECODER
    metric_names = ("denoise_loss", "cond_dropped")

    @classmethod
    def create(cls, config: ml_collections.ConfigDict) -> VideoDecoderTask:
        model_cfg = model_config(config)
        return cls(config=config, model_cfg=model_cfg, model=VideoDecoderModel(model_cfg))

    def dummy_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        return layout.abstract(layout.VIDEO_DECODER, rows=rows, frames=self.model_cfg.num_frames,
                               image_size=self.model_cfg.vision.image_size,
                               decoder_size=self.model_cfg.decoder_image_size)

    def loss_normalizers(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return {"rows": jnp.asarray(batch["frames"].shape[0] * batch["frames"].shape[1], jnp.float32)}

    def micro_loss(self, params: PyTree, micro: Mapping[str, jax.Array], normalizers: Mapping[str, jax.Array],
                   rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """v-prediction MSE over all frames of one microbatch, weighted by its share of the batch's clips."""
        cfg, variables = self.config.video_decoder, {"params": params}
        rng_drop, rng_latent, rng_noise = jax.random.split(rng, 3)
        apply = self.model.apply
        frames = micro["frames"]
        features = jax.lax.stop_gradient(apply(variables, frames, method=VideoDecoderModel.condition))
        uncond = jax.lax.stop_gradient(unconditional_features(self.model, params))
        features, dropped = drop_condition(rng_drop, features, uncond, cfg.condition_dropout)
        context = apply(variables, features, method=VideoDecoderModel.project)
        latents = jax.lax.stop_gradient(
            apply(variables, micro["target_frames"], rng_latent, method=VideoDecoderModel.encode_latents))
        noisy, timesteps, target = diffusion.diffusion_training_inputs(rng_noise, latents, config=SCHEDULE)
        pred = apply(variables, noisy, timesteps, context, method=VideoDecoderModel.predict)
        mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
        share = frames.shape[0] / normalizers["rows"]
        return mse * share, {"denoise_loss": mse * share, "cond_dropped": dropped.mean() * share}

    def counts(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        frames = batch["frames"].shape[0] * batch["frames"].shape[1]
        return {"tokens": jnp.zeros((), jnp.float32), "images": jnp.asarray(frames, jnp.float32)}

    def training_flops(self, abstract_params: PyTree) -> float:
        """`decoder.denoiser_training_flops` of one clip (encoder, VAE encoder, projection, UNet)."""
        d = self.model_cfg.unet.unet.cross_attention_dim
        return denoiser_training_flops(self, abstract_params, lambda p: self.model.apply(
            {"params": p}, jnp.zeros((1, *self.model_cfg.latent_shape)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, self.model_cfg.num_frames * self.model_cfg.v_query, d)), method=VideoDecoderModel.predict))

    def _iterator(self, batch_size: int, shard_index: int, shard_count: int, seed: int):
        # The video data path reads no text; the embedded tokenizer satisfies the interface.
        config = self.config
        return pipeline.create_train_iterator(
            config.data, tokenizer=tokenizer_lib.load_tokenizer(config.data.tokenizer_path or None),
            seq_len=1, batch_size=batch_size, image_size=self.model_cfg.vision.image_size,
            n_query=self.model_cfg.v_query, v_query=self.model_cfg.v_query,
            max_images_per_row=self.model_cfg.num_frames, seed=seed, shard_index=shard_index,
            shard_count=shard_count)

    def create_iterator(self, batch_size: int, shard_index: int, shard_count: int):
        return self._iterator(batch_size, shard_index, shard_count, self.config.seed)

    def create_sampler(self, mesh: jax.sharding.Mesh, rules: Any, workdir: str):
        """Renders `num_samples` clips (the first batch of a differently seeded data stream) from their
        own encoding: `<workdir>/samples/video_<step>_<i>.gif` and TensorBoard `samples/video_<i>`."""
        del mesh, rules
        it = self._iterator(self.config.num_samples, 0, 1, self.config.seed + 1)
        try:
            clips = next(it)["frames"]
        finally:
            it.close()
        out_dir = epath.Path(workdir) / "samples"
        cfg = self.config.video_decoder
        render = jax.jit(lambda p, frames, rng: sample_video(
            self.model, p, rng, frames=frames, num_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale))

        def sample(step: int, params: PyTree, writer: metrics.SummaryWriter | None) -> None:
            video = np.asarray(jax.device_get(render(params, jnp.asarray(clips), jax.random.key(step))))
            if jax.process_index() != 0:
                return
            out_dir.mkdir(parents=True, exist_ok=True)
            frames = video_io.to_uint8(video)
            for i, clip in enumerate(frames):
                video_io.write_video(out_dir / f"video_{step:06d}_{i}.gif", clip, fps=cfg.sample_fps)
            if writer is not None:
                writer.images(step, {f"samples/video_{i}": clip for i, clip in enumerate(frames)})

        return sample
