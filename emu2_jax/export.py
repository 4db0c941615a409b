r"""A converted checkpoint (or training run) back to PyTorch layouts, bit-exact:

    python -m emu2_jax.export --src=DIR --dst=DIR --layout=native|hf|diffusers [--max_shard_gb=5] [--overwrite]

Layouts (docs/model.md#checkpoint-layouts):
  native     Emu2 keys (`visual.`, `decoder.lm.`, `project_up/down`); with a UNet / VAE, the Emu2-Gen
             single-checkpoint keys (`multimodal_encoder.`, `unet.`, `vae.`) plus `unet/config.json`,
             `vae/config.json`
  hf         BAAI/Emu2 keys (`model.visual.`, `model.decoder.lm.`), Emu2 only
  diffusers  folders: `multimodal_encoder/` (hf keys), `unet/`, `vae/` with diffusers file names
Each folder gets safetensors shards of at most `--max_shard_gb` (with `<name>.safetensors.index.json`
when there is more than one),
and its `config.json` (HF `EmuConfig` fields, or the diffusers config the checkpoint was made from).
Every conversion rule is inverted exactly (transposes and reshapes only), so source -> convert ->
export gives back the same bytes. Unlike the converter, export restores the whole params tree with
`checkpointing.load_pretrained` first (host memory holds the model); it is not streaming. `--src` may
also be an LLM stage's training workdir; LoRA adapters (Emu v1 chat tuning) are merged into the
weights they adapt, W + (alpha / rank) A B, and the written model has none.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import app, flags
from flax import traverse_util

from emu2_jax import checkpointing
from emu2_jax.convert.diffusers import _SCANNED, _torch_stem
from emu2_jax.convert.layouts import emu2_config_to_hf
from emu2_jax.convert.llama import llama_entries
from emu2_jax.convert.stream import _stored
from emu2_jax.models import llama
from emu2_jax.models.emu2 import Emu2Config


def _leaf_reader(params: dict) -> Any:
    def read(path: tuple[str, ...], slot: int | None = None) -> np.ndarray:
        node = params
        for name in path:
            node = node[name]
        return np.asarray(node if slot is None else node[slot])
    return read


def emu2_tensors(read: Any, config: Emu2Config, visual: str, llm: str, proj: str) -> Iterator[tuple[str, np.ndarray]]:
    """(PyTorch key, tensor) of the Emu2 model, the inverse of `convert.__main__.emu2_writes`."""
    vc, lc = config.vision, config.llm
    if vc.swiglu or vc.sub_ln or vc.use_rope or vc.final_norm or not vc.qkv_bias:
        raise ValueError("export writes Emu2's EVA tower (fused qkv with q/v biases, GELU MLP) only")
    e = vc.width
    yield visual + "cls_token", read(("visual", "cls_token"))
    yield visual + "pos_embed", read(("visual", "pos_embed"))
    yield visual + "patch_embed.proj.weight", read(("visual", "patch_embed", "kernel")).transpose(3, 2, 0, 1)
    yield visual + "patch_embed.proj.bias", read(("visual", "patch_embed", "bias"))
    for i in range(vc.depth):
        p, b = f"{visual}blocks.{i}.", ("visual", "blocks")
        for norm in ("norm1", "norm2"):
            yield f"{p}{norm}.weight", read((*b, norm, "scale"), i)
            yield f"{p}{norm}.bias", read((*b, norm, "bias"), i)
        qkv = np.stack([read((*b, "attn", n, "kernel"), i) for n in "qkv"], axis=1)  # [E, 3, H, d]
        yield p + "attn.qkv.weight", qkv.reshape(e, 3 * e).T
        yield p + "attn.q_bias", read((*b, "attn", "q", "bias"), i).reshape(e)
        yield p + "attn.v_bias", read((*b, "attn", "v", "bias"), i).reshape(e)
        yield p + "attn.proj.weight", read((*b, "attn", "proj", "kernel"), i).reshape(e, e).T
        yield p + "attn.proj.bias", read((*b, "attn", "proj", "bias"), i)
        for fc in ("fc1", "fc2"):
            yield f"{p}mlp.{fc}.weight", read((*b, "mlp", fc, "kernel"), i).T
            yield f"{p}mlp.{fc}.bias", read((*b, "mlp", fc, "bias"), i)
    layer_entries, top_entries = llama_entries(lc)

    def torch_layout(value: np.ndarray, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        return value.reshape(shape[::-1]).T if path[-1] == "kernel" else value

    for suffix, shape, path, _ in top_entries:
        yield llm + suffix, torch_layout(read(("llm", *path)), path, shape)
    for i in range(lc.num_layers):
        for suffix, shape, path, _ in layer_entries:
            yield f"{llm}model.layers.{i}.{suffix}", torch_layout(read(("llm", "layers", *path), i), path, shape)
    yield proj + "project_up.weight", read(("connector", "project_up", "kernel")).T
    yield proj + "project_down.weight", read(("project_down", "kernel")).T


def diffusers_tensors(read: Any, component: str, target: dict, diffusers_config: dict, prefix: str
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `convert.diffusers._to_flax` for every leaf of a UNet / VAE."""
    conv_projections = not diffusers_config.get("use_linear_projection", False)
    for path, leaf in traverse_util.flatten_dict(target).items():
        name = path[-1]
        stem = prefix + _torch_stem(path) + "." + ("bias" if name == "bias" else "weight")
        for slot in range(leaf.shape[0]) if _SCANNED in path else [None]:
            value = read((component, *path), slot)
            if name == "kernel" and value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            elif name == "kernel":
                # Flax splits heads off the output side, except in `to_out` where they are the input.
                inputs = int(np.prod(value.shape[:-1])) if "to_out_0" in path else value.shape[0]
                value = value.reshape(inputs, -1).T
                if conv_projections and path[-2] in ("proj_in", "proj_out") and component == "unet":
                    value = value[:, :, None, None]  # a 1x1 Conv2d without use_linear_projection
            else:
                value = value.reshape(-1)
            yield (stem.format(slot) if slot is not None else stem), value


