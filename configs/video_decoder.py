r"""Emu2's video decoder: a temporal UNet renders Emu2's visual embeddings as clips (docs/model.md#video-decoder).

The frozen Emu2 encoder reads every frame of a clip; its features mean-pooled to v_query = 64
tokens per frame, projected to 1024 wide (with a learned frame embedding) and laid out as one
F x 64 token sequence, condition a 3D UNet (SD 2.1 inflated: a temporal conv after every resnet,
temporal attention after every transformer, both starting as the identity) that denoises the frozen
SD-2.1 VAE's per-frame latents: v-prediction on the scaled-linear 1000-step schedule (SD 2.1), the
condition replaced by the zero-clip encoding 10% of the time (classifier-free guidance). Clips are
`data.video_frames` frames `data.video_frame_stride` source frames apart at `data.decoder_image_size`.
The UNet and the condition projection train; AdamW lr 5e-5 (the paper gives no further values).

    python -m emu2_jax.convert --src=$SD21 --dst=$W/sd21                  # stabilityai/stable-diffusion-2-1
    python -m emu2_jax.convert --src=$EMU2_GEN --dst=$W/emu2_gen          # Emu2 / Emu2-Gen: the encoder
    python -m emu2_jax.train --config=configs/video_decoder.py --workdir=$W/video \
        --config.init_from=$W/sd21 --config.init_components=unet,vae,visual=$W/emu2_gen

The 2D SD-2.1 UNet is inflated into the 3D one as it loads: its spatial weights are read, the
temporal layers keep their identity initialisation (logged with counts; docs/model.md#video-decoder).
    python -m emu2_jax.train --config=configs/video_decoder.py:tiny --workdir=/tmp/video   # CPU, minutes
    python -m emu2_jax.autoencode --checkpoint=/tmp/video --video=clip.gif --out=out.gif

`:tiny` trains a tiny 3D UNet conditioned on the tiny Emu2 encoder over a tiny VAE, all randomly
initialised (the VAE frozen at its random initialisation), on the embedded video clips, and writes
sample GIFs into <workdir>/samples/ and TensorBoard.
"""
import ml_collections

from configs import common


def get_config(arg=None):
    variant = common.parse_arg(arg, "tiny")
    tiny = "tiny" in variant
    c = common.base_config("video_decoder", model="emu2_37b", tiny=tiny)
    c.task = "video_decoder"
    # Encoder: `model` (an Emu2 preset) gives the EVA encoder and v_query; UNet and VAE presets of
    # emu2_jax.models.video_decoder (UNET3D_PRESETS, VAE_PRESETS).
    c.video_decoder = ml_collections.ConfigDict()
    c.video_decoder.unet = "tiny" if tiny else "sd21"
    c.video_decoder.vae = "tiny" if tiny else "sd21"
    c.video_decoder.condition_dropout = 0.1   # fraction of clips conditioned on the zero-clip encoding
    c.video_decoder.sample_steps = 8 if tiny else 50
    c.video_decoder.guidance_scale = 3.0
    c.video_decoder.sample_fps = 8.0
    c.trainable = ("unet", "cond_proj")
    if not tiny:  # automatic plans (emu2_jax.plan) model the LLM stages; pods pass mesh_shape / grad_accum_steps
        c.mesh_shape, c.grad_accum_steps, c.model_overrides.remat_policy = (1, -1, 1), 1, "full"
    c.init_components = "visual,vae,unet"  # from init_from; `name=PATH` entries name their own source
    c.text_loss_weight = c.image_loss_weight = 0.0  # unused: the loss is the denoising MSE
    c.data.video_frames = 16              # frames per clip
    c.data.video_frame_stride = 2         # source frames between consecutive clip frames
    c.data.decoder_image_size = 512       # 64x64 latents
    if tiny:
        c.data.sources = {"videos": common.source("video_decoder", "embedded", 1)}
    else:
        c.data.sources = {"webvid": common.source("video_decoder", "webdataset", 1)}

    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.learning_rate = ml_collections.ConfigDict({"unet": 5e-5, "projector": 5e-5})
    c.optimizer.warmup_steps = 1000
    c.optimizer.decay = "constant"
    c.global_batch_size = 256
    c.total_steps = 20_000
    c.seq_len = 1                         # no text
    c.max_images_per_row = c.data.video_frames
    c.sample_every_steps = 2000
    c.num_samples = 2

    if tiny:
        c.optimizer.learning_rate = ml_collections.ConfigDict({"unet": 2e-3, "projector": 2e-3})
        c.optimizer.warmup_steps = 10
        c.optimizer.weight_decay = 0.0
        c.data.video_frames = 4
        c.data.video_frame_stride = 2
        c.data.decoder_image_size = 32    # 16x16 latents through the tiny VAE
        c.max_images_per_row = c.data.video_frames
        c.total_steps = 60
        c.global_batch_size = 4
        c.checkpoint_every_steps = 30
        c.log_every_steps = 10
        c.sample_every_steps = 60
        c.num_samples = 1
    return c
