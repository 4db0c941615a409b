"""One forward+backward of the `small` Emu2 preset: emu2_jax against the same model assembled
from the PyTorch references (timm `Eva` + a linear projector + transformers `LlamaForCausalLM`),
with the same weights, on this machine, in one invocation.

Each side runs in its own child process so that its peak memory (max RSS above the
after-import baseline) is its own. Prints tokens/s and peak memory of each, twice: over the whole
run (emu2_jax's includes XLA compiling the step) and over the timed steps only (steady state: the
peak is reset after the first step), then `memory_ratio=` and `steady_memory_ratio=` (ours over the
reference) and `ratio=<ours/reference>` (tokens/s; > 1 means emu2_jax is faster).

    python benchmarks/train_step.py [--batch=2] [--images=2] [--seq_len=320] [--steps=3] [--remat=minimal]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.child import run_in_child  # noqa: E402


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: peak RSS since the last reset; VmRSS: now).
    getrusage's ru_maxrss is not used: the kernel updates it lazily, so it can lag the true peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    """Starts a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _timed(step, steps: int, baseline: float) -> dict[str, float]:
    """Runs `step` once (warm-up: compilation for emu2_jax), then `steps` times timed; peak RSS above
    `baseline` over the whole run and over the timed steps only (steady state)."""
    loss = step()
    with_compile = _status_mib("VmHWM") - baseline
    _reset_peak()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    return {"loss": loss, "seconds_per_step": elapsed / steps, "peak_mib": with_compile,
            "steady_peak_mib": _status_mib("VmHWM") - baseline}


def _batch(config, batch: int, images: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Interleaved rows: [text, image, text] x images, padded to seq_len with text; every token supervised."""
    rng = np.random.default_rng(seed)
    n = config.n_query
    span = 2 + n + 6
    if images * span > seq_len:
        raise ValueError(f"--seq_len={seq_len} cannot hold {images} images of {n} tokens")
    tokens = rng.integers(3, 32000, size=(batch, seq_len)).astype(np.int32)
    for i in range(images):
        start = 3 + i * span
        tokens[:, start] = config.image_token_id - 2
        tokens[:, start + 1:start + 1 + n] = config.image_token_id
        tokens[:, start + 1 + n] = config.image_token_id - 1
    size = config.vision.image_size
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "text_loss_mask": (np.roll(tokens, -1, axis=1) != config.image_token_id).astype(np.float32),
        "image_loss_mask": (np.roll(tokens, -1, axis=1) == config.image_token_id).astype(np.float32),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy(),
        "images": rng.integers(0, 256, size=(batch, images, size, 3 * size), dtype=np.uint8),  # pixel rows
        "image_valid": np.ones((batch, images), bool),
        "image_is_frame": np.zeros((batch, images), bool),
    }


def _run_reference(weights_path: str, args, queue) -> None:
    import torch
    from safetensors.torch import load_file

    from emu2_jax.models import presets
    from tests.torch_refs import emu2_reference, emu2_reference_forward

    torch.set_num_threads(os.cpu_count())
    config = presets.get_config("small")
    modules = emu2_reference(config)
    modules.load_state_dict(load_file(weights_path))
    batch = {k: torch.from_numpy(v) for k, v in _batch(config, args.batch, args.images, args.seq_len).items()}
    _reset_peak()  # loading the weights peaked above what stays resident: the run's peaks start here
    baseline = _status_mib("VmRSS")

    def step():
        modules.zero_grad(set_to_none=True)  # the previous step's gradients go before the forward
        loss = emu2_reference_forward(modules, batch, config)["loss"]
        loss.backward()
        return float(loss.detach())

    queue.put(_timed(step, args.steps, baseline))


def _run_ours(weights_path: str, args, queue) -> None:
    import jax
    from safetensors.numpy import load_file

    from emu2_jax.convert.emu2 import convert_emu2
    from emu2_jax.models import emu2, presets

    config = presets.get_config("small", remat_policy=args.remat)
    params = {"params": convert_emu2(load_file(weights_path), config)}
    params = jax.device_put(params)
    batch = _batch(config, args.batch, args.images, args.seq_len)
    model = emu2.Emu2Model(config)

    @jax.jit
    def step(params, batch):
        def loss_fn(p):
            return emu2.compute_losses(model.apply(p, batch), batch)[0]
        return jax.value_and_grad(loss_fn)(params)

    _reset_peak()  # loading the weights peaked above what stays resident: the run's peaks start here
    baseline = _status_mib("VmRSS")

    def run():
        loss, grads = step(params, batch)
        jax.block_until_ready(grads)
        return float(loss)

    queue.put(_timed(run, args.steps, baseline))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=320)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--remat", default="minimal", help="emu2_jax's remat policy (layers.REMAT_POLICIES): "
                        "minimal keeps the projections and recomputes attention and the MLP's hidden layer, "
                        "which cuts XLA's temporaries 3.7x at the cost of recomputing them")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from emu2_jax.models import presets
    from tests.torch_refs import emu2_reference

    config = presets.get_config("small")
    modules = emu2_reference(config)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "small.safetensors")
        save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, weights)
        del modules
        tokens = args.batch * args.seq_len
        print(f"small preset, batch {args.batch} x {args.seq_len} tokens, {args.images} images/row at "
              f"{config.vision.image_size}px, {args.steps} timed steps, {os.cpu_count()} CPU cores; emu2_jax remat "
              f"{args.remat}, the reference eager PyTorch (no checkpointing)", flush=True)
        results = {}
        for name, target in (("reference", _run_reference), ("emu2_jax", _run_ours)):
            results[name] = run_in_child(target, weights, args)
            r = results[name]
            print(f"{name:>10}: loss {r['loss']:.4f}  {r['seconds_per_step']:.2f} s/step  "
                  f"{tokens / r['seconds_per_step']:.1f} tokens/s  peak memory {r['peak_mib']:.0f} MiB with the "
                  f"first step (compilation), {r['steady_peak_mib']:.0f} MiB in steady state", flush=True)
    ratio = results["reference"]["seconds_per_step"] / results["emu2_jax"]["seconds_per_step"]
    mem_ratio = results["emu2_jax"]["peak_mib"] / max(results["reference"]["peak_mib"], 1.0)
    steady_ratio = results["emu2_jax"]["steady_peak_mib"] / max(results["reference"]["steady_peak_mib"], 1.0)
    print(json.dumps({k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in results.items()}))
    print(f"memory_ratio={mem_ratio:.3f} steady_memory_ratio={steady_ratio:.3f} ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
