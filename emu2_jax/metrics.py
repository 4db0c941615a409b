"""What a training run reports: the progress line, TensorBoard summaries, throughput and MFU.

TensorBoard event files (scalars, sample images and captions) are written with tensorboardX
(`SummaryWriter` here), which needs no TensorFlow; `flax.metrics.tensorboard` would.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import jax
import jax.extend
import numpy as np
import tensorboardX

from emu2_jax.models.emu2 import Emu2Config

# ---------------------------------------------------------------------------------------------
# TensorBoard event files.


class SummaryWriter:
    """Scalars, images and text for TensorBoard in `<logdir>/events.out.tfevents.<time>.<host>`.

    A thin layer over `tensorboardX.SummaryWriter`. Its summaries pass through a queue to a writer
    thread, which puts them on disk within `flush_secs` (so TensorBoard sees a running job);
    `close` writes out everything still queued.
    """

    def __init__(self, logdir: str, flush_secs: float = 2.0):
        self.logdir = logdir
        self._writer = tensorboardX.SummaryWriter(logdir, flush_secs=flush_secs, max_queue=1000)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """images: {tag: uint8 [H, W, 3], or [N, H, W, 3] shown as one row-major grid of 8 columns}."""
        for tag, pixels in images.items():
            pixels = np.asarray(pixels)
            if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
                raise ValueError(f"image {tag!r}: want uint8 [H, W, 3] or [N, H, W, 3], got {pixels.dtype} "
                                 f"{list(pixels.shape)}")
            if pixels.ndim == 3:
                self._writer.add_image(tag, pixels, step, dataformats="HWC")
            else:
                self._writer.add_images(tag, pixels, step, dataformats="NHWC")

    def text(self, step: int, texts: Mapping[str, str]) -> None:
        """texts: {tag: markdown}; TensorBoard's text dashboard shows it under `<tag>/text_summary`."""
        for tag, value in texts.items():
            self._writer.add_text(tag, value, step)

    def close(self) -> None:
        self._writer.close()


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU.

# Dense bf16 peak FLOP/s per device, matched in order against `jax.Device.device_kind` (the first
# name it contains): JAX calls a v5p chip "TPU v5", a v5e "TPU v5 lite", a v6e "TPU v6 lite"; an
# H100 is the SXM part (989) unless its kind says PCIe.
_PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
)


