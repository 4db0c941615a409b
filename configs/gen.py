r"""Emu2-Gen: fine-tuning for image generation, regression on the last image only (docs/recipe.md#emu2-gen).

Text-to-image, grounded text-to-image (subjects and boxes as images) and image editing, ending with
the target image whose visual embeddings are regressed; the encoder is frozen. Then the quality
fine-tune (`:qft`) on high-quality pairs at a lower learning rate.

    python -m emu2_jax.train --config=configs/gen.py --workdir=$W/gen --config.init_from=$W/stage2
    python -m emu2_jax.train --config=configs/gen.py:qft --workdir=$W/gen_qft --config.init_from=$W/gen
    python -m emu2_jax.train --config=configs/gen.py:tiny --workdir=/tmp/gen   # CPU, minutes
"""
from configs import common


def get_config(arg=None):
    variant = common.parse_arg(arg, "tiny", "qft")
    tiny, qft = "tiny" in variant, "qft" in variant
    c = common.base_config("gen", model="emu2_37b", tiny=tiny)
    c.text_loss_weight = 0.0   # regression only
    c.image_loss_weight = 1.0  # the data marks the last image of each example as the target
    c.trainable = ("connector", "llm", "project_down")
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.95, 1e-6
    c.optimizer.decay = "cosine"
    c.optimizer.warmup_steps = 10 if tiny else 100  # the table says ratio 0.0, the text 100 steps
    # Data: the main phase's per-type global batch sizes as weights (kept for :qft); real paths via
    # --config.data.sources.<name>.paths.
    if tiny:
        c.data.sources = {"t2i": common.source("gen_t2i", "embedded", 4096),
                          "grounded": common.source("gen_grounded", "embedded", 3584),
                          "edits": common.source("gen_edit", "embedded", 2048)}
    else:
        c.data.sources = {"t2i": common.source("gen_t2i", "webdataset", 4096),
                          "grit": common.source("gen_grounded", "grit", 3584),
                          "instructpix2pix": common.source("gen_edit", "jsonl", 2048)}
    if not tiny:
        lr = 1e-5 if qft else 5e-5
        c.optimizer.learning_rate.update({"visual": lr, "projector": lr, "llm": lr})
        c.optimizer.grad_clip_norm = 1.0
        # Per data type: text-to-image, grounded / subject-driven, editing.
        c.global_batch_size = 2048 + 1024 + 2048 if qft else 4096 + 3584 + 2048
        c.total_steps = 900 if qft else 3_000
        c.seq_len = 1024
        c.model_overrides.vision = {"image_size": 448}
    else:
        c.seq_len = 128
        c.max_images_per_row = 4
    return c
