r"""Emu (v1) instruction tuning: LoRA (rank 16, alpha 16) on every self-attention projection of the
LLM; nothing else trains (docs/recipe.md#emu-v1-instruction-tuning). ShareGPT, Alpaca, LLaVA,
VideoChat and Video-ChatGPT data,
loss on answers only, 224 px.

    python -m emu2_jax.train --config=configs/emu1_chat.py --workdir=$W/emu1_chat --config.init_from=$EMU1
    python -m emu2_jax.train --config=configs/emu1_chat.py:tiny --workdir=/tmp/emu1_chat   # CPU, minutes
"""
from configs import common
from emu2_jax.data import tokenizer
from emu2_jax.models.causal_transformer import CausalTransformerConfig


def get_config(arg=None):
    tiny = "tiny" in common.parse_arg(arg, "tiny")
    c = common.base_config("emu1_chat", model="emu1_14b", tiny=tiny, data_stage="chat")
    c.text_loss_weight = 1.0
    c.image_loss_weight = 0.0
    c.trainable = ("llm",)  # with llm.lora_rank > 0: only the adapters
    # Emu v1's own chat template: its image system message, then Emu2-Chat's turn shape (the same in both).
    c.sample_prompt = f"{tokenizer.EMU1_SYSTEM_IMAGE} [USER]: [<IMG_PLH>]Describe the image in details. [ASSISTANT]:"
    c.model_overrides.llm = {"lora_rank": 16, "lora_alpha": 16.0}
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6  # Emu (v1) pretraining's
    c.optimizer.warmup_steps = 10 if tiny else 500
    c.optimizer.decay = "cosine"
    c.optimizer.end_lr_factor = 0.0
    # Data: instruction data in LLaVA-format json, read by the chat pipeline (data.stage 'chat') with
    # Emu v1's image system message.
    if tiny:
        c.data.sources = {"chat": common.source("chat", "embedded", 1, system="emu1_image")}
    else:
        c.data.sources = {"llava": common.source("chat", "llava", 1, system="emu1_image")}

    if tiny:
        # The tiny model with Emu (v1)'s architecture: pre-norm encoder, Causal Transformer connector.
        c.model_overrides.causal_transformer = CausalTransformerConfig(
            num_queries=4, width=64, depth=1, num_heads=4, mlp_dim=128)
        c.model_overrides.connector = "causal_transformer"
        c.model_overrides.vision = {"post_norm": False}
        c.model_overrides.llm.lora_rank = 4
        c.optimizer.learning_rate.update({"visual": 0.0, "projector": 0.0, "llm": 5e-3})
    else:
        c.optimizer.learning_rate.update({"visual": 1e-5, "projector": 1e-5, "llm": 1e-5})
        c.optimizer.grad_clip_norm = 1.0  # not given; a conservative default for adapters
        c.global_batch_size = 128
        c.total_steps = 10_000
        c.seq_len = 2048
        c.model_overrides.vision = {"image_size": 224}
    return c
