"""MFU of the Emu2 stage-2 train step on this machine's accelerator (one GPU or TPU chip): emu2_jax
against the same model assembled from the PyTorch references, in one invocation.

Ours is the training loop's own step (`train.create_trainer` on `configs/stage2.py`: the connector,
LLM and project_down train with AdamW, the encoder is frozen and runs forward only; bf16 compute,
float32 master weights, the chunked text cross-entropy) on the `--preset` model (default `medium`,
1.67B parameters), one chip, `--batch` rows of `--seq_len` tokens holding `--images` images each.
The reference is timm's `Eva` (frozen, no_grad) -> avg_pool2d -> a linear `project_up` into the
`<image>` positions of transformers' `LlamaForCausalLM` (inputs_embeds, SDPA attention), cross-entropy
plus the MSE regression of the next visual embedding through a linear `project_down`; torch.autocast
bf16 over float32 weights, AdamW (fused on CUDA) with the same clipping, optionally `torch.compile`d
(`--torch_compile`); on a TPU it runs through torch_xla (without it the reference is skipped and the
last line is `ratio=nan`). `--remat=full` (default) rematerialises each LLM layer on both sides
(`remat_policy=full`; transformers' gradient checkpointing); `none` keeps every activation.

Each side runs in its own child process, so each has the whole device: --warmup steps (the first
compiles), then --steps steps each timed to completion (`jax.block_until_ready`; the device
synchronised on the torch side). TFLOP/s per device = the task's analytic FLOPs of a step
(`LlmTask.training_flops`, what the training loop's MFU uses: causal attention at half, the frozen
encoder forward only, no recomputation) / the mean step time; MFU = that / the device's dense bf16
peak (`metrics.peak_flops_of_kind`; an unknown device shows TFLOP/s only). Both sides are charged the
same FLOPs, so the last line `ratio=<ours MFU / reference MFU>` (TFLOP/s where the peak is unknown)
is also the reference's step time over ours (> 1: emu2_jax is faster).

On a machine without a GPU/TPU it only says that MFU is not meaningful on CPU and exits 0;
`--allow_cpu --preset=tiny` runs the whole code path there anyway (figures of no meaning).

    python benchmarks/mfu.py [--preset=medium] [--batch=8] [--seq_len=2048] [--images=4] [--steps=10]
        [--warmup=3] [--remat=full] [--attention=auto] [--torch_compile] [--allow_cpu]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.child import run_in_child  # noqa: E402

# Default (batch rows, seq_len, images per row) of each preset this benchmark runs. `medium` at batch 8
# with remat full is estimated (emu2_jax.plan) at ~40 GiB: one H100 / H200 / A100-80GB / TPU v5p chip.
SIZES = {"tiny": (2, 128, 2), "small": (8, 2048, 4), "medium": (8, 2048, 4)}
GRAD_CLIP = 5.0  # configs/stage2.py's optimizer.grad_clip_norm


def _batch(config, batch: int, images: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of random text holding `images` still images each ([IMG] <image>*n [/IMG] every n + 8 tokens):
    every slot valid, every token supervised (text, or the regression of the next visual embedding)."""
    rng = np.random.default_rng(seed)
    n = config.n_query
    span = 2 + n + 6
    if images * span + 3 > seq_len:
        raise SystemExit(f"--seq_len={seq_len} cannot hold {images} images of {n} tokens")
    base_vocab = config.image_token_id - 3  # Emu2's added tokens ([PAD], [IMG], ...) follow the base vocabulary
    tokens = rng.integers(3, base_vocab, size=(batch, seq_len)).astype(np.int32)
    for i in range(images):
        start = 3 + i * span
        tokens[:, start] = config.boi_token_id
        tokens[:, start + 1:start + 1 + n] = config.image_token_id
        tokens[:, start + 1 + n] = config.eoi_token_id
    targets = np.roll(tokens, -1, axis=1)
    size = config.vision.image_size
    return {
        "tokens": tokens,
        "targets": targets,
        "text_loss_mask": (targets != config.image_token_id).astype(np.float32),
        "image_loss_mask": (targets == config.image_token_id).astype(np.float32),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy(),
        "images": rng.integers(0, 256, size=(batch, images, size, 3 * size), dtype=np.uint8),  # pixel rows
        "image_valid": np.ones((batch, images), bool),
        "image_is_frame": np.zeros((batch, images), bool),
    }


