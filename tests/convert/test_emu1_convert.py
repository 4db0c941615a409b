"""Converting the released Emu (v1) checkpoints: tiny torch-built checkpoints in the release's exact key
layout (`tests/emu1_refs.py`), through `python -m emu2_jax.convert` (subprocess) and `convert()`,
compared tensor by tensor with an independent transcription of the mapping, and the converted model's
outputs compared with the release's forward (fp32, <= 1e-4).

The torch side is built from library blocks, as the release builds it: timm's `Eva` for the tower,
transformers' `T5Stack` decoder (cross-attention k / v widened to the encoder width, the release's one
change to T5) for the Causal Transformer, transformers' `LlamaForCausalLM`; only PEFT's LoRA Linear is a
minimal transcription of its forward (peft is not installed). The release's own forward (ln_visual on
all tokens, cformer, `<image>` slots, stu_regress_head on the final-norm hidden states) is transcribed
in `emu1_reference_forward`."""
import dataclasses
import json
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from emu2_jax import checkpointing
from emu2_jax.convert.__main__ import convert
from emu2_jax.convert.emu1 import config_from_shapes
from emu2_jax.convert.eva_vit import convert_eva_vit
from emu2_jax.convert.llama import convert_llama
from emu2_jax.models import emu2, presets
from emu2_jax.models.causal_transformer import CausalTransformerConfig
from emu2_jax.models.eva_vit import VisionConfig
from emu2_jax.models.llama import LlamaConfig
from tests import cli
from tests.convert.test_emu2_convert import _batch
from tests.emu1_refs import emu1_reference, emu1_reference_forward, emu1_state_dict, merged_lm_state

RELEASE = presets.get_config("emu1_release")
# 28 px / 14: 4 patches + CLS; 20 queries so that T5's log-spaced relative buckets (offsets >= 16) occur.
CFG = dataclasses.replace(
    RELEASE,
    vision=VisionConfig(image_size=28, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64, qkv_bias=True,
                        post_norm=False),
    llm=LlamaConfig(vocab_size=1024 + 4, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
                    intermediate_size=256),
    causal_transformer=dataclasses.replace(RELEASE.causal_transformer, num_queries=20, width=48, depth=2,
                                           num_heads=4, mlp_dim=96),
    n_query=20, v_query=20, image_token_id=1024 + 3, frame_token_id=1024 + 4)
INSTRUCT = dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, vocab_size=1024 + 6))
# The release's `Emu-14B.json` fields the converter reads, plus LLaMA config.json's head count.
CONFIG_JSON = {"embed_dim": 8, "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 8,
                                              "mlp_ratio": 2.0, "patch_size": 14},
               "vladapter_cfg": {"name": "cformer", "n_causal": 20}, "num_attention_heads": 4}


def _np(t):
    return t.detach().numpy()


