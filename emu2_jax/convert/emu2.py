"""A whole Emu2 / Emu2-Chat checkpoint -> `Emu2Model` params, and a command that writes them as
an `init_from` checkpoint for training.

    python -m emu2_jax.convert.emu2 --checkpoint=DIR_OR_FILE --model=emu2_37b --out=/ckpt/emu2 \
        [--layout=native|hf] [--param_dtype=bfloat16]

`--checkpoint` is a `.safetensors` file, a `.bin`/`.pt` file (read with
`torch.load(weights_only=True)`: nothing arbitrary is unpickled; needs the `convert` extra), or a
directory holding either kind (all shards are read).
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator, Mapping

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


def convert_emu2(state_dict: Mapping[str, np.ndarray], config: Emu2Config, layout: str = "native") -> dict:
    """Returns the `Emu2Model` params tree {visual, connector, llm, project_down} (numpy arrays)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {sorted(LAYOUTS)}")
    if config.connector != "mean_pool":
        raise ValueError("convert_emu2 reads Emu2 checkpoints (mean-pool connector), not Emu v1's")
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


def _read(file: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open  # `flax` framework: numpy cannot hold bfloat16 tensors

        with safe_open(str(file), framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 (safetensors' handle is not a dict)
                yield key, np.asarray(f.get_tensor(key))
    else:
        import torch  # convert-only dependency

        state = torch.load(file, map_location="cpu", weights_only=True)
        for key, tensor in state.items():
            yield key, tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    files = _checkpoint_files(pathlib.Path(path))
    state: dict[str, np.ndarray] = {}
    for i, file in enumerate(files, 1):
        start = time.perf_counter()
        state.update(_read(file))
        print(f"read {file.name} ({i}/{len(files)}) in {time.perf_counter() - start:.1f}s, "
              f"{len(state)} tensors so far", flush=True)
    return state


def main(argv):
    del argv
    from emu2_jax import checkpointing

    args = flags.FLAGS
    config = presets.get_config(args.model, param_dtype=args.param_dtype)
    params = convert_emu2(load_state_dict(args.checkpoint), config, layout=args.layout)
    checkpointing.save_params(args.out, params)
    print(f"wrote {args.out}: use --config.init_from={args.out}")


def _define_flags() -> None:
    """Only when run as a command, so importing this module defines no flags."""
    flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint file or directory", required=True)
    flags.DEFINE_string("model", "emu2_37b", f"preset, one of {sorted(presets.PRESETS)}")
    flags.DEFINE_enum("layout", "native", sorted(LAYOUTS), "key layout of the checkpoint")
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "dtype of the saved params")
    flags.DEFINE_string("out", None, "output directory (an init_from checkpoint)", required=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
