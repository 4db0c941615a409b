"""Streaming conversion (`python -m emu2_jax.convert`) of a synthetic checkpoint in the real Emu2 key
layout with full-width tensors (6656-wide LLaMA layers with 17920-wide MLPs and 52 heads, 1792-wide
EVA blocks with 15360-wide MLPs), fewer layers, several bf16 safetensors shards plus their
`model.safetensors.index.json` and an HF `config.json`.

For each size (`--sizes`: LLaMA layers; EVA blocks are twice as many) it prints conversion GB/s
against plain sequential reading of the same files (`ratio_read=<convert/read>`) and the converter's
peak RSS against the largest single tensor (`rss_over_largest_tensor=<ratio>`), twice: with the files
in the page cache (`page_cache=warm`: CPU work against a memory copy) and evicted from it right
before the read and right before the conversion, in its process after its imports
(`page_cache=cold`: from disk, as a 74 GB checkpoint is read). Each conversion runs in its own
child process, so its peak RSS is its own (it includes the ~0.5 GB of importing JAX).
The conversion writes into `--out_dir`, by default the RAM-backed /dev/shm where there is one: the
ratio compares CPU-side work, not disk speed (writing the output to a disk of ~0.1 GB/s, as this
project's CI machine has, would time the disk).

Right before each conversion, in the conversion's process after its imports, fresh memory of the
checkpoint's size plus 2.5 GiB (the output, the converter's buffers) is touched once and freed,
and its first-touch rate printed (`--prefault=false` skips it). In a VM whose hypervisor backs
guest memory lazily and takes freed pages back a few seconds after they are freed (this project's
2-core machine, virtio free page reporting: ~0.1-0.7 GB/s the first time a page is used, ~14 GB/s
when it is used again within a second, ~2 GB/s after 3 s, ~0.35 GB/s after 5 s) the
conversion's output would otherwise be timed at the hypervisor's rate, which plain reading never
pays. Memory touched in another process is taken back before a conversion has imported JAX, so
the touch happens in the same process, as late as possible; it stays a race against the
hypervisor. A TPU VM host or bare metal has no such cost.

The vocabulary is cut to `--vocab` (default 8192, the real one is 32272) so the checkpoint stays
around 1.5-3 GB on a small machine; the largest tensor is then an MLP matrix [17920, 6656].

    python benchmarks/convert.py [--sizes=2,4] [--vocab=8192] [--dtype=bfloat16] [--workdir=DIR] [--out_dir=DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

D, F, HEADS = 6656, 17920, 52           # LLaMA-33B widths
E, M, IMG = 1792, 15360, 448            # EVA-02-CLIP-E widths, image size
SHARD_BYTES = 600 << 20


def _tensor_shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "visual.cls_token": (1, 1, E), "visual.pos_embed": (1, 1 + (IMG // 14) ** 2, E),
        "visual.patch_embed.proj.weight": (E, 3, 14, 14), "visual.patch_embed.proj.bias": (E,)}
    for i in range(2 * layers):
        p = f"visual.blocks.{i}."
        shapes.update({p + "norm1.weight": (E,), p + "norm1.bias": (E,), p + "norm2.weight": (E,),
                       p + "norm2.bias": (E,), p + "attn.qkv.weight": (3 * E, E), p + "attn.q_bias": (E,),
                       p + "attn.v_bias": (E,), p + "attn.proj.weight": (E, E), p + "attn.proj.bias": (E,),
                       p + "mlp.fc1.weight": (M, E), p + "mlp.fc1.bias": (M,), p + "mlp.fc2.weight": (E, M),
                       p + "mlp.fc2.bias": (E,)})
    shapes["decoder.lm.model.embed_tokens.weight"] = (vocab, D)
    for j in range(layers):
        p = f"decoder.lm.model.layers.{j}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (D, D) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F), p + "input_layernorm.weight": (D,),
                       p + "post_attention_layernorm.weight": (D,)})
    shapes.update({"decoder.lm.model.norm.weight": (D,), "decoder.lm.lm_head.weight": (vocab, D),
                   "project_up.weight": (D, E), "project_down.weight": (E, D)})
    return shapes


def build(folder: str, layers: int, vocab: int) -> tuple[int, int]:
    """Writes the checkpoint; returns (total bytes, largest tensor bytes) in bf16."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder)
    shapes = _tensor_shapes(layers, vocab)
    weight_map, shard, shard_bytes, names = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)
        shard, shard_bytes = {}, 0

    generator = torch.Generator().manual_seed(0)
    for i, (key, shape) in enumerate(shapes.items()):
        shard[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard_bytes += shard[key].numel() * 2
        if shard_bytes >= SHARD_BYTES or i == len(shapes) - 1:
            flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {"model_version": "base", "vocab_size": vocab, "hidden_size": D, "intermediate_size": F,
              "num_hidden_layers": layers, "num_attention_heads": HEADS, "rms_norm_eps": 1e-6,
              "vision_config": {"image_size": IMG, "patch_size": 14, "width": E, "layers": 2 * layers,
                                "head_width": 112, "mlp_ratio": M / E, "n_query": 64, "v_query": 64}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    sizes = [2 * int(np.prod(s)) for s in shapes.values()]
    return sum(sizes), max(sizes)


def evict(folder: str) -> None:
    """Drops the folder's files from the page cache (flushed first): the next read comes from disk."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(folder: str) -> float:
    start = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - start


_CHILD = """
import sys, time
import numpy as np
import tensorstore, torch  # imported lazily by the converter: ~1 s, timed like JAX's import (not at all)
from benchmarks.convert import evict
from emu2_jax.convert.__main__ import convert
if sys.argv[5] == "cold":  # here, after the imports, as plain reading evicts right before it reads
    evict(sys.argv[1])
first_touch = float("nan")
if float(sys.argv[4]):  # touched and freed right before the timed conversion (see the module doc)
    start = time.perf_counter()
    np.ones(int(float(sys.argv[4]) * (1 << 30)), np.uint8)
    first_touch = float(sys.argv[4]) * (1 << 30) / (time.perf_counter() - start) / 1e9
with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on (the touched memory is not the converter's)
    f.write("5")
start = time.perf_counter()
convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], log=lambda line: None)
seconds = time.perf_counter() - start
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(first_touch, seconds, peak)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4", help="LLaMA layers of each checkpoint (EVA blocks: twice)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out_dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where conversions write (default: /dev/shm, in RAM, else --workdir)")
    parser.add_argument("--prefault", default="true", choices=["true", "false"],
                        help="touch the conversion's memory once right before it (see the module doc)")
    args = parser.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="convert_bench_")
    out_root = tempfile.mkdtemp(prefix="convert_bench_out_", dir=args.out_dir or root)
    print(f"checkpoints in {root}, conversions written to {out_root}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), ".."), "JAX_PLATFORMS": "cpu"}
    try:
        for layers in (int(s) for s in args.sizes.split(",")):
            src, dst = os.path.join(root, f"src{layers}"), os.path.join(out_root, f"dst{layers}")
            total, largest = build(src, layers, args.vocab)
            os.sync()  # the checkpoint's write-back to disk would otherwise run beside the timed work
            for cache in ("warm", "cold"):  # files in the page cache, then read from disk
                if cache == "cold":
                    evict(src)
                read_s = read_seconds(src)
                prefault_gib = total / (1 << 30) + 2.5 if args.prefault == "true" else 0.0
                out = subprocess.run([sys.executable, "-c", _CHILD, src, dst, args.dtype, str(prefault_gib), cache],
                                     env=env, check=True, capture_output=True, text=True).stdout.split()
                shutil.rmtree(dst)
                first_touch, convert_s, rss = float(out[-3]), float(out[-2]), int(out[-1])
                print(f"llama_layers={layers} eva_blocks={2 * layers} shards={len(os.listdir(src)) - 2} "
                      f"size_gb={total / 1e9:.2f} largest_tensor_gb={largest / 1e9:.3f} page_cache={cache} "
                      f"read_gbps={total / read_s / 1e9:.2f} convert_gbps={total / convert_s / 1e9:.2f} "
                      f"ratio_read={read_s / convert_s:.3f} peak_rss_gb={rss / 1e9:.2f} "
                      f"first_touch_gbps={first_touch:.2f} rss_over_largest_tensor={rss / largest:.2f}", flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
