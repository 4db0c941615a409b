"""diffusers UNet / VAE state dict -> Flax params: layout, prefixes and error reporting."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from emu2_jax.convert.diffusers import convert_unet, convert_vae
from emu2_jax.models import unet as unet_lib
from emu2_jax.models import vae as vae_lib
from tests.models.test_unet import TINY_SD15_DIFFUSERS, TINY_SDXL_DIFFUSERS, state_dict_np, torch_unet
from tests.models.test_vae import TINY_VAE_DIFFUSERS, torch_vae


@pytest.fixture(scope="module")
def sdxl_state():
    return state_dict_np(torch_unet(TINY_SDXL_DIFFUSERS))


def init_shapes(config):
    shapes = jax.eval_shape(lambda: unet_lib.UNet(config).init(jax.random.key(0),
                                                                **unet_lib.unet_dummy_inputs(config)))
    return jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(shapes["params"]))


@pytest.mark.parametrize("cfg_dict", [TINY_SDXL_DIFFUSERS, TINY_SD15_DIFFUSERS], ids=["sdxl", "sd15"])
def test_tree_matches_init(cfg_dict):
    state = state_dict_np(torch_unet(cfg_dict))
    config = unet_lib.unet_config_from_diffusers(cfg_dict)
    params = convert_unet(state, config)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == init_shapes(config)
    # SD-1.5 stores proj_in as a 1x1 conv, SDXL as a Linear; both become the same [C, C] kernel.
    key = "down_blocks.0" if cfg_dict is TINY_SD15_DIFFUSERS else "down_blocks.1"
    w = state[f"{key}.attentions.0.proj_in.weight"]
    flax_key = key.replace(".", "_")
    np.testing.assert_array_equal(params[flax_key]["attentions_0"]["proj_in"]["kernel"], w.reshape(w.shape[0], -1).T)


def test_layouts(sdxl_state):
    params = convert_unet(sdxl_state, unet_lib.tiny_sdxl_unet_config())
    w = sdxl_state["conv_in.weight"]  # [out, in, kh, kw]
    np.testing.assert_array_equal(params["conv_in"]["kernel"][2, 0, 3, 5], w[5, 3, 2, 0])
    np.testing.assert_array_equal(params["time_embedding"]["linear_1"]["kernel"],
                                  sdxl_state["time_embedding.linear_1.weight"].T)
    np.testing.assert_array_equal(params["conv_norm_out"]["scale"], sdxl_state["conv_norm_out.weight"])

    blocks = params["down_blocks_1"]["attentions_1"]["transformer_blocks"]  # 2 scanned layers, 4 heads x 16
    stem = "down_blocks.1.attentions.1.transformer_blocks.1."
    to_k = sdxl_state[stem + "attn2.to_k.weight"]  # [64, 48]
    np.testing.assert_array_equal(blocks["attn2"]["to_k"]["kernel"][1, 7, 2, 3], to_k[2 * 16 + 3, 7])
    to_out = sdxl_state[stem + "attn1.to_out.0.weight"]  # [64, 64]
    np.testing.assert_array_equal(blocks["attn1"]["to_out_0"]["kernel"][1, 3, 5, 9], to_out[9, 3 * 16 + 5])
    np.testing.assert_array_equal(blocks["ff"]["net_0"]["proj"]["bias"][1], sdxl_state[stem + "ff.net.0.proj.bias"])
    np.testing.assert_array_equal(blocks["norm3"]["scale"][0],
                                  sdxl_state["down_blocks.1.attentions.1.transformer_blocks.0.norm3.weight"])


def test_prefix_and_dtype(sdxl_state):
    """Emu2-Gen's single safetensors holds unet., vae., multimodal_encoder. and safety_checker. keys."""
    mixed = {"unet." + k: v for k, v in sdxl_state.items()}
    mixed["vae.decoder.conv_in.weight"] = np.zeros((1,), np.float32)
    mixed["multimodal_encoder.project_up.weight"] = np.zeros((1,), np.float32)
    config = unet_lib.tiny_sdxl_unet_config(param_dtype=jnp.bfloat16)
    params = convert_unet(mixed, config, prefix="unet.")
    assert params["conv_out"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_allclose(params["conv_out"]["bias"].astype(np.float32), sdxl_state["conv_out.bias"],
                               rtol=1e-2)


def test_errors_name_the_key(sdxl_state):
    config = unet_lib.tiny_sdxl_unet_config()
    dropped = "mid_block.attentions.0.transformer_blocks.1.attn2.to_v.weight"
    missing = {k: v for k, v in sdxl_state.items() if k != dropped}
    with pytest.raises(ValueError, match=f"missing {re.escape(repr(dropped))}"):
        convert_unet(missing, config)
    with pytest.raises(ValueError, match="unexpected keys.*'unet_extra.weight'"):
        convert_unet({**sdxl_state, "unet_extra.weight": np.zeros(3)}, config)
    bad = dict(sdxl_state)
    bad["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = np.zeros((48, 64), np.float32)
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight: PyTorch shape \(48, 64\)"):
        convert_unet(bad, config)
    # A checkpoint for another cross-attention width (SDXL's 2048 instead of Emu2's 1792) is refused.
    with pytest.raises(ValueError, match="to_k.weight: PyTorch shape"):
        convert_unet(sdxl_state, unet_lib.tiny_sdxl_unet_config(cross_attention_dim=32))


def test_vae_convert():
    state = state_dict_np(torch_vae(TINY_VAE_DIFFUSERS))
    config = vae_lib.vae_config_from_diffusers(TINY_VAE_DIFFUSERS)
    params = convert_vae({"vae." + k: v for k, v in state.items()}, config, prefix="vae.")
    attn = params["decoder"]["mid_block"]["attentions_0"]
    to_q = state["decoder.mid_block.attentions.0.to_q.weight"]
    np.testing.assert_array_equal(attn["to_q"]["kernel"][:, 0, :], to_q.T)
    np.testing.assert_array_equal(attn["to_q"]["bias"][0], state["decoder.mid_block.attentions.0.to_q.bias"])
    np.testing.assert_array_equal(params["quant_conv"]["kernel"][0, 0], state["quant_conv.weight"][:, :, 0, 0].T)
    with pytest.raises(ValueError, match="missing 'encoder.conv_out.bias'"):
        convert_vae({k: v for k, v in state.items() if k != "encoder.conv_out.bias"}, config)
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_vae(state, vae_lib.tiny_vae_config(use_quant_conv=False))