def peak_flops_of_kind(kind: str) -> float | None:
    """The dense bf16 peak of a device kind (e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite"), or None
    when unknown (CPUs, other accelerators)."""
    return next((flops for name, flops in _PEAK_FLOPS if name.lower() in kind.lower()), None)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak, or None when unknown (e.g. CPU: no MFU is shown)."""
    return peak_flops_of_kind((device or jax.devices()[0]).device_kind)


def _multiplier(trained: bool, backprop_through: bool) -> int:
    """Passes of a tower's forward cost: 1 forward, +2 when its weights train (gradients w.r.t.
    activations and weights), +1 when only gradients must flow through it to earlier weights."""
    return 1 + (2 if trained else int(backprop_through))


def training_flops(config: Emu2Config, *, tokens: int, seq_len: float, images: int,
                   trainable: Sequence[str], lora: bool = False) -> float:
    """Matmul FLOPs of one optimizer step (2 per multiply-add), as used for MFU.

    tokens: LLM positions processed (padding included); seq_len: keys each query attends on average
    (seq_len / 2 for causal attention, the convention of the tasks and `aot`); images: encoder passes
    (stills and frames).
    A frozen encoder runs forward only; a frozen LLM still back-propagates when LoRA adapters or
    anything before it train. The small connector and LoRA matmuls are left out.
    """
    llm, vision = config.llm, config.vision
    attn = llm.hidden_size * llm.head_dim * (2 * llm.num_heads + 2 * llm.num_kv_heads)
    llm_params = llm.num_layers * (attn + 3 * llm.hidden_size * llm.intermediate_size)
    llm_forward = tokens * (2 * (llm_params + llm.hidden_size * llm.vocab_size)
                            + 4 * llm.num_layers * seq_len * llm.num_heads * llm.head_dim)
    v_tokens = vision.num_patches + 1
    vit_params = vision.depth * (4 * vision.width ** 2 + 2 * vision.width * vision.mlp_dim)
    vit_forward = images * (2 * v_tokens * vit_params + 4 * vision.depth * v_tokens ** 2 * vision.width
                            + 2 * vision.num_patches * vision.patch_size ** 2 * 3 * vision.width)
    llm_trained = "llm" in trainable and not lora
    llm_mult = _multiplier(llm_trained, backprop_through=lora or bool({"visual", "connector"} & set(trainable)))
    vit_mult = _multiplier("visual" in trainable, backprop_through=False)
    return float(llm_forward * llm_mult + vit_forward * vit_mult)


# ---------------------------------------------------------------------------------------------
# The progress line.


def _sub_jaxprs(value) -> list:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs (2 per multiply-add) of a jaxpr: dot_general and convolutions, scans times their
    length, the costliest branch of a cond; while loops (unknown trip count) count once."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracting])
        elif name == "conv_general_dilated":
            rhs, out_features = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / rhs[out_features]
        subs = [jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if name == "cond":
            total += max(subs, default=0.0)
        else:
            total += (eqn.params["length"] if name == "scan" else 1) * sum(subs)
    return total


def traced_flops(fn, *args) -> float:
    """`jaxpr_flops` of `fn` traced at `args` (arrays or ShapeDtypeStructs: nothing is computed)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: the task's FLOPs of a step (training_flops) over what `devices` chips
    at their peak could do in `step_seconds`. The training loop and `aot` both report this."""
    return flops_per_step / step_seconds / (peak_flops_per_device * devices) if step_seconds else 0.0


def mean_metrics(history: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Averages over the logged steps, leaving out skipped (non-finite) ones, and counts those;
    tokens/images are left to the throughput meter."""
    finite = [h for h in history if not h["nonfinite"]] or history
    out = {k: float(np.mean([h[k] for h in finite])) for k in history[0] if k not in ("tokens", "images")}
    out["nonfinite"] = float(sum(h["nonfinite"] for h in history))
    return out


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Throughput:
    """Rates over the steps since the last report; call `report` at each log step."""

    def __init__(self, start_step: int, total_steps: int, flops_per_step: float, peak_flops: float | None):
        self._total = total_steps
        self._flops = flops_per_step
        self._peak = peak_flops
        self._last_step, self._last_time = start_step, time.perf_counter()

    def report(self, step: int, tokens: float, images: float) -> dict[str, float]:
        """tokens, images: summed over the steps since the last report (all hosts)."""
        now = time.perf_counter()
        seconds = max(now - self._last_time, 1e-9)
        steps = max(step - self._last_step, 1)
        self._last_step, self._last_time = step, now
        out = {
            "steps_per_sec": steps / seconds,
            "tokens_per_sec": tokens / seconds,
            "images_per_sec": images / seconds,
            "eta_seconds": (self._total - step) * seconds / steps,
        }
        if self._peak:
            out["mfu"] = mfu(self._flops, seconds / steps, self._peak, jax.device_count())
        return out


def progress_line(step: int, total_steps: int, values: Mapping[str, float]) -> str:
    """`step 120/1000 | loss 2.31 (text 2.31, image 0.00, acc 0.41) | lr llm 3.00e-05 ... | ETA 4m10s`;
    the throughput parts appear when `values` has them (not for the first, compiling step), the
    data iterator's skip counters (`data/skipped/<reason>`, `data/ingest_skipped/<reason>`) when
    non-zero."""
    loss = f"loss {values['loss']:.4f}"
    if "text_loss" in values:  # the LLM stages; the decoder stage's loss is the denoising MSE alone
        loss += (f" (text {values['text_loss']:.4f}, image {values['image_loss']:.4f}, "
                 f"acc {values['text_accuracy']:.3f})")
    elif "cond_dropped" in values:
        loss += f" (condition dropped {100 * values['cond_dropped']:.0f}%)"
    parts = [f"step {step}/{total_steps}", loss]
    lrs = " ".join(f"{k[3:]} {v:.2e}" for k, v in values.items() if k.startswith("lr/"))
    if lrs:
        parts.append(f"lr {lrs}")
    parts.append(f"grad_norm {values['grad_norm']:.3f}")
    if "tokens_per_sec" in values:
        tokens = f"{values['tokens_per_sec']:.0f} tok/s, " if values["tokens_per_sec"] else ""
        parts.append(f"{tokens}{values['images_per_sec']:.1f} img/s")
        parts.append(f"MFU {100 * values['mfu']:.1f}%" if "mfu" in values else "MFU n/a")
        parts.append(f"ETA {format_duration(values['eta_seconds'])}")
    if values.get("nonfinite"):
        parts.append(f"{values['nonfinite']:.0f} non-finite step(s) skipped")
    for prefix, label in (("data/skipped/", "skipped"), ("data/ingest_skipped/", "ingest skipped")):
        counts = ", ".join(f"{k[len(prefix):]} {v:.0f}" for k, v in values.items()
                           if k.startswith(prefix) and "/" not in k[len(prefix):] and v)
        if counts:  # totals over the sources; TensorBoard has them per source too
            parts.append(f"{label} {counts}")
    return " | ".join(parts)
