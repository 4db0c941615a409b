r"""Emu2-Chat: instruction tuning with the loss on answers only (docs/recipe.md#emu2-chat).

Academic VQA / captioning / referring-expression data and chat data under two system messages;
16x16 = 256 visual tokens per image (the `emu2_chat_37b` preset), videos of 8-16 frames; the LLM and
projector train, the encoder is frozen.

    python -m emu2_jax.train --config=configs/chat.py --workdir=$W/chat --config.init_from=$W/stage2
    python -m emu2_jax.train --config=configs/chat.py:tiny --workdir=/tmp/chat   # CPU, minutes
"""
from configs import common
from emu2_jax.data import tokenizer


def get_config(arg=None):
    tiny = "tiny" in common.parse_arg(arg, "tiny")
    c = common.base_config("chat", model="emu2_chat_37b", tiny=tiny)
    c.text_loss_weight = 1.0
    c.image_loss_weight = 0.0  # answers only: text
    c.trainable = ("connector", "llm", "project_down")
    c.sample_prompt = f"{tokenizer.SYSTEM_CHAT} [USER]: [<IMG_PLH>]Describe the image in details. [ASSISTANT]:"
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6
    c.optimizer.warmup_steps = 100 if not tiny else 10
    c.optimizer.decay = "cosine"
    c.optimizer.end_lr_factor = 0.0
    # Data: LLaVA-format json; `system` selects the paper's system message per source.
    if tiny:
        c.data.sources = {"chat": common.source("chat", "embedded", 1)}
    else:
        c.data.sources = {"llava": common.source("chat", "llava", 1, system="chat"),
                          "academic": common.source("chat", "llava", 1, system="academic")}

    if tiny:
        c.model_overrides.n_query = 16  # every patch of the tiny 4x4 grid, as 16x16 of the 32x32 one
        c.seq_len = 160
    else:
        c.optimizer.learning_rate.update({"visual": 1e-5, "projector": 1e-5, "llm": 1e-5})
        c.optimizer.grad_clip_norm = 5.0
        c.global_batch_size = 768
        c.total_steps = 8_000
        c.seq_len = 2048
        c.max_images_per_row = 16  # up to 16 video frames
        c.model_overrides.vision = {"image_size": 448}
    return c
