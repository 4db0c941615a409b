r"""Emu2's visual decoder: image autoencoding (docs/recipe.md#visual-decoder).

The frozen Emu2 encoder reads a 448 px image, its features mean-pooled to 64 tokens [64, 1792]
condition the SDXL-style UNet (text_embeds = their mean, time_ids from the crop), which learns to
denoise the frozen SDXL VAE's latents of the same image at 1024 px: epsilon prediction on the
scaled-linear 1000-step schedule, noise offset 0.1, the condition replaced by the zero-image
encoding 10% of the time (for classifier-free guidance). Only the UNet trains. AdamW
(0.9, 0.999), eps 1e-8, wd 0.01, lr 1e-4, 2.5k warmup then linear decay, clip 1.0, batch 2048, 8k steps.

    # converted weights: visual (Emu2's encoder), vae (SDXL's) and unet (SDXL's, or Emu2-Gen's)
    python -m emu2_jax.train --config=configs/decoder.py --workdir=$W/decoder \
        --config.init_from=$CONVERTED --config.init_components=visual,vae,unet
    python -m emu2_jax.train --config=configs/decoder.py:tiny --workdir=/tmp/decoder   # CPU, ~1 minute
    python -m emu2_jax.autoencode --checkpoint=/tmp/decoder --image=in.png --out=out.png

`:tiny` trains a tiny UNet conditioned on the tiny Emu2 encoder over a tiny VAE, all randomly
initialised, on the embedded dataset. Its VAE is frozen at its random initialisation: a fixed
random (but deterministic and smooth) image -> latent map, enough for the denoising loss to fall;
decoded images only mean something once real VAE weights are loaded.
"""
import ml_collections

from configs import common


def get_config(arg=None):
    variant = common.parse_arg(arg, "tiny")
    tiny = "tiny" in variant
    c = common.base_config("decoder", model="emu2_37b", tiny=tiny)
    c.task = "decoder"
    # Encoder: `model` (an Emu2 preset) gives the EVA encoder and n_query; UNet and VAE presets of
    # emu2_jax.models.visual_decoder (UNET_PRESETS, VAE_PRESETS).
    c.decoder = ml_collections.ConfigDict()
    c.decoder.unet = "tiny" if tiny else "sdxl_emu2"
    c.decoder.vae = "tiny" if tiny else "sdxl"
    c.decoder.noise_offset = 0.1        # per-(sample, channel) offset noise
    c.decoder.condition_dropout = 0.1   # fraction of samples conditioned on the zero-image encoding
    c.decoder.sample_steps = 8 if tiny else 50  # Euler steps of the training samples (reconstructions)
    c.decoder.guidance_scale = 3.0
    c.trainable = ("unet",)
    if not tiny:  # automatic plans (emu2_jax.plan) model the LLM stages; pods pass mesh_shape / grad_accum_steps
        c.mesh_shape, c.grad_accum_steps, c.model_overrides.remat_policy = (1, -1, 1), 1, "full"
    c.init_components = "visual,vae,unet"
    c.text_loss_weight = c.image_loss_weight = 0.0  # unused: the decoder's loss is the denoising MSE
    # Data: the images of image-text webdataset shards (captions unused).
    if tiny:
        c.data.sources = {"images": common.source("decoder", "embedded", 1)}
    else:
        c.data.sources = {"laion_aesthetics": common.source("decoder", "webdataset", 1)}

    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.learning_rate = ml_collections.ConfigDict({"unet": 1e-4})
    c.optimizer.warmup_steps = 2500
    c.optimizer.decay = "linear"
    c.global_batch_size = 2048
    c.total_steps = 8000
    c.seq_len = 1                       # no text
    c.max_images_per_row = 1
    c.sample_every_steps = 500          # PNG grids of reconstructions (samples/step_<N>.png, TensorBoard)

    if tiny:
        c.optimizer.learning_rate.unet = 2e-3
        c.optimizer.warmup_steps = 10
        c.optimizer.weight_decay = 0.0
        c.data.decoder_image_size = 32  # 16x16 latents through the tiny VAE
        c.total_steps = 60
        c.global_batch_size = 8
        c.checkpoint_every_steps = 30
        c.sample_every_steps = 30
        c.log_every_steps = 10
    return c
