"""`python -m emu2_jax.export`: source -> convert -> export gives back every tensor bit for bit, in
the native, HF and diffusers layouts, sharded with an index when over the size limit."""
import json
import pathlib
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from emu2_jax.convert.__main__ import convert
from emu2_jax.convert.source import Source, source_files
from emu2_jax.export import export
from tests import cli
from tests.convert.test_convert_command import EMU_CONFIG, UNET_CONFIG, VAE_CONFIG, _write_json, states  # noqa: F401
from tests.models.test_unet import TINY_SD15_DIFFUSERS, state_dict_np, torch_unet


def _read_all(folder: pathlib.Path) -> dict[str, np.ndarray]:
    source = Source(source_files(folder))
    return {k: source[k] for k in source}


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key].view(np.uint8), np.ascontiguousarray(value).view(np.uint8), err_msg=key)


def test_native_round_trip_sharded(tmp_path, states):  # noqa: F811
    save_file(states["emu2"], str(tmp_path / "model.safetensors"))
    _write_json(tmp_path / "config.json", EMU_CONFIG)
    convert(str(tmp_path / "model.safetensors"), str(tmp_path / "jax"))
    export(str(tmp_path / "jax"), str(tmp_path / "back"), "native", max_shard_bytes=400_000)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    _assert_same(_read_all(tmp_path / "back"), states["emu2"])
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vision_config"]["head_width"] == 16
    # and the exported folder converts again to the same checkpoint
    convert(str(tmp_path / "back"), str(tmp_path / "jax2"))


def test_hf_round_trip_bfloat16(tmp_path, states):  # noqa: F811
    hf = {("model." + k if k.startswith(("visual.", "decoder.")) else k): v.astype(ml_dtypes.bfloat16)
          for k, v in states["emu2"].items()}
    import torch
    from safetensors.torch import save_file as save_torch

    save_torch({k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in hf.items()},
               str(tmp_path / "model.safetensors"))
    _write_json(tmp_path / "config.json", EMU_CONFIG)
    convert(str(tmp_path), str(tmp_path / "jax"), dtype="bfloat16")
    export(str(tmp_path / "jax"), str(tmp_path / "back"), "hf")
    _assert_same(_read_all(tmp_path / "back"), hf)


def test_gen_round_trips_native_and_diffusers(tmp_path, states):  # noqa: F811
    sd15 = state_dict_np(torch_unet(TINY_SD15_DIFFUSERS))  # 1x1-conv proj_in / proj_out
    state = {f"multimodal_encoder.{k}": v for k, v in states["emu2"].items()}
    state.update({f"unet.{k}": v for k, v in sd15.items()})
    state.update({f"vae.{k}": v for k, v in states["vae"].items()})
    save_file(dict(state, **{"safety_checker.w": np.ones(2, np.float32)}), str(tmp_path / "gen.safetensors"))
    _write_json(tmp_path / "config.json", EMU_CONFIG)
    _write_json(tmp_path / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", **TINY_SD15_DIFFUSERS})
    _write_json(tmp_path / "vae" / "config.json", VAE_CONFIG)
    convert(str(tmp_path / "gen.safetensors"), str(tmp_path / "jax"))
    export(str(tmp_path / "jax"), str(tmp_path / "native"), "native")
    _assert_same(_read_all(tmp_path / "native" / "model.safetensors"), state)  # safety checker dropped
    result = cli.run([sys.executable, "-m", "emu2_jax.export", f"--src={tmp_path / 'jax'}",
                      f"--dst={tmp_path / 'diffusers'}", "--layout=diffusers"])
    assert result.returncode == 0, result.stderr[-2000:]
    back = tmp_path / "diffusers"
    assert sorted(p.name for p in back.iterdir()) == ["multimodal_encoder", "unet", "vae"]
    _assert_same(_read_all(back / "unet"), sd15)
    _assert_same(_read_all(back / "vae"), states["vae"])
    hf = {("model." + k if k.startswith(("visual.", "decoder.")) else k): v for k, v in states["emu2"].items()}
    _assert_same(_read_all(back / "multimodal_encoder"), hf)
    assert json.loads((back / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"


def test_export_refusals(tmp_path, states):  # noqa: F811
    save_file(states["vae"], str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _write_json(tmp_path / "config.json", VAE_CONFIG)
    convert(str(tmp_path), str(tmp_path / "jax"))
    with pytest.raises(ValueError, match=r"holds no Emu2 model \(\['vae'\]\); use --layout=diffusers"):
        export(str(tmp_path / "jax"), str(tmp_path / "back"), "native")
    (tmp_path / "back").mkdir()
    with pytest.raises(ValueError, match=r"back: already exists; pass --overwrite"):
        export(str(tmp_path / "jax"), str(tmp_path / "back"), "diffusers")
    export(str(tmp_path / "jax"), str(tmp_path / "back"), "diffusers", overwrite=True)
    _assert_same(_read_all(tmp_path / "back" / "vae"), states["vae"])


def test_lora_training_run_exports_merged_weights(tmp_path):
    """A training workdir with LoRA adapters exports as a plain model: no adapter keys, each adapted
    projection W + (alpha / rank) A B (llama.merge_lora, checked against the adapted forward in
    tests/models/test_llama.py)."""
    import jax

    from configs import stage2
    from emu2_jax import checkpointing
    from emu2_jax.models import llama

    config = stage2.get_config("tiny")
    config.model_overrides.llm = {"lora_rank": 2, "lora_alpha": 4.0}
    run = cli.write_initial_checkpoint(tmp_path / "run", config)
    model_config, params = checkpointing.load_pretrained(str(run))
    assert model_config["emu2"].llm.lora_rank == 2
    export(str(run), str(tmp_path / "back"), "native")
    tensors = _read_all(tmp_path / "back")
    assert not [k for k in tensors if "lora" in k]
    merged = llama.merge_lora(jax.device_get(params["llm"]), model_config["emu2"].llm)
    q = np.asarray(merged["layers"]["attn"]["q"]["kernel"][0])  # [D, heads, hd] -> torch [heads * hd, D]
    np.testing.assert_array_equal(tensors["decoder.lm.model.layers.0.self_attn.q_proj.weight"],
                                  q.reshape(q.shape[0], -1).T)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["hidden_size"] == model_config["emu2"].llm.hidden_size
