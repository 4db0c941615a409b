"""A whole Emu2 / Emu2-Chat state dict in memory -> `Emu2Model` params (the reference the streaming
`python -m emu2_jax.convert` is tested against), and the old command, now an alias of that one:

    python -m emu2_jax.convert.emu2 --checkpoint=DIR_OR_FILE --model=emu2_37b --out=/ckpt/emu2 \
        [--layout=native|hf] [--param_dtype=bfloat16]

`load_state_dict` reads a `.safetensors` file, a `.bin`/`.pt` file (read with
`torch.load(weights_only=True)`: nothing arbitrary is unpickled; needs the `convert` extra), or a
directory holding either kind (all shards are read).

Strict by default, as a silently wrong conversion costs a training run: keys no component reads
are an error (`--allow_unused_keys` converts anyway), so is a NaN/Inf in any source tensor
(`--allow_nonfinite`), and an existing `--out` is refused before anything is read.
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from absl import app, flags

from emu2_jax.convert.eva_vit import convert_eva_vit
from emu2_jax.convert.llama import convert_llama
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


def _checkpoint_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint={path} does not exist")
    files = sorted(path.glob("*.safetensors")) or sorted([*path.glob("*.bin"), *path.glob("*.pt")])
    if not files:
        raise FileNotFoundError(f"--checkpoint={path} holds no .safetensors, .bin or .pt files")
    return files


def _read(file: pathlib.Path) -> Iterator[tuple[str, Any]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open  # `flax` framework: numpy cannot hold bfloat16 tensors

        with safe_open(str(file), framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 (safetensors' handle is not a dict)
                yield key, np.asarray(f.get_tensor(key))
    else:
        import torch  # convert-only dependency

        state = torch.load(file, map_location="cpu", weights_only=True)
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
            yield key, value  # weights_only still unpickles plain values (a step count): the caller refuses them


def _count_nonfinite(tensor: np.ndarray) -> int:
    if tensor.dtype.kind in "biu":  # bool / int / uint: always finite
        return 0
    return int(tensor.size - np.count_nonzero(np.isfinite(tensor)))


def load_state_dict(path: str, *, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint file(s) at `path`; errors name the file (and the tensor).

    A NaN/Inf in a source tensor is an error unless `allow_nonfinite`: training from it would only
    show NaN losses, far from the cause.
    """
    files = _checkpoint_files(pathlib.Path(path))
    state: dict[str, np.ndarray] = {}
    for i, file in enumerate(files, 1):
        start = time.perf_counter()
        try:
            tensors = dict(_read(file))
        except Exception as e:  # safetensors' and torch's errors do not say which file
            raise ValueError(f"{file}: cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from e
        for key, tensor in tensors.items():
            if not isinstance(tensor, np.ndarray):
                raise ValueError(f"{file}: {key!r} is a {type(tensor).__name__}, not a tensor")
            bad = 0 if allow_nonfinite else _count_nonfinite(tensor)
            if bad:
                raise ValueError(f"{file}: tensor {key!r} holds {bad} NaN/Inf value(s) of {tensor.size}; pass "
                                 f"--allow_nonfinite (allow_nonfinite=True) to convert anyway")
        state.update(tensors)
        print(f"read {file.name} ({i}/{len(files)}) in {time.perf_counter() - start:.1f}s, "
              f"{len(state)} tensors so far", flush=True)
    return state


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