def expected_params(ref, cfg) -> dict:
    """The Flax params, transcribed from the torch modules (not from checkpoint keys)."""
    ct = cfg.causal_transformer
    w, h = ct.width, ct.num_heads
    cf = ref["cformer"]
    blocks = []
    for block in cf.cformer.block:
        tree = {}
        for layer, attn, name in ((0, "SelfAttention", "self_attn"), (1, "EncDecAttention", "cross_attn")):
            mod = getattr(block.layer[layer], attn)
            tree[f"{name}_norm"] = {"scale": _np(block.layer[layer].layer_norm.weight)}
            for proj in "qkv":
                weight = _np(getattr(mod, proj).weight)
                tree[f"{name}_{proj}"] = {"kernel": weight.T.reshape(weight.shape[1], h, w // h)}
            tree[f"{name}_out"] = {"kernel": _np(mod.o.weight).T.reshape(h, w // h, w)}
        tree["mlp_norm"] = {"scale": _np(block.layer[2].layer_norm.weight)}
        tree["fc1"] = {"kernel": _np(block.layer[2].DenseReluDense.wi.weight).T}
        tree["fc2"] = {"kernel": _np(block.layer[2].DenseReluDense.wo.weight).T}
        blocks.append(tree)
    lm = ref["decoder"]["lm"]
    return {
        "visual": convert_eva_vit({k: _np(v) for k, v in ref["visual"].state_dict().items()}, cfg.vision),
        "connector": {
            "ln_visual": {"scale": _np(ref["ln_visual"].weight), "bias": _np(ref["ln_visual"].bias)},
            "queries": _np(cf.causal_tokens)[0],
            "rel_bias": _np(cf.cformer.block[0].layer[0].SelfAttention.relative_attention_bias.weight),
            "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks),
            "norm": {"scale": _np(cf.cformer.final_layer_norm.weight)},
            "project_up": {"kernel": _np(cf.projection.weight).T, "bias": _np(cf.projection.bias)},
        },
        "llm": convert_llama(merged_lm_state(ref), cfg.llm),
        "project_down": {"kernel": _np(lm.stu_regress_head.weight).T},
    }


def _assert_params(got, want, atol=0.0):
    assert sorted(got) == sorted(want)
    flat_got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(got)}
    flat_want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want)}
    assert sorted(flat_got) == sorted(flat_want)
    for name, value in flat_want.items():
        np.testing.assert_allclose(np.asarray(flat_got[name]), value, rtol=0, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def pretrain():
    return emu1_reference(CFG, seed=1)


@pytest.fixture(scope="module")
def instruct():
    return emu1_reference(INSTRUCT, seed=2, lora_rank=4)


def test_emu1_command_converts_every_tensor(tmp_path, pretrain):
    """Emu-pretrain.pt as released: a DeepSpeed `{"module": state_dict}` .pt, here with the release's config.json."""
    state = {k: torch.from_numpy(v) for k, v in emu1_state_dict(pretrain).items()}
    torch.save({"module": state}, tmp_path / "Emu-pretrain.pt")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_JSON))
    result = cli.run([sys.executable, "-m", "emu2_jax.convert", f"--src={tmp_path / 'Emu-pretrain.pt'}",
                      f"--dst={tmp_path / 'out'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout emu1" in result.stdout
    model_config, params = checkpointing.load_pretrained(str(tmp_path / "out"))
    assert model_config["emu2"] == CFG
    _assert_params(params, expected_params(pretrain, CFG))


@pytest.mark.parametrize("adapter_name", [None, "default"])  # PEFT < 0.3 / >= 0.3 key names
def test_emu1_instruct_lora_is_merged(tmp_path, instruct, adapter_name):
    """Emu-instruct.pt: LLaMA under `decoder.lm.base_model.model.` with LoRA on q, k, v, o (alpha 16)."""
    state = emu1_state_dict(instruct, peft_adapter_name=adapter_name)
    assert "decoder.lm.base_model.model.stu_regress_head.weight" in state
    assert any(k.endswith(f"q_proj.lora_A.{adapter_name + '.' if adapter_name else ''}weight") for k in state)
    save_file(state, str(tmp_path / "Emu-instruct.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_JSON))
    assert convert(str(tmp_path / "Emu-instruct.safetensors"), str(tmp_path / "out")) == "emu1"
    model_config, params = checkpointing.load_pretrained(str(tmp_path / "out"))
    assert model_config["emu2"] == INSTRUCT and model_config["emu2"].llm.lora_rank == 0
    _assert_params(params, expected_params(instruct, INSTRUCT), atol=1e-6)  # merge in float32 vs torch


def test_emu1_converted_forward_parity(tmp_path, instruct):
    """Connector outputs, regression head and logits of the converted Emu-I equal the release's forward."""
    save_file(emu1_state_dict(instruct), str(tmp_path / "emu1.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_JSON))
    convert(str(tmp_path / "emu1.safetensors"), str(tmp_path / "out"))
    model_config, params = checkpointing.load_pretrained(str(tmp_path / "out"))
    cfg = model_config["emu2"]
    batch = _batch(np.random.default_rng(4), cfg)
    model = emu2.Emu2Model(cfg)
    ours = model.apply({"params": params}, batch)
    images = emu2.pixel_rows_to_images(batch["images"].reshape(-1, *batch["images"].shape[2:]))
    visual, projected = model.apply({"params": params}, images, cfg.n_query, method=emu2.Emu2Model.encode_images)
    with torch.no_grad():
        ref = emu1_reference_forward(instruct, {k: torch.from_numpy(v) for k, v in batch.items()}, cfg)
    assert np.abs(np.asarray(visual) - ref["visual"].numpy()).max() <= 1e-4
    np.testing.assert_array_equal(np.asarray(visual), np.asarray(projected))
    assert np.abs(np.asarray(ours.text_logits) - ref["logits"].numpy()).max() <= 1e-4
    assert np.abs(np.asarray(ours.visual_pred) - ref["regressed"].numpy()).max() <= 1e-4
    fed_back = model.apply({"params": params}, visual, method=emu2.Emu2Model.project_visual)
    np.testing.assert_array_equal(np.asarray(fed_back), np.asarray(visual))  # regressed embeddings go back as is


def test_emu1_config_from_shapes_alone():
    """No config.json: EVA heads from the release's head width 88, LLaMA heads of 128 channels."""
    shapes = {k: v.shape for k, v in emu1_state_dict(emu1_reference(dataclasses.replace(
        CFG, vision=dataclasses.replace(CFG.vision, width=176, num_heads=2),
        llm=dataclasses.replace(CFG.llm, hidden_size=256, num_heads=2, num_kv_heads=2)))).items()}
    config = config_from_shapes(shapes)
    assert config.vision == dataclasses.replace(CFG.vision, width=176, num_heads=2)
    assert config.llm == dataclasses.replace(CFG.llm, hidden_size=256, num_heads=2, num_kv_heads=2)
    assert config.causal_transformer == CausalTransformerConfig(
        num_queries=20, width=48, depth=2, num_heads=4, mlp_dim=96, block="t5", input_norm=True, include_cls=True,
        output="llm")
    assert (config.n_query, config.image_token_id, config.visual_embed_dim) == (20, 1027, 256)


def test_release_presets_hold_the_release_shapes():
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_abstract(name)))
              for name in ("emu1_release", "emu1_instruct_release")}
    assert counts["emu1_instruct_release"] - counts["emu1_release"] == 2 * 2 * 5120  # two tokens, embed + head
    connector = _abstract("emu1_release")["connector"]
    assert connector["blocks"]["cross_attn_k"]["kernel"].shape == (12, 1408, 12, 64)
    assert connector["project_up"]["kernel"].shape == (768, 5120)
    assert _abstract("emu1_release")["project_down"]["kernel"].shape == (5120, 5120)


def _abstract(name):
    from emu2_jax.summary import abstract_params

    return abstract_params(presets.get_config(name))


# ---- bad inputs: one line naming the key; nothing left at --dst.


@pytest.mark.parametrize("change, message", [
    ("missing", r"checkpoint has no 'cformer.cformer.block.1.layer.1.EncDecAttention.k.weight'"),
    ("extra", r"1 key\(s\) that no component reads: \['cformer.extra.weight'\].*--allow_unused_keys"),
    ("misshapen", r"cformer.projection.weight: shape \(128, 47\), expected \(128, 48\)"),
    ("half_lora", r"LoRA decoder.lm.base_model.model.model.layers.0.self_attn.v_proj: has lora_A but not"),
    ("stray_lora", r"LoRA adapters on weights the LLaMA does not have: \['decoder.lm.base_model.model.model.layers.0"
                   r".self_attn.x_proj'\]"),
])
def test_emu1_bad_keys_are_named_and_leave_nothing(tmp_path, instruct, change, message):
    state = emu1_state_dict(instruct)
    lora = "decoder.lm.base_model.model.model.layers.0."
    if change == "missing":
        del state["cformer.cformer.block.1.layer.1.EncDecAttention.k.weight"]
    elif change == "extra":
        state["cformer.extra.weight"] = np.zeros(3, np.float32)
    elif change == "misshapen":
        state["cformer.projection.weight"] = np.zeros((128, 47), np.float32)
    elif change == "half_lora":
        del state[lora + "self_attn.v_proj.lora_B.weight"]
    else:
        state[lora + "self_attn.x_proj.lora_A.weight"] = np.zeros((4, 128), np.float32)
        state[lora + "self_attn.x_proj.lora_B.weight"] = np.zeros((128, 4), np.float32)
    save_file(state, str(tmp_path / "emu1.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_JSON))
    with pytest.raises(ValueError, match=message):
        convert(str(tmp_path / "emu1.safetensors"), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "emu1.safetensors"]


def test_emu1_generation_folder_points_at_its_encoder(tmp_path, pretrain):
    """BAAI/Emu's `pretrain/` folder: `multimodal_encoder/pytorch_model.bin` (an Emu v1 state dict), unet/, vae/."""
    (tmp_path / "pretrain" / "multimodal_encoder").mkdir(parents=True)
    (tmp_path / "pretrain" / "unet").mkdir()
    encoder = tmp_path / "pretrain" / "multimodal_encoder"
    torch.save({k: torch.from_numpy(v) for k, v in emu1_state_dict(pretrain).items()}, encoder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"Emu v1's generation pipeline folder; convert its encoder alone \(--src="
                                         r".*multimodal_encoder, layout emu1\)"):
        convert(str(tmp_path / "pretrain"), str(tmp_path / "out"))
    (encoder / "config.json").write_text(json.dumps(CONFIG_JSON))
    assert convert(str(encoder), str(tmp_path / "out")) == "emu1"


def test_emu1_wrong_preset_names_the_first_mismatch(tmp_path, pretrain):
    save_file(emu1_state_dict(pretrain), str(tmp_path / "emu1.safetensors"))
    with pytest.raises(ValueError, match=r"EVA state dict key 'visual.patch_embed.proj.weight' has shape "
                                         r"\(32, 3, 14, 14\), expected \(1408, 3, 14, 14\)"):
        convert(str(tmp_path / "emu1.safetensors"), str(tmp_path / "out"), model="emu1_release")
    with pytest.raises(ValueError, match=r"an Emu v1 checkpoint needs an Emu v1 release config"):
        convert(str(tmp_path / "emu1.safetensors"), str(tmp_path / "out"), model="emu1_14b")
    assert not (tmp_path / "out").exists()


def test_converted_emu1_is_not_exported_as_emu2(tmp_path, pretrain):
    from emu2_jax.export import export

    save_file(emu1_state_dict(pretrain), str(tmp_path / "emu1.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_JSON))
    convert(str(tmp_path / "emu1.safetensors"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"an Emu v1 model \(Causal Transformer connector\); export writes the Emu2"):
        export(str(tmp_path / "out"), str(tmp_path / "back"), "native")
    assert not (tmp_path / "back").exists()
