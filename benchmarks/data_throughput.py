"""Throughput of the stage-2 data mixture next to the rate at which the tiny train step consumes it.

Both are measured in this one run on this machine, with the `configs/stage2.py:tiny` config (the
embedded dataset, the tiny model, its row geometry):
  pipeline:     examples/s (and rows/s) that `create_train_iterator` delivers, after a warm-up batch;
  consumption:  examples/s that the jitted train step of `emu2_jax.train` (forward + backward +
                AdamW update) gets through, on batches taken from the same pipeline beforehand
                (so no data work overlaps it), after its compilation.
and, for a pod host, the same pipeline at the paper's 448 px: images/s on this one process (one
core), and from it the cores a host needs to keep stage 2's full-size step fed (`--step_seconds`,
default: the roofline step `python -m emu2_jax.aot --config=configs/stage2.py --topology=v5p-128`
prints; `--hosts`: 16 hosts of 4 chips for v5p-128).
The last line is `ratio=<pipeline/consumption>`: above 1 the input pipeline keeps up.

    python benchmarks/data_throughput.py [--batches=40] [--steps=10] [--workers=0] [--hires_batches=10]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="batches timed for the pipeline")
    parser.add_argument("--steps", type=int, default=10, help="train steps timed")
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
    parser.add_argument("--cache_dir", default="", help="TFDS cache ('' = a temp dir, removed after)")
    parser.add_argument("--hires_batches", type=int, default=10, help="batches timed at 448 px")
    parser.add_argument("--step_seconds", type=float, default=475.65, help="full-size stage-2 step (aot)")
    parser.add_argument("--hosts", type=int, default=16, help="hosts of the pod slice (v5p-128: 16)")
    args = parser.parse_args()
    if args.cache_dir:
        run(args, args.cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="emu2_tfds_") as cache_dir:
            run(args, cache_dir)


def run(args: argparse.Namespace, cache_dir: str) -> None:

    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from configs import stage2  # pylint: disable=import-outside-toplevel
    from emu2_jax import train  # pylint: disable=import-outside-toplevel
    from emu2_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    from emu2_jax.tasks import llm as llm_task  # pylint: disable=import-outside-toplevel

    config = stage2.get_config("tiny")
    config.data.num_workers = args.workers
    config.data.cache_dir = cache_dir
    trainer = train.create_trainer(config)
    tokenizer = llm_task.load_tokenizer(config, trainer.model_cfg)
    rows = config.global_batch_size

    def make_iterator(image_size: int = trainer.model_cfg.vision.image_size):
        return pipeline.create_train_iterator(
            config.data, tokenizer=tokenizer, seq_len=config.seq_len, batch_size=rows,
            image_size=image_size, n_query=trainer.model_cfg.n_query,
            v_query=trainer.model_cfg.v_query, max_images_per_row=config.max_images_per_row,
            seed=config.seed)

    # Pipeline: examples/s after one warm-up batch (which builds the embedded TFDS cache).
    data = make_iterator()
    batches = [next(data)]
    examples_before = data.stats()["data/examples"]
    start = time.perf_counter()
    batches += [next(data) for _ in range(args.batches)]
    pipeline_seconds = time.perf_counter() - start
    examples = data.stats()["data/examples"] - examples_before
    data.close()
    pipeline_eps = examples / pipeline_seconds
    examples_per_batch = examples / args.batches

    # Consumption: the jitted train step on pre-made batches, after its compilation.
    state = train.init_state(trainer, config)
    device_batches = [train.make_global_batch(b, trainer.batch_sharding, config.grad_accum_steps)
                      for b in batches[:args.steps + 1]]
    state, metrics = trainer.train_step(state, device_batches[0])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in device_batches[1:args.steps + 1]:
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    step_seconds = (time.perf_counter() - start) / args.steps
    consumption_eps = examples_per_batch / step_seconds

    tokens = np.mean([(b["segment_ids"] > 0).mean() for b in batches])
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPU cores, grain workers: {args.workers}")
    print(f"config: configs/stage2.py:tiny (embedded data), {rows} rows x {config.seq_len} tokens, "
          f"{config.max_images_per_row} image slots of {trainer.model_cfg.vision.image_size} px, "
          f"{examples_per_batch:.1f} examples per batch, {tokens:.0%} of tokens non-padding")
    print(f"pipeline:    {pipeline_eps:8.1f} examples/s  ({args.batches / pipeline_seconds:.1f} "
          f"batches/s over {args.batches} batches)")
    print(f"consumption: {consumption_eps:8.1f} examples/s  ({1 / step_seconds:.1f} train steps/s "
          f"over {args.steps} steps)")
    # A pod host: the same mixture decoded, augmented and resized to 448 px, on this one process.
    hires = make_iterator(448)
    next(hires)
    start = time.perf_counter()
    images = sum(int(np.sum(next(hires)["image_valid"])) for _ in range(args.hires_batches))
    hires_seconds = time.perf_counter() - start
    hires.close()
    per_core = images / hires_seconds
    per_row = images / (args.hires_batches * rows)
    needed = stage2.get_config().global_batch_size * per_row / args.hosts / args.step_seconds
    print(f"pipeline at 448 px: {per_core:8.1f} images/s on one core ({per_row:.2f} images per row); a stage-2 "
          f"step of {args.step_seconds:.0f} s over {args.hosts} hosts needs {needed:.1f} images/s per host = "
          f"{needed / per_core:.2f} cores")
    print(f"ratio={pipeline_eps / consumption_eps:.2f}")


if __name__ == "__main__":
    main()
