"""`python -m emu2_jax.convert`: every layout from tiny torch-built checkpoints with their config.json,
loaded back with `checkpointing.load_pretrained` and compared tensor by tensor with the in-memory
converters (themselves checked against the PyTorch references in the parity tests)."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from emu2_jax import checkpointing
from emu2_jax.convert.__main__ import convert
from emu2_jax.convert.diffusers import convert_unet, convert_vae
from emu2_jax.convert.emu2 import convert_emu2
from emu2_jax.models import emu2, presets, unet, vae
from tests import cli
from tests.convert.test_emu2_convert import _batch
from tests.models.test_unet import TINY_SDXL_DIFFUSERS, torch_unet
from tests.models.test_vae import TINY_VAE_DIFFUSERS, torch_vae
from tests.torch_refs import emu2_reference, emu2_reference_forward, state_dict_np

CFG = presets.get_config("tiny")
# The HF `EmuConfig` of the tiny preset (LLaMA fields, vision_config, model_version).
EMU_CONFIG = {
    "architectures": ["EmuForCausalLM"], "model_type": "emu", "model_version": "chat",
    "vocab_size": CFG.llm.vocab_size, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
    "vision_config": {"image_size": 56, "patch_size": 14, "width": 64, "layers": 2, "head_width": 16,
                      "mlp_ratio": 2.0, "qkv_bias": True, "postnorm": True, "n_query": 4, "v_query": 4},
}
UNET_CONFIG = {"_class_name": "UNet2DConditionModel", **TINY_SDXL_DIFFUSERS}
VAE_CONFIG = {"_class_name": "AutoencoderKL", **TINY_VAE_DIFFUSERS}


@pytest.fixture(scope="module")
def states():
    return {"emu2": state_dict_np(emu2_reference(CFG, seed=2)),
            "unet": state_dict_np(torch_unet(TINY_SDXL_DIFFUSERS)), "vae": state_dict_np(torch_vae(TINY_VAE_DIFFUSERS))}


@pytest.fixture(scope="module")
def expected(states):
    return {"emu2": convert_emu2(states["emu2"], CFG),
            "unet": convert_unet(states["unet"], unet.unet_config_from_diffusers(UNET_CONFIG)),
            "vae": convert_vae(states["vae"], vae.vae_config_from_diffusers(VAE_CONFIG))}


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _save_sharded(state: dict, folder, name: str, shards: int = 2):
    """`state` as `shards` safetensors files plus their `<name>.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"{name.split('.')[0]}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    _write_json(folder / f"{name}.index.json", {"metadata": {}, "weight_map": weight_map})


def _check(dst, expected, parts):
    model_config, params = checkpointing.load_pretrained(str(dst))
    assert sorted(model_config) == sorted(parts)
    assert sorted(params) == sorted(c for p in parts for c in (emu2.COMPONENTS if p == "emu2" else [p]))
    for part in parts:
        want = expected[part] if part != "emu2" else expected["emu2"]
        got = {c: params[c] for c in want} if part == "emu2" else params[part]
        jax.tree.map(np.testing.assert_array_equal, got, want)
    return model_config, params


def test_native_sharded_with_inv_freq(tmp_path, states, expected, capsys):
    state = dict(states["emu2"], **{"decoder.lm.model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(16, np.float32)})
    _save_sharded(state, tmp_path / "src", "model.safetensors", shards=3)
    _write_json(tmp_path / "src" / "config.json", EMU_CONFIG)
    assert convert(str(tmp_path / "src"), str(tmp_path / "out")) == "native"
    assert "layout native" in capsys.readouterr().out
    model_config, _ = _check(tmp_path / "out", expected, ["emu2"])
    assert model_config["emu2"] == CFG


def test_hf_layout_bin_file(tmp_path, states, expected):
    hf = {("model." + k if k.startswith(("visual.", "decoder.")) else k): torch.from_numpy(v)
          for k, v in states["emu2"].items()}
    (tmp_path / "src").mkdir()
    torch.save(hf, tmp_path / "src" / "pytorch_model.bin")
    _write_json(tmp_path / "src" / "config.json", EMU_CONFIG)
    assert convert(str(tmp_path / "src"), str(tmp_path / "out")) == "hf"
    _check(tmp_path / "out", expected, ["emu2"])


def test_gen_native_single_file(tmp_path, states, expected):
    state = {f"multimodal_encoder.{k}": v for k, v in states["emu2"].items()}
    state.update({f"unet.{k}": v for k, v in states["unet"].items()})
    state.update({f"vae.{k}": v for k, v in states["vae"].items()})
    state["safety_checker.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    save_file(state, str(tmp_path / "pytorch_model.safetensors"))
    _write_json(tmp_path / "config.json", EMU_CONFIG)
    _write_json(tmp_path / "unet" / "config.json", UNET_CONFIG)
    _write_json(tmp_path / "vae" / "config.json", VAE_CONFIG)
    assert convert(str(tmp_path / "pytorch_model.safetensors"), str(tmp_path / "out")) == "gen_native"
    model_config, _ = _check(tmp_path / "out", expected, ["emu2", "unet", "vae"])
    assert model_config["unet"] == unet.unet_config_from_diffusers(UNET_CONFIG)


def test_gen_diffusers_folder_bf16_variant(tmp_path, states, expected):
    src = tmp_path / "Emu2-Gen"
    hf = {("model." + k if k.startswith(("visual.", "decoder.")) else k): v for k, v in states["emu2"].items()}
    _save_sharded(hf, src / "multimodal_encoder", "model.bf16.safetensors")
    _write_json(src / "multimodal_encoder" / "config.json", EMU_CONFIG)
    (src / "unet").mkdir()
    save_file(states["unet"], str(src / "unet" / "diffusion_pytorch_model.bf16.safetensors"))
    _write_json(src / "unet" / "config.json", UNET_CONFIG)
    (src / "vae").mkdir()
    save_file(states["vae"], str(src / "vae" / "diffusion_pytorch_model.bf16.safetensors"))
    _write_json(src / "vae" / "config.json", VAE_CONFIG)
    (src / "tokenizer").mkdir()
    assert convert(str(src), str(tmp_path / "out")) == "gen_diffusers"
    _check(tmp_path / "out", expected, ["emu2", "unet", "vae"])


def test_plain_diffusers_vae_folder_bfloat16(tmp_path, states, expected):
    save_file(states["vae"], str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _write_json(tmp_path / "config.json", VAE_CONFIG)
    assert convert(str(tmp_path), str(tmp_path / "out"), dtype="bfloat16") == "diffusers"
    model_config, params = checkpointing.load_pretrained(str(tmp_path / "out"))
    assert list(model_config) == ["vae"] and model_config["vae"].param_dtype == "bfloat16"
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), w.astype("bfloat16")),
                 params["vae"], expected["vae"])


def test_converted_model_matches_pytorch_reference(tmp_path):
    reference = emu2_reference(CFG, seed=5)
    save_file(state_dict_np(reference), str(tmp_path / "model.safetensors"))
    convert(str(tmp_path / "model.safetensors"), str(tmp_path / "out"), model="tiny")
    model_config, params = checkpointing.load_pretrained(str(tmp_path / "out"))
    batch = _batch(np.random.default_rng(5), model_config["emu2"])
    ours = emu2.Emu2Model(model_config["emu2"]).apply({"params": params}, batch)
    with torch.no_grad():
        ref = emu2_reference_forward(reference, {k: torch.from_numpy(v) for k, v in batch.items()}, CFG)
    assert np.abs(np.asarray(ours.text_logits) - ref["logits"].numpy()).max() <= 1e-4
    assert np.abs(np.asarray(ours.visual_pred) - ref["visual_pred"].numpy()).max() <= 1e-4


def test_sharded_restore_on_8_device_mesh(tmp_path, states, expected):
    save_file(states["emu2"], str(tmp_path / "model.safetensors"))
    _write_json(tmp_path / "config.json", EMU_CONFIG)
    convert(str(tmp_path / "model.safetensors"), str(tmp_path / "out"))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    _, params = checkpointing.load_pretrained(str(tmp_path / "out"), mesh=mesh)
    q = params["llm"]["layers"]["attn"]["q"]["kernel"]  # [2, 128, 4, 32]: split along its 128 rows
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (2, 16, 4, 32)
    jax.tree.map(np.testing.assert_array_equal, {c: params[c] for c in expected["emu2"]}, expected["emu2"])


# ---- errors: one line naming the input; nothing left at --dst.


def _native(tmp_path, state, name="model.safetensors"):
    save_file(state, str(tmp_path / name))
    _write_json(tmp_path / "config.json", EMU_CONFIG)
    return str(tmp_path / name)


@pytest.mark.parametrize("change, message", [
    ("missing", r"checkpoint has no 'decoder.lm.model.layers.1.mlp.up_proj.weight'"),
    ("extra", r"1 key\(s\) that no component reads: \['decoder.extra.weight'\].*--allow_unused_keys"),
    ("misshapen", r"decoder.lm.model.layers.0.mlp.down_proj.weight: shape \(128, 255\), expected \(128, 256\)"),
    ("int", r"model.safetensors: tensor 'decoder.lm.model.norm.weight' has dtype int32, not a float type"),
])
def test_bad_keys_are_named_and_leave_nothing(tmp_path, states, change, message):
    state = dict(states["emu2"])
    if change == "missing":
        del state["decoder.lm.model.layers.1.mlp.up_proj.weight"]
    elif change == "extra":
        state["decoder.extra.weight"] = np.zeros(3, np.float32)
    elif change == "misshapen":
        state["decoder.lm.model.layers.0.mlp.down_proj.weight"] = np.zeros((128, 255), np.float32)
    else:
        state["decoder.lm.model.norm.weight"] = np.ones(128, np.int32)
    with pytest.raises(ValueError, match=message):
        convert(_native(tmp_path, state), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_truncated_safetensors_and_pickled_values(tmp_path, states):
    path = _native(tmp_path, states["emu2"])
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read it \(.+\)"):
        convert(path, str(tmp_path / "out"))
    (tmp_path / "model.safetensors").unlink()
    torch.save({"visual.cls_token": torch.zeros(1, 1, 64), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: 'step' is a int, not a tensor"):
        convert(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_command_existing_output_and_overwrite(tmp_path, states, expected):
    src = _native(tmp_path, states["emu2"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    command = [sys.executable, "-m", "emu2_jax.convert", f"--src={src}", f"--dst={out}"]
    result = cli.run(command)
    assert result.returncode == 1
    assert cli.message_lines(result.stderr) == [f"--dst={out}: already exists; pass --overwrite to replace it"]
    assert (out / "keep").exists()
    result = cli.run([*command, "--overwrite"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "layout native" in result.stdout and "GB/s" in result.stdout and "ETA" in result.stdout
    assert not (out / "keep").exists()
    _check(out, expected, ["emu2"])


def test_nonfinite_tensors_refused_unless_allowed(tmp_path, states):
    state = dict(states["emu2"])
    norm = state["decoder.lm.model.norm.weight"].copy()
    norm[[3, 7]] = [np.nan, -np.inf]
    path = _native(tmp_path, dict(state, **{"decoder.lm.model.norm.weight": norm}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'decoder.lm.model.norm.weight' holds 2 NaN/Inf "
                                         r"value\(s\) of 128; pass --allow_nonfinite"):
        convert(path, str(tmp_path / "out"))
    convert(path, str(tmp_path / "out"), allow_nonfinite=True)
    _, params = checkpointing.load_pretrained(str(tmp_path / "out"))
    assert np.isnan(params["llm"]["norm"]["scale"][3]) and np.isneginf(params["llm"]["norm"]["scale"][7])


def test_train_config_takes_the_model_from_a_converted_init_from(tmp_path, states):
    from configs import stage1
    from emu2_jax.tasks import llm

    convert(_native(tmp_path, states["emu2"]), str(tmp_path / "out"))
    config = stage1.get_config("tiny")
    config.model = "small"  # replaced by the checkpoint's model
    config.init_from = str(tmp_path / "out")
    config.model_overrides.dtype = "bfloat16"
    model = llm.model_config(config)
    assert model.llm.hidden_size == 128 and model.vision.width == 64 and model.llm.dtype == jnp.bfloat16


def test_incomplete_emu1_and_unknown_layouts_are_refused(tmp_path):
    save_file({"cformer.query": np.zeros((2, 4), np.float32), "visual.cls_token": np.zeros(4, np.float32)},
              str(tmp_path / "emu1.safetensors"))  # Emu v1 conversion: tests/convert/test_emu1_convert.py
    with pytest.raises(ValueError, match=r"Emu v1 checkpoint has no 'visual.patch_embed.proj.weight'"):
        convert(str(tmp_path / "emu1.safetensors"), str(tmp_path / "out"))
    save_file({"encoder.weight": np.zeros(4, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other.safetensors: unknown layout \(first keys \['encoder.weight'\]\)"):
        convert(str(tmp_path / "other.safetensors"), str(tmp_path / "out"))
    bare = tmp_path / "bare"  # native keys, no config.json
    bare.mkdir()
    save_file({"visual.cls_token": np.zeros(4, np.float32), "decoder.lm.lm_head.weight": np.zeros(4, np.float32)},
              str(bare / "model.safetensors"))
    with pytest.raises(ValueError, match=r"bare: no config.json to size the model from; pass --model=<preset>"):
        convert(str(bare), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_autoencode_command_runs_a_converted_emu2_gen(tmp_path, states):
    """Converted weights need nothing else: the command builds the decoder from their model config."""
    from PIL import Image

    unet_cfg = dict(TINY_SDXL_DIFFUSERS, cross_attention_dim=64, projection_class_embeddings_input_dim=64 + 6 * 8)
    state = {f"multimodal_encoder.{k}": v for k, v in states["emu2"].items()}
    state.update({f"unet.{k}": v for k, v in state_dict_np(torch_unet(unet_cfg)).items()})
    state.update({f"vae.{k}": v for k, v in states["vae"].items()})
    save_file(state, str(tmp_path / "gen.safetensors"))
    _write_json(tmp_path / "config.json", EMU_CONFIG)
    _write_json(tmp_path / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", **unet_cfg})
    _write_json(tmp_path / "vae" / "config.json", VAE_CONFIG)
    convert(str(tmp_path / "gen.safetensors"), str(tmp_path / "gen"))
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    result = cli.run([sys.executable, "-m", "emu2_jax.autoencode", f"--checkpoint={tmp_path / 'gen'}",
                      f"--image={tmp_path / 'in.png'}", f"--out={tmp_path / 'out.png'}", "--steps=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    decoded = np.asarray(Image.open(tmp_path / "out.png"))
    assert decoded.shape == (32, 32, 3) and decoded.std() > 0  # sample_size 16 latents x VAE factor 2
