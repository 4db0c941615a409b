r"""Emu2 stage 2: generative pretraining with the encoder frozen (docs/recipe.md#stage-2).

Image-text and video-text pairs, interleaved documents (MMC4, YT-Storyboard-1B), grounded pairs
(GRIT-20M, CapsFusion-grounded-100M) and text-only rows (Pile); text cross-entropy plus regression
of the visual embeddings. Projector and LLM train at 448 px.

    python -m emu2_jax.train --config=configs/stage2.py --workdir=$W/stage2 --config.init_from=$W/stage1_448
    python -m emu2_jax.train --config=configs/stage2.py:tiny --workdir=/tmp/stage2   # CPU, minutes
"""
from configs import common


def get_config(arg=None):
    tiny = "tiny" in common.parse_arg(arg, "tiny")
    c = common.base_config("stage2", model="emu2_37b", tiny=tiny)
    c.text_loss_weight = 1.0
    c.image_loss_weight = 1.0
    c.trainable = ("connector", "llm", "project_down")  # encoder frozen
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.95, 1e-6  # paper: "AdamW"; stage 1's values
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.decay = "cosine"
    # Data: per-type global batch sizes as weights; real paths via --config.data.sources.<name>.paths.
    if tiny:
        c.data.sources = {"pairs": common.source("image_text", "embedded", 6400),
                          "grounded": common.source("grounded", "embedded", 6400),
                          "videos": common.source("video_text", "embedded", 6400),
                          "interleaved": common.source("interleaved", "embedded", 3200),
                          "text": common.source("text", "embedded", 800)}
    else:
        c.data.sources = {"laion_capsfusion": common.source("image_text", "webdataset", 6400),
                          "grit": common.source("grounded", "grit", 6400),
                          "webvid": common.source("video_text", "webdataset", 6400),
                          "mmc4": common.source("interleaved", "mmc4", 3200),
                          "pile": common.source("text", "jsonl", 800)}
    c.data.regress_images = True  # regression on the images of every data type but text
    if not tiny:
        c.optimizer.learning_rate.update({"visual": 1e-5, "projector": 1e-5, "llm": 1e-5})
        c.optimizer.grad_clip_norm = 5.0
        c.global_batch_size = 12800 + 6400 + 3200 + 800  # pairs, video pairs, interleaved, text per step
        c.total_steps = 20_350
        c.seq_len = 2048  # text-only rows are 2048 tokens; interleaved documents 1024
        c.max_images_per_row = 8
        c.model_overrides.vision = {"image_size": 448}
    return c
