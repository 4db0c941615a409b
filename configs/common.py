"""Fields every stage config shares, with their defaults (big_vision style).

A stage file's `get_config(arg)` calls `base_config(...)`, then sets the paper's values for its
stage (docs/recipe.md), its data mixture (`data.sources`, entries made by `source`) among them.
`arg` is the `:variant` suffix of `--config=configs/<stage>.py:<variant>`: comma-separated flags
such as `tiny` (a CPU-sized model and run on the embedded dataset) or a stage's phase (`hires`,
`qft`).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, *known: str) -> set[str]:
    """'tiny,hires' -> {'tiny', 'hires'}; unknown flags are an error naming the known ones."""
    flags = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = flags - set(known)
    if unknown:
        raise ValueError(f"unknown config variant(s) {sorted(unknown)}; known: {sorted(known)}")
    return flags


def base_config(stage: str, *, model: str, tiny: bool, data_stage: str | None = None
                ) -> ml_collections.ConfigDict:
    """Defaults of every field; `data_stage` is the input pipeline's stage (`data.stage`) when it
    differs from `stage`."""
    c = ml_collections.ConfigDict()
    c.stage = stage                  # the config file's name (configs/<stage>.py)
    c.task = "llm"                   # what trains: a key of emu2_jax.tasks.TASKS

    # Model: a preset of emu2_jax.models.presets plus overrides handed to presets.get_config;
    # nested blocks become dotted keys (model_overrides.llm.lora_rank -> 'llm.lora_rank').
    c.model = "tiny" if tiny else model
    c.model_overrides = ml_collections.ConfigDict()
    c.model_overrides.dtype = "float32" if tiny else "bfloat16"  # compute dtype (papers: bf16)
    c.model_overrides.param_dtype = "float32"                    # float32 master weights
    # A key of models.layers.REMAT_POLICIES, or "auto": emu2_jax.plan picks it with the mesh.
    c.model_overrides.remat_policy = "none" if tiny else "auto"
    # Attention kernel of the LLM and the vision tower (models.attention.BACKENDS): 'auto' is splash on
    # TPU, cuDNN flash attention on GPU in bfloat16, plain XLA otherwise (docs/sharding.md#attention-backends).
    c.model_overrides.attention = "auto"
    # Top-level components that train (emu2.COMPONENTS); the others are frozen: no gradient, no
    # optimizer state. With llm.lora_rank > 0 only the LoRA adapters of `llm` train.
    c.trainable = ("visual", "connector", "llm", "project_down")

    # Loss: text cross-entropy + visual-embedding regression (MSE), weighted.
    c.text_loss_weight = 1.0
    c.image_loss_weight = 1.0
    # Sequence positions per chunk of the text cross-entropy: the [rows, seq_len, vocab] float32
    # logits never exist at once (recomputed per chunk in the backward pass); 0 = all at once.
    c.text_loss_chunk = 0 if tiny else 512

    # Optimizer: AdamW, one peak learning rate per group (optim.GROUPS).
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.05  # Emu2's is not given in the paper; Emu (v1)'s value
    c.optimizer.grad_clip_norm = 5.0  # global-norm clipping; 0 disables
    c.optimizer.learning_rate = ml_collections.ConfigDict({"visual": 1e-5, "projector": 1e-5, "llm": 1e-5})
    c.optimizer.warmup_steps = -1    # >= 0 overrides warmup_ratio
    c.optimizer.warmup_ratio = 0.0   # fraction of total_steps warming up linearly from 0
    c.optimizer.decay = "cosine"     # cosine | linear | constant after the warmup
    c.optimizer.end_lr_factor = 0.0  # final learning rate = peak * end_lr_factor

    # Steps, batch and sequence layout.
    c.total_steps = 10_000
    c.global_batch_size = 1024       # rows per optimizer step, over all processes
    # Microbatches per step (each global_batch_size / grad_accum_steps rows); 0: emu2_jax.plan picks.
    c.grad_accum_steps = 1 if tiny else 0
    c.seq_len = 2048
    c.max_images_per_row = 8         # image / video-frame slots of a row
    # (data, fsdp, tensor), -1 taking the remaining devices; or "auto": emu2_jax.plan chooses the mesh,
    # accumulation and remat policy that fit the chips and divide the batch (docs/sharding.md).
    c.mesh_shape = config_dict.FieldReference("auto", field_type=object)
    # Overrides of the logical-axis rules (emu2_jax.sharding.LOGICAL_RULES, docs/sharding.md):
    # ((logical name, mesh axis | (mesh axes) | None), ...), e.g. (('act_batch', ('data', 'fsdp', 'tensor')),)
    c.sharding_rules = ()
    c.seed = 0

    # Data: the input pipeline's fields (see data_config); the stage file sets the mixture.
    c.data = data_config(data_stage or stage, tiny)

    # Checkpoints, logs and samples (in --workdir).
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.restore_fallback = False       # latest checkpoint corrupt: resume from the newest intact one (else stop)
    c.log_every_steps = 50
    c.sample_every_steps = 1000      # greedy captions of sample images; 0 disables
    c.num_samples = 8
    c.sample_max_new_tokens = 48
    c.sample_pairs = ""              # JSONL {"image", "caption"} of held-out images; '' = embedded pairs
    c.sample_prompt = "[<IMG_PLH>]"  # text after <s>; the placeholder becomes [IMG] <image>*n [/IMG]
    # LLM stages: with a visual decoder (a decoder-stage workdir or converted Emu2-Gen), the samples
    # also draw the sample captions as images (PNG grid in samples/, TensorBoard); '' = captions only.
    c.sample_decoder_checkpoint = ""
    c.sample_decoder_steps = 50      # Euler steps of those images (guidance 3.0)

    # Starting point: a params-only checkpoint (checkpointing.save_params) or a training workdir,
    # and the components to take from it; the rest is freshly initialised.
    c.init_from = ""
    c.init_components = "visual,connector,llm,project_down"

    c.nonfinite = "skip"             # on a NaN/Inf loss or update: 'skip' the update, or 'stop'
    # Skipped updates in a row after which the run stops (exit 1). A bad batch or a loss spike skips
    # one or two; as the state is unchanged while skipping, a streak means the config or the state is
    # broken (e.g. text_loss_weight=nan, a far too high learning rate), and 10 wasted steps are cheap
    # next to a run that trains on to the end saving checkpoints of a model that no longer learns.
    c.max_consecutive_nonfinite = 10
    c.peak_tflops_per_device = 0.0   # for MFU; 0 looks the device kind up (none on CPU)
    c.allow_large_on_cpu = False     # refuse > 2B-parameter models on a host without accelerator

    if tiny:
        c.optimizer.learning_rate = ml_collections.ConfigDict({"visual": 1e-3, "projector": 2e-3, "llm": 2e-3})
        c.optimizer.warmup_steps = 10
        c.optimizer.weight_decay = 0.0
        c.optimizer.grad_clip_norm = 1.0
        c.total_steps = 300
        c.global_batch_size = 8
        c.seq_len = 96
        c.max_images_per_row = 2
        c.mesh_shape = (-1, 1, 1)
        c.checkpoint_every_steps = 100
        c.log_every_steps = 25
        c.sample_every_steps = 150
        c.num_samples = 4
        c.sample_max_new_tokens = 40
    return c


def source(builder: str, fmt: str, weight: float, *, paths: str = "", image_dir: str = "",
           system: str = "chat", clip_frames: int = 16, clip_stride: int = 1, image_size: int = 0
           ) -> ml_collections.ConfigDict:
    """One entry of `data.sources`: where a data source is and its share of the mixture.

    builder: the sequence builder, which fixes the record kind it reads (image_text, video_text,
      interleaved, grounded, text, chat, gen_t2i, gen_grounded, gen_edit, decoder).
    fmt: embedded (the dataset shipped in emu2_jax/data/embedded), webdataset, mmc4, grit, jsonl,
      llava (emu2_jax/data/formats.py describes each) or storyboard (emu2_jax/data/storyboard.py).
    weight: relative share of the mixture (0 disables the source); the paper's per-type global
      batch sizes.
    paths: globs / {a..b} ranges / comma list (local, file:// or gs://); image_dir: where mmc4,
      llava, jsonl edits and storyboards find their images; system: llava's system message,
      'chat' | 'academic' | literal text.
    clip_frames, clip_stride: video files (mp4/webm in webdataset shards): the frames kept of each
      clip at ingestion, sampled among every clip_stride-th frame (as `python -m
      emu2_jax.data.prepare --clip_frames --clip_stride` prepared them).
    image_size: > 0 stores images whose shorter side is larger downscaled to it, decoding every image
      at ingestion (`prepare --image_size`); 0 keeps the bytes as they are.
    """
    return ml_collections.ConfigDict({"builder": builder, "format": fmt, "paths": paths,
                                      "image_dir": image_dir, "weight": float(weight), "system": system,
                                      "clip_frames": clip_frames, "clip_stride": clip_stride,
                                      "image_size": image_size})


def data_config(stage: str, tiny: bool) -> ml_collections.ConfigDict:
    """The data fields every stage shares (emu2_jax.data.pipeline reads them); `sources` is left
    to the stage file."""
    d = ml_collections.ConfigDict()
    d.stage = stage                  # stage1 | stage2 | chat | gen | decoder (pipeline.STAGES)
    d.tokenizer_path = ""            # LLaMA tokenizer.model for real runs; '' = the embedded 1024-piece model
    d.cache_dir = ""                 # TFDS ArrayRecord builds; '' = $EMU2_JAX_DATA_CACHE or ~/.cache/emu2_jax/tfds
    d.balance = "samples"            # weights are shares of 'samples' (examples) or of packed 'rows'
    d.num_workers = 0 if tiny else 8  # grain worker processes (0 = in-process)
    d.worker_buffer_size = 2         # batches buffered per worker
    d.read_threads = 1 if tiny else 4  # decode threads per source and worker ...
    d.read_buffer_size = 8 if tiny else 16  # ... and the decoded examples they hold
    d.shuffle = True                 # seeded, reshuffled every epoch
    d.num_epochs = 0                 # 0 = repeat forever
    d.resize_mode = "squash"         # 'squash' (Emu2's Resize((S, S))) or 'center_crop'
    # Image before its caption (also videos and the images of interleaved documents).
    d.image_first_prob = 0.5
    d.regress_images = False         # regression loss on the images of pairs / videos / interleaved / grounded
    d.video_frames = 4 if tiny else 8  # frames per video in pretraining
    d.video_frame_stride = 1         # video decoder: source frames between its consecutive frames
    d.chat_video_frames = (2, 3, 4) if tiny else (8, 12, 16)  # choices in chat
    d.interleaved_max_images = 4 if tiny else 8  # images per interleaved document ...
    d.interleaved_max_len = 1024                 # ... in this many tokens
    d.phrase_first_prob = 0.7        # grounded phrase before its box
    d.gen_drop_entity_prob = 0.1     # Emu2-Gen drops an entity's box + subject image to plain text
    d.decoder_image_size = 64 if tiny else 1024  # visual-decoder targets: side, ...
    d.decoder_min_size = 0 if tiny else 512      # ... smaller images skipped as 'too_small', ...
    d.decoder_random_crop = True                 # ... random (else central) square crop
    d.max_document_chars = 1_000_000  # longer texts are skipped as 'too_long'
    # A source with this many bad records in a row (or twice its size) is an error naming it.
    d.max_consecutive_skips = 1000
    return d
