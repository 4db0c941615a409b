r"""Converts a released PyTorch checkpoint into an Orbax params checkpoint, streaming:

    python -m emu2_jax.convert --src=PATH --dst=DIR [--model=auto|<preset>] [--dtype=bfloat16|float32] \
        [--overwrite] [--allow_unused_keys] [--allow_nonfinite]

The layout is detected and printed (`emu2_jax.convert.layouts`); the model config comes from the
source's config.json files, for Emu v1 from its tensors' shapes (`--model=<preset>` overrides the
Emu2 / Emu v1 part) and is written into `DIR`
(`emu2_jax_model.json`), so `checkpointing.load_pretrained(DIR)` and `--config.init_from=DIR` need
nothing else.

One tensor at a time (an EVA block at a time for the vision tower, whose fused qkv feeds three
leaves): read it, convert it with the component converters' own rules, write it into its leaf (or
its layer's slot of a stacked leaf) on disk, drop it. Verified as it goes: a missing or misshapen key
stops the conversion naming it; at the end every source key must have been read or deliberately
ignored (`rotary_emb.inv_freq`, the safety checker, EVA's zero `k_bias`, Emu v1's unused tower norm
and head and T5 token table) and every layer slot of every leaf filled (for Emu v1, also every
parameter of the model, by shape). Emu v1's LoRA adapters are merged into the LLaMA weights.
Output goes to a temporary folder renamed to `DIR` only when complete.
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Iterator

import numpy as np
from absl import app, flags
from flax import traverse_util

from emu2_jax.convert import emu1, layouts
from emu2_jax.convert.diffusers import _SCANNED, _to_flax, _torch_stem, unet_target, vae_target
from emu2_jax.convert.emu2 import _linear_kernel
from emu2_jax.convert.eva_vit import _block, _Reader, eva_top, unexpected_eva_keys
from emu2_jax.convert.llama import _INV_FREQ, llama_entries
from emu2_jax.convert.source import Source
from emu2_jax.convert.stream import Buffers, ParamsWriter, Progress
from emu2_jax.models.emu2 import Emu2Config
from emu2_jax.models.unet import unet_config_from_diffusers
from emu2_jax.models.vae import vae_config_from_diffusers

# (Flax path, array, layer slot or None, number of slots)
Write = tuple[tuple[str, ...], np.ndarray, "int | None", int]


def _flat(tree: dict) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    yield from traverse_util.flatten_dict(tree).items()


def emu2_writes(src: Source, config: Emu2Config, prefix: str, layout_hf: bool) -> Iterator[Write]:
    """The Emu2Model leaves {visual, connector, llm, project_down} from `src`, one tensor at a time."""
    if config.connector != "mean_pool":
        raise ValueError("an Emu2 checkpoint needs an Emu2 config (mean-pool connector); Emu v1's are a layout "
                         "of their own (cformer., ln_visual. keys)")
    inner = prefix + ("model." if layout_hf else "")
    vprefix, lprefix, pprefix = inner + "visual.", inner + "decoder.lm.", prefix if layout_hf else inner
    vc, lc = config.vision, config.llm
    read = _Reader(src, vprefix)
    for path, value in _flat(eva_top(read, vc)):
        yield ("visual", *path), value, None, 0
    for i in range(vc.depth):
        for path, value in _flat(_block(read, i, vc)):
            yield ("visual", "blocks", *path), value, i, vc.depth
    unexpected = unexpected_eva_keys(src.keys(), vprefix, read.used)
    if unexpected:
        raise ValueError(f"unexpected vision tower keys: {unexpected[:10]}")
    src.ignored.update(k for k in src if k.startswith(vprefix) and k not in read.used)

    layer_entries, top_entries = llama_entries(lc)
    src.ignored.update(k for k in src if k.startswith(lprefix) and k.endswith(_INV_FREQ))

    def fetch(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in src:
            raise ValueError(f"checkpoint has no {key!r}")
        if src.shapes[key] != shape:
            raise ValueError(f"{key}: shape {src.shapes[key]}, expected {shape} for this config")
        return src[key]

    for suffix, shape, path, fn in top_entries:
        yield ("llm", *path), fn(fetch(lprefix + suffix, shape)), None, 0
    for i in range(lc.num_layers):
        for suffix, shape, path, fn in layer_entries:
            yield ("llm", "layers", *path), fn(fetch(f"{lprefix}model.layers.{i}.{suffix}", shape)), i, lc.num_layers
    vw, lw = vc.width, lc.hidden_size
    yield ("connector", "project_up", "kernel"), _linear_kernel(src, pprefix + "project_up.weight", (vw, lw),
                                                                 np.float32), None, 0
    yield ("project_down", "kernel"), _linear_kernel(src, pprefix + "project_down.weight", (lw, vw),
                                                     np.float32), None, 0


def diffusers_writes(src: Source, target: dict, prefix: str, component: str) -> Iterator[Write]:
    """A UNet's / VAE's leaves: each Flax path names its diffusers key (`emu2_jax.convert.diffusers`)."""
    for path, leaf in traverse_util.flatten_dict(target).items():
        name = path[-1]
        stem = prefix + _torch_stem(path) + "." + ("bias" if name == "bias" else "weight")
        for slot in range(leaf.shape[0]) if _SCANNED in path else [None]:
            key = stem.format(slot) if slot is not None else stem
            if key not in src:
                raise ValueError(f"{component} checkpoint has no {key!r}")
            shape, slots = (leaf.shape[1:], leaf.shape[0]) if slot is not None else (leaf.shape, 0)
            yield (component, *path), _to_flax(name, src[key], shape, key), slot, slots


def part_writes(part: layouts.Part, src: Source, layout: str) -> Iterator[Write]:
    if layout == "emu1":
        return emu1.emu1_writes(src, part.config, emu1.lora_alpha(part.files[0].parent, layouts._json))
    if part.kind == "emu2":
        return emu2_writes(src, part.config, part.prefix, layout_hf=layout in ("hf", "gen_diffusers"))
    config = (unet_config_from_diffusers if part.kind == "unet" else vae_config_from_diffusers)(part.config)
    target = (unet_target if part.kind == "unet" else vae_target)(config)
    return diffusers_writes(src, target, part.prefix, part.kind)


def _check_filled(writer: ParamsWriter, config: Emu2Config) -> None:
    """Every parameter of `Emu2Model(config)` written, with its shape, and nothing else."""
    from emu2_jax.summary import abstract_params

    want = {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract_params(config)).items()}
    got = writer.shapes()
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    if missing or extra or wrong:
        name = lambda paths: [".".join(p) for p in paths[:10]]
        raise ValueError(f"converted params do not match the model: missing {name(missing)}, extra {name(extra)}, "
                         f"misshapen {[(n, got[p], want[p]) for n, p in zip(name(wrong), wrong)]}")


def convert(src: str, dst: str, *, model: str = "auto", dtype: str = "float32", overwrite: bool = False,
            allow_unused_keys: bool = False, allow_nonfinite: bool = False,
            log: Callable[[str], None] = print) -> str:
    """Converts `src` into the params checkpoint `dst`; returns the layout name. Raises ValueError /
    FileNotFoundError with one line naming the input at fault; `dst` is untouched on failure."""
    out = pathlib.Path(dst).absolute()
    # Before reading: a 37B checkpoint takes long to read.
    if out.exists() and not overwrite:
        raise ValueError(f"--dst={dst}: already exists; pass --overwrite to replace it")
    layout, parts = layouts.detect(src, model)
    log(f"convert: {src}: layout {layout} ({', '.join(p.kind for p in parts)})")
    sources: dict[tuple, Source] = {}
    buffers = Buffers()  # shared by reading and writing: a tensor is read, transposed, written, let go
    for part in parts:
        key = tuple(part.files)
        if key not in sources:
            sources[key] = Source(part.files, allow_nonfinite=allow_nonfinite, buffers=buffers)
    total_tensors = sum(len(s) for s in sources.values())
    progress = Progress(total_tensors, sum(sum(s.nbytes.values()) for s in sources.values()))
    writer = ParamsWriter(out, dtype, buffers)
    start = time.perf_counter()
    try:
        for part in parts:
            src_ = sources[tuple(part.files)]
            src_.ignored.update(k for k in src_ if k.startswith(part.ignore) and part.ignore)
            for path, value, slot, slots in part_writes(part, src_, layout):
                writer.write(path, value, slot, slots)
                progress.update(sum(len(s.used) for s in sources.values()),
                                sum(s.bytes_read for s in sources.values()))
            if layout == "emu1":
                _check_filled(writer, part.config)
        unused = sorted(k for s in sources.values() for k in s if k not in s.used and k not in s.ignored)
        if unused and not allow_unused_keys:
            raise ValueError(f"checkpoint has {len(unused)} key(s) that no component reads: {unused[:10]}"
                             f"{' ...' if len(unused) > 10 else ''} (layout {layout}); pass --allow_unused_keys "
                             f"to convert anyway")
        model_config = {"layout": layout, "dtype": dtype}
        for part in parts:
            model_config[part.kind] = (layouts.emu2_config_to_json(part.config) if part.kind == "emu2"
                                       else part.config)
        writer.commit(model_config)
    except BaseException:
        writer.abort()
        raise
    nbytes = sum(s.bytes_read for s in sources.values())
    progress.update(sum(len(s.used) for s in sources.values()), nbytes, force=True)
    log(f"convert: wrote {dst} ({nbytes / 1e9:.2f} GB read in {time.perf_counter() - start:.1f}s); "
        f"load it with checkpointing.load_pretrained or --config.init_from={dst}")
    return layout


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        convert(f.src, f.dst, model=f.model, dtype=f.dtype, overwrite=f.overwrite,
                allow_unused_keys=f.allow_unused_keys, allow_nonfinite=f.allow_nonfinite)
    except (ValueError, FileNotFoundError) as e:  # one line naming the file / key and what is wrong
        raise SystemExit(str(e)) from None


def define_flags() -> None:
    """Only when run as a command, so importing this module defines no flags."""
    flags.DEFINE_string("src", None, "checkpoint file or folder (any supported layout)", required=True)
    flags.DEFINE_string("dst", None, "output directory (a params checkpoint with its model config)", required=True)
    flags.DEFINE_string("model", "auto", "auto (from config.json) or a preset name for the Emu2 part")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the saved params")
    flags.DEFINE_bool("overwrite", False, "replace an existing --dst (only once the new one is complete)")
    flags.DEFINE_bool("allow_unused_keys", False, "convert even if the checkpoint has keys no component reads")
    flags.DEFINE_bool("allow_nonfinite", False, "convert even if a source tensor holds NaN/Inf values")


if __name__ == "__main__":
    define_flags()
    app.run(main)
