"""A whole Emu2 / Emu2-Chat state dict in memory -> `Emu2Model` params (the reference the streaming
`python -m emu2_jax.convert` is tested against), and the old command, now an alias of that one:

    python -m emu2_jax.convert.emu2 --checkpoint=DIR_OR_FILE --model=emu2_37b --out=/ckpt/emu2 \
        [--layout=native|hf] [--param_dtype=bfloat16]

`load_state_dict` reads a `.safetensors` file, a `.bin`/`.pt` file (read with
`torch.load(weights_only=True)`: nothing arbitrary is unpickled; needs the `convert` extra), or a
directory holding either kind (the shards its index names, or all of them).

Strict by default, as a silently wrong conversion costs a training run: keys no component reads
are an error (`--allow_unused_keys` converts anyway), so is a NaN/Inf in any source tensor
(`--allow_nonfinite`), and an existing `--out` is refused before anything is read.
"""
from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping

import numpy as np
from absl import app, flags

from emu2_jax.convert.eva_vit import convert_eva_vit
from emu2_jax.convert.llama import convert_llama
from emu2_jax.convert.source import Source, source_files
from emu2_jax.models import presets
from emu2_jax.models.emu2 import Emu2Config

# Where each component lives in the two published layouts (docs/model.md#checkpoint-layouts).
LAYOUTS = {
    "native": {"visual": "visual.", "llm": "decoder.lm.", "project_up": "project_up.weight",
               "project_down": "project_down.weight"},
    "hf": {"visual": "model.visual.", "llm": "model.decoder.lm.", "project_up": "project_up.weight",
           "project_down": "project_down.weight"},
}


def _linear_kernel(state_dict: Mapping[str, np.ndarray], key: str, shape: tuple[int, int], dtype) -> np.ndarray:
    if key not in state_dict:
        raise ValueError(f"checkpoint has no {key!r}")
    weight = np.asarray(state_dict[key])
    if weight.shape != shape[::-1]:
        raise ValueError(f"{key}: checkpoint shape {weight.shape}, model expects {shape[::-1]} ([out, in])")
    return weight.T.astype(dtype)


def unused_keys(keys: Iterable[str], layout: str) -> list[str]:
    """The keys outside every component's prefix in `layout`: no converter reads them. (Keys inside
    a prefix are the component converters' business: they refuse unexpected ones themselves.)"""
    names = LAYOUTS[layout]
    read = (names["visual"], names["llm"] + "model.", names["llm"] + "lm_head.")
    return sorted(k for k in keys if not k.startswith(read) and k not in (names["project_up"], names["project_down"]))


def convert_emu2(state_dict: Mapping[str, np.ndarray], config: Emu2Config, layout: str = "native", *,
                 allow_unused_keys: bool = False) -> dict:
    """Returns the `Emu2Model` params tree {visual, connector, llm, project_down} (numpy arrays).

    Keys no component reads (another model's weights, a layout mix-up) are an error unless
    `allow_unused_keys`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {sorted(LAYOUTS)}")
    if config.connector != "mean_pool":
        raise ValueError("convert_emu2 reads Emu2 checkpoints (mean-pool connector), not Emu v1's")
    unused = unused_keys(state_dict, layout)
    if unused and not allow_unused_keys:
        raise ValueError(f"checkpoint has {len(unused)} key(s) that no component reads: {unused[:10]}"
                         f"{' ...' if len(unused) > 10 else ''} (layout {layout!r}); pass --allow_unused_keys "
                         f"(allow_unused_keys=True) to convert anyway")
    keys = LAYOUTS[layout]
    dtype = config.llm.param_dtype
    vision_width, llm_width = config.vision.width, config.llm.hidden_size
    return {
        "visual": convert_eva_vit(state_dict, config.vision, prefix=keys["visual"]),
        "connector": {"project_up": {"kernel": _linear_kernel(state_dict, keys["project_up"],
                                                               (vision_width, llm_width), dtype)}},
        "llm": convert_llama(state_dict, config.llm, prefix=keys["llm"]),
        "project_down": {"kernel": _linear_kernel(state_dict, keys["project_down"],
                                                  (llm_width, vision_width), dtype)},
    }


def load_state_dict(path: str, *, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint file(s) at `path` in memory, read by the streaming converter's
    `Source` (same checks, same one-line errors naming the file and the tensor)."""
    source = Source(source_files(pathlib.Path(path)), allow_nonfinite=allow_nonfinite)
    return {key: source[key] for key in source}


def main(argv):
    """The old command, now a thin alias of the streaming `python -m emu2_jax.convert` (the layout is
    detected, so `--layout` only has to agree with it)."""
    del argv
    from emu2_jax.convert.__main__ import convert

    args = flags.FLAGS
    if pathlib.Path(args.out).exists():
        raise SystemExit(f"--out={args.out}: already exists; choose a new directory")
    try:
        layout = convert(args.checkpoint, args.out, model=args.model, dtype=args.param_dtype,
                         allow_unused_keys=args.allow_unused_keys, allow_nonfinite=args.allow_nonfinite)
    except (ValueError, FileNotFoundError) as e:  # messages name the file / key and what is wrong
        raise SystemExit(str(e)) from None
    if layout != args.layout:
        print(f"note: --layout={args.layout}, but the checkpoint is in the {layout} layout (converted as such)")


def _define_flags() -> None:
    """Only when run as a command, so importing this module defines no flags."""
    flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint file or directory", required=True)
    flags.DEFINE_string("model", "emu2_37b", f"preset, one of {sorted(presets.PRESETS)}, or auto (config.json)")
    flags.DEFINE_enum("layout", "native", sorted(LAYOUTS), "key layout of the checkpoint")
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "dtype of the saved params")
    flags.DEFINE_string("out", None, "output directory (an init_from checkpoint)", required=True)
    flags.DEFINE_bool("allow_unused_keys", False, "convert even if the checkpoint has keys no component reads")
    flags.DEFINE_bool("allow_nonfinite", False, "convert even if a source tensor holds NaN/Inf values")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