def _stage2_config(args):
    """configs/stage2.py on `args.preset` at the benchmark's sizes, one chip, nothing left to plan."""
    import ml_collections

    from configs import stage2

    c = stage2.get_config()
    c.model = args.preset
    # The preset's own image size (stage 2 trains the 37B model at 448 px); bf16 over float32 weights.
    c.model_overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "param_dtype": "float32",
                                                   "remat_policy": args.remat, "attention": args.attention})
    c.global_batch_size = args.batch
    c.seq_len = args.seq_len
    c.max_images_per_row = args.images
    c.text_loss_chunk = min(c.text_loss_chunk, args.seq_len)
    c.grad_accum_steps = 1
    c.mesh_shape = (1, 1, 1)
    return c


def _time_steps(step, sync, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(seconds of the first warm-up step (compilation included), seconds of each timed step)."""
    first = 0.0
    for i in range(warmup):
        start = time.perf_counter()
        sync(step())
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - start)
    return first, times


def _run_ours(args, queue) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # GPU: this process has the device to itself
    import jax

    device = jax.devices()[0]
    info = {"backend": jax.default_backend(), "device_kind": device.device_kind}
    if info["backend"] == "cpu" and not args.allow_cpu:
        queue.put(info)
        return

    from emu2_jax import train
    from emu2_jax.models import attention

    config = _stage2_config(args)
    trainer = train.create_trainer(config, devices=[device])
    state = train.init_state(trainer, config)
    local = _batch(trainer.model_cfg, args.batch, args.images, args.seq_len)
    batch = train.make_global_batch(local, trainer.batch_sharding, accum_steps=1)
    out = {}

    def step():
        nonlocal state
        state, out["metrics"] = trainer.train_step(state, batch)
        return state, out["metrics"]

    first, times = _time_steps(step, jax.block_until_ready, args.warmup, args.steps)
    stats = device.memory_stats() or {}
    queue.put({**info, "flops": trainer.task.training_flops(trainer.abstract_state.params),
               "params": trainer.num_params, "trainable": trainer.num_trainable,
               "attention": attention.resolve(trainer.model_cfg.llm.attention, trainer.model_cfg.llm.dtype),
               "loss": float(out["metrics"]["loss"]),
               "first_step_s": first, "times": times, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30})


def _torch_device(backend: str):
    """(torch device, synchronise function, autocast device type) on the device JAX used, or a string
    saying why the reference cannot run there."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), lambda _: torch.cuda.synchronize(), "cuda"
    if backend == "tpu":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            return "the reference needs torch_xla on a TPU (not installed)"

        def sync(_):
            xm.mark_step()
            xm.wait_device_ops()

        return xm.xla_device(), sync, "xla"
    if backend == "cpu":
        return torch.device("cpu"), lambda _: None, "cpu"
    return f"this torch ({torch.__version__}) cannot use the {backend} device"


def _run_reference(args, info, queue) -> None:
    import torch
    import torch.nn.functional as F

    from emu2_jax.models import presets
    from tests import torch_refs  # imports transformers and timm, also where torchvision cannot (its docstring)

    transformers = torch_refs.transformers

    torch.set_num_threads(os.cpu_count())
    placed = _torch_device(info["backend"])
    if isinstance(placed, str):
        queue.put({"skipped": placed})
        return
    device, sync, autocast = placed
    config = presets.get_config(args.preset)
    vision, llm_cfg = config.vision, config.llm
    grid, side = vision.grid_size, int(config.n_query ** 0.5)
    hf_config = transformers.LlamaConfig(
        vocab_size=llm_cfg.vocab_size, hidden_size=llm_cfg.hidden_size, intermediate_size=llm_cfg.intermediate_size,
        num_hidden_layers=llm_cfg.num_layers, num_attention_heads=llm_cfg.num_heads,
        num_key_value_heads=llm_cfg.num_kv_heads, rms_norm_eps=llm_cfg.rms_norm_eps,
        max_position_embeddings=max(args.seq_len, llm_cfg.max_cache_length), tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": llm_cfg.rope_theta}, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        visual = torch_refs.timm_eva(vision)
        llm = transformers.LlamaForCausalLM(hf_config)
        project_up = torch.nn.Linear(vision.width, llm_cfg.hidden_size, bias=False)
        project_down = torch.nn.Linear(llm_cfg.hidden_size, vision.width, bias=False)
    modules = torch.nn.ModuleDict({"visual": visual, "llm": llm, "project_up": project_up,
                                   "project_down": project_down}).to(device)
    visual.eval().requires_grad_(False)  # stage 2: the encoder is frozen
    llm.train()  # dropout is 0; training mode is what enables gradient checkpointing
    if args.remat == "full":  # every decoder layer recomputed in the backward pass (non-reentrant)
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for name, p in modules.named_parameters() if not name.startswith("visual.")]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.05,
                                  fused=device.type == "cuda")
    batch = {k: torch.from_numpy(v) for k, v in _batch(config, args.batch, args.images, args.seq_len).items()}
    # Ours CLIP-normalises the uint8 pixel rows on device; the reference gets the same floats from the host.
    pixels = torch_refs.reference_pixels(batch["images"]).to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    tokens, targets = batch["tokens"].long(), batch["targets"].long()

    def loss_fn(tokens, targets, pixels, text_mask, image_mask):
        b, length = tokens.shape
        with torch.no_grad():  # the frozen encoder: forward only, as ours
            patches = visual.forward_features(pixels)[:, 1:]
            pooled = F.avg_pool2d(patches.transpose(1, 2).reshape(patches.shape[0], -1, grid, grid),
                                  grid // side).flatten(2).transpose(1, 2)
        is_image = (tokens == config.image_token_id)[..., None]
        embeds = llm.get_input_embeddings()(tokens)
        embeds = embeds.masked_scatter(is_image, project_up(pooled).reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        visual_at = torch.zeros(b, length, pooled.shape[-1], device=tokens.device).masked_scatter(
            is_image, pooled.float().reshape(-1, pooled.shape[-1]))
        hidden = llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        logits = llm.lm_head(hidden).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").reshape(b, length)
        text_loss = (nll * text_mask).sum() / text_mask.sum().clamp(min=1)
        pred = project_down(hidden).float()
        target = F.pad(visual_at[:, 1:], (0, 0, 0, 1))  # the output at p regresses the embedding at p + 1
        image_loss = (((pred - target) ** 2).mean(-1) * image_mask).sum() / image_mask.sum().clamp(min=1)
        return text_loss + image_loss

    if args.torch_compile:
        loss_fn = torch.compile(loss_fn, backend="openxla" if device.type == "xla" else "inductor")
    out = {}

    def step():
        with torch.autocast(autocast, dtype=torch.bfloat16):
            loss = loss_fn(tokens, targets, pixels, batch["text_loss_mask"], batch["image_loss_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["loss"] = loss.detach()
        return loss

    first, times = _time_steps(step, sync, args.warmup, args.steps)
    queue.put({"device_name": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
               "torch": torch.__version__, "loss": float(out["loss"]), "first_step_s": first, "times": times,
               "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0})


def _row(name: str, r: dict, flops: float, peak: float | None) -> dict:
    """Prints one side's line of the table; returns its figures."""
    seconds = float(np.mean(r["times"]))
    tflops = flops / seconds / 1e12
    mfu = tflops * 1e12 / peak if peak else None
    memory = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] else "n/a"
    print(f"{name:>10} | {seconds:8.4f} | {min(r['times']):8.4f} | {max(r['times']):8.4f} | {tflops:11.4g} | "
          f"{f'{100 * mfu:.1f}%' if mfu is not None else 'n/a':>6} | {memory:>9} | {r['loss']:8.4f} | "
          f"{r['first_step_s']:8.1f}", flush=True)
    return {"seconds_per_step": seconds, "tflops_per_device": tflops, "mfu": mfu, "peak_gib": r["peak_gib"],
            "loss": r["loss"], "first_step_s": r["first_step_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="medium", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, help="rows per step (default: the preset's, see SIZES)")
    parser.add_argument("--seq_len", type=int, help="tokens per row (default 2048; tiny: 128)")
    parser.add_argument("--images", type=int, help="images per row (default 4; tiny: 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before timing (the first compiles)")
    parser.add_argument("--remat", default="full", choices=("none", "full"),
                        help="per-layer rematerialisation of the LLM on both sides")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "splash"),
                        help="emu2_jax's attention kernel (auto: cuDNN flash on GPU, splash on TPU); the "
                             "reference uses SDPA")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the reference's loss")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="run on CPU anyway (to exercise the code path; use --preset=tiny)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    for field, default in zip(("batch", "seq_len", "images"), SIZES[args.preset]):
        if getattr(args, field) is None:
            setattr(args, field, default)

    from emu2_jax import metrics

    ours = run_in_child(_run_ours, args)
    backend, kind = ours["backend"], ours["device_kind"]
    if "times" not in ours:
        print(f"MFU is not meaningful on CPU: no GPU or TPU found (JAX backend {backend}, device {kind!r}). "
              f"Run this on a GPU/TPU machine, or pass --allow_cpu --preset=tiny to exercise the code path.")
        return
    peak = metrics.peak_flops_of_kind(kind) if backend != "cpu" else None
    flops = ours["flops"]
    print(f"Emu2 stage-2 train step, preset {args.preset} ({ours['params'] / 1e9:.3f}B parameters, "
          f"{ours['trainable'] / 1e9:.3f}B trained with AdamW; encoder frozen), bf16 compute over float32 weights, "
          f"remat {args.remat}; batch {args.batch} x {args.seq_len} tokens, {args.images} images/row; "
          f"{args.warmup} warm-up steps excluded, {args.steps} timed", flush=True)
    if peak:
        print(f"device: {kind} ({backend}), peak {peak / 1e12:.0f} TFLOP/s dense bf16", flush=True)
    elif backend == "cpu":
        print(f"device: {kind} (cpu, --allow_cpu): no peak, MFU not shown (not meaningful on CPU); "
              f"ratio of TFLOP/s", flush=True)
    else:
        print(f"device: {kind} ({backend}): peak bf16 FLOP/s of this device kind unknown, TFLOP/s only "
              f"(ratio of TFLOP/s)", flush=True)
    print(f"analytic FLOPs per step {flops:.4e} (LlmTask.training_flops, as the training loop's MFU); "
          f"emu2_jax attention {ours['attention']}", flush=True)
    print(f"{'side':>10} | {'s/step':>8} | {'min s':>8} | {'max s':>8} | {'TFLOP/s/dev':>11} | {'MFU':>6} | "
          f"{'peak mem':>9} | {'loss':>8} | {'1st s':>8}   (s/step: mean of the timed steps; 1st: the first "
          f"warm-up step, compilation included)", flush=True)
    results = {"emu2_jax": _row("emu2_jax", ours, flops, peak)}

    ref = run_in_child(_run_reference, args, {"backend": backend, "device_kind": kind})
    if "skipped" in ref:
        print(f"reference not run: {ref['skipped']}")
        print(json.dumps(results))
        print("ratio=nan")
        return
    results["reference"] = _row("reference", ref, flops, peak)
    print(f"reference: {ref['device_name']}, torch {ref['torch']}, "
          f"{'torch.compile' if args.torch_compile else 'eager'}", flush=True)
    key = "mfu" if peak else "tflops_per_device"
    print(json.dumps({side: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                      for side, r in results.items()}))
    print(f"ratio={results['emu2_jax'][key] / results['reference'][key]:.3f}")


if __name__ == "__main__":
    main()
