r"""Emu2 stage 1: captioning pretraining of the whole model (docs/recipe.md#stage-1).

Image-text pairs (LAION-2B, CapsFusion-120M) and video-text pairs (WebVid-10M), caption loss only;
encoder, projector and LLM all train, each with its own learning rate. 35.2k steps at 224 px, then
a restart at 448 px for 4k steps (`:hires`, starting from the 224 px run).

    python -m emu2_jax.train --config=configs/stage1.py --workdir=$W/stage1_224 \
        --config.init_from=$CONVERTED --config.init_components=visual,llm
    python -m emu2_jax.train --config=configs/stage1.py:hires --workdir=$W/stage1_448 \
        --config.init_from=$W/stage1_224
    python -m emu2_jax.train --config=configs/stage1.py:tiny --workdir=/tmp/stage1   # CPU, minutes
"""
from configs import common


def get_config(arg=None):
    variant = common.parse_arg(arg, "tiny", "hires")
    tiny, hires = "tiny" in variant, "hires" in variant
    c = common.base_config("stage1", model="emu2_37b", tiny=tiny)
    c.image_loss_weight = 0.0  # caption loss only
    c.trainable = ("visual", "connector", "llm", "project_down")
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.95, 1e-6
    c.optimizer.warmup_ratio = 0.02
    c.optimizer.decay = "cosine"
    # Data: per-type global batch sizes as weights; real paths via --config.data.sources.<name>.paths.
    if tiny:
        c.data.sources = {"pairs": common.source("image_text", "embedded", 6144),
                          "videos": common.source("video_text", "embedded", 768)}
    else:
        c.data.sources = {"laion_capsfusion": common.source("image_text", "webdataset", 6144),
                          "webvid": common.source("video_text", "webdataset", 768)}
    c.data.image_first_prob = 1.0  # always image (or video) first: captioning
    if not tiny:
        c.optimizer.learning_rate.update({"visual": 5e-5, "projector": 1e-4, "llm": 3e-5})
        c.optimizer.grad_clip_norm = 5.0
        c.global_batch_size = 6144 + 768  # image-text pairs + video-text pairs per step
        c.total_steps = 35_200
        c.seq_len = 1024                  # not in the paper: room for a few video frames + caption
        c.model_overrides.vision = {"image_size": 448 if hires else 224}
        if hires:
            c.total_steps = 4_000
            c.init_components = "visual,connector,llm,project_down"  # --config.init_from=<224 px run>
    elif hires:
        c.model_overrides.vision = {"image_size": 112}  # the tiny analogue of 224 -> 448
        c.total_steps = 100
    return c