class ShardWriter:
    """Safetensors shards of at most `max_bytes` plus their index, in `folder`."""

    def __init__(self, folder: pathlib.Path, name: str, max_bytes: int):
        self.folder, self.name, self.max_bytes = folder, name, max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self.written = 0  # shards flushed so far
        self.current: dict[str, np.ndarray] = {}
        self.size = 0
        self.weight_map: dict[str, int] = {}
        self.total = 0

    def add(self, key: str, value: np.ndarray) -> None:
        value = _stored(value, value.dtype)
        if self.current and self.size + value.nbytes > self.max_bytes:
            self._flush()
        self.current[key], self.size = value, self.size + value.nbytes
        self.weight_map[key], self.total = self.written, self.total + value.nbytes

    def _flush(self) -> None:
        import torch
        from safetensors.torch import save_file

        def to_torch(a: np.ndarray) -> torch.Tensor:  # numpy has no bfloat16: through the raw bits
            if str(a.dtype) == "bfloat16":
                return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(a)

        save_file({k: to_torch(v) for k, v in self.current.items()},
                  str(self.folder / f"{self.name}.part{self.written}"))  # named once the count is known
        self.written += 1
        self.current, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        stem, n = self.name.removesuffix(".safetensors"), self.written
        names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else self.name for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f"{self.name}.part{i}").rename(self.folder / name)
        if n > 1:
            (self.folder / f"{self.name}.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total},
                 "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}, indent=1))


def export(src: str, dst: str, layout: str, *, max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> None:
    """Writes the checkpoint at `src` (see `checkpointing.load_pretrained`) into `dst` in `layout`."""
    from emu2_jax.convert.diffusers import unet_target, vae_target

    out = pathlib.Path(dst).absolute()
    if out.exists() and not overwrite:
        raise ValueError(f"--dst={dst}: already exists; pass --overwrite to replace it")
    if layout not in ("native", "hf", "diffusers"):
        raise ValueError(f"--layout={layout}: expected native, hf or diffusers")
    config, params = checkpointing.load_pretrained(src)
    if "emu2" not in config and layout != "diffusers":
        raise ValueError(f"--src={src}: holds no Emu2 model ({sorted(config)}); use --layout=diffusers")
    if layout == "hf" and ("unet" in config or "vae" in config):
        raise ValueError(f"--layout=hf writes Emu2 only; {src} also holds {sorted(set(config) - {'emu2'})}: use "
                         f"--layout=native or diffusers")
    if "emu2" in config and config["emu2"].connector != "mean_pool":
        raise ValueError(f"--src={src}: an Emu v1 model (Causal Transformer connector); export writes the Emu2 "
                         f"layouts only")
    if "emu2" in config and config["emu2"].llm.lora_rank:  # Emu v1 chat tuning: adapters folded in
        lora = config["emu2"].llm
        params = {**params, "llm": llama.merge_lora(params["llm"], lora)}
        config = {**config, "emu2": dataclasses.replace(config["emu2"],
                                                        llm=dataclasses.replace(lora, lora_rank=0))}
        print(f"export: LoRA adapters (rank {lora.lora_rank}, alpha {lora.lora_alpha:g}) merged into the weights")
    read = _leaf_reader(params)
    model_file = pathlib.Path(src) / "emu2_jax_model.json"  # converted checkpoints; training runs have none
    saved = json.loads(model_file.read_text()) if model_file.is_file() else {}
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    gen_file = layout == "native" and ("unet" in config or "vae" in config)
    subfolders = {"emu2": "multimodal_encoder", "unet": "unet", "vae": "vae"}
    folders = {part: tmp / (sub if layout == "diffusers" else "") for part, sub in subfolders.items()}
    writers: dict[pathlib.Path, ShardWriter] = {}
    try:
        for part in ("emu2", "unet", "vae"):
            if part not in config:
                continue
            folder = folders[part]
            diffusers_file = part != "emu2" and layout == "diffusers"
            name = "diffusion_pytorch_model.safetensors" if diffusers_file else "model.safetensors"
            writer = writers.setdefault(folder, ShardWriter(folder, name, max_shard_bytes))
            if part == "emu2":
                outer = "multimodal_encoder." if gen_file else ""
                hf = layout in ("hf", "diffusers")
                inner = outer + ("model." if hf else "")
                tensors = emu2_tensors(read, config["emu2"], inner + "visual.", inner + "decoder.lm.", outer)
                (folder / "config.json").write_text(json.dumps(emu2_config_to_hf(config["emu2"]), indent=1))
            else:
                target = (unet_target if part == "unet" else vae_target)(config[part])
                tensors = diffusers_tensors(read, part, target, saved[part], f"{part}." if gen_file else "")
                config_dir = (tmp / part) if gen_file else folder
                config_dir.mkdir(parents=True, exist_ok=True)
                (config_dir / "config.json").write_text(json.dumps(saved[part], indent=1))
            for key, value in tensors:
                writer.add(key, value)
        for writer in writers.values():
            writer.close()
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"export: wrote {dst} ({layout} layout)")


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        export(f.src, f.dst, f.layout, max_shard_bytes=int(f.max_shard_gb * 2 ** 30), overwrite=f.overwrite)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    flags.DEFINE_string("src", None, "converted checkpoint (python -m emu2_jax.convert)", required=True)
    flags.DEFINE_string("dst", None, "output folder", required=True)
    flags.DEFINE_enum("layout", "native", ["native", "hf", "diffusers"], "published layout to write")
    flags.DEFINE_float("max_shard_gb", 5.0, "largest safetensors shard, GiB")
    flags.DEFINE_bool("overwrite", False, "replace an existing --dst")
    app.run(main)
