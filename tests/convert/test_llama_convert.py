"""convert_llama: tree layout, prefixes, ignored keys, dtype and error messages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from emu2_jax.convert.llama import convert_llama
from emu2_jax.models.llama import LlamaDecoder
from tests.models.test_llama import init_params, tiny_config
from tests.torch_refs import hf_llama, state_dict_np


@pytest.fixture(scope="module")
def config():
    return tiny_config(num_kv_heads=2)


@pytest.fixture(scope="module")
def hf_state(config):
    return state_dict_np(hf_llama(config, seed=7))


def test_layout_matches_init_with_emu2_prefix(config, hf_state):
    prefix = "model.decoder.lm."   # Hugging Face Emu2 layout
    state = {prefix + k: v for k, v in hf_state.items()}
    state[f"{prefix}model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    state["model.visual.cls_token"] = np.zeros((1, 1, 8), np.float32)   # other parts of Emu2: ignored
    state["project_up.weight"] = np.zeros((64, 8), np.float32)
    params = convert_llama(state, config, prefix=prefix)

    init_shapes = jax.tree.map(lambda x: x.shape, nn.unbox(init_params(config))["params"])
    assert jax.tree.map(lambda x: x.shape, params) == init_shapes
    np.testing.assert_array_equal(params["lm_head"]["kernel"], hf_state["lm_head.weight"].T)
    # q_proj rows are head-major: row h * head_dim + j is head h, feature j.
    q = hf_state["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"][1, :, 2, 5], q[2 * 16 + 5])
    o = hf_state["model.layers.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(params["layers"]["attn"]["o"]["kernel"][0, 3, 1], o[:, 3 * 16 + 1])
    np.testing.assert_array_equal(params["layers"]["post_attention_norm"]["scale"][1],
                                  hf_state["model.layers.1.post_attention_layernorm.weight"])


def test_param_dtype(config, hf_state):
    bf16_config = tiny_config(num_kv_heads=2, param_dtype=jnp.bfloat16)
    params = convert_llama(hf_state, bf16_config)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
    tokens = jnp.zeros((1, 4), jnp.int32)
    logits = LlamaDecoder(bf16_config).apply({"params": params}, tokens, jnp.arange(4)[None],
                                             method=LlamaDecoder.forward)
    assert logits.shape == (1, 4, config.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def test_missing_key_raises(config, hf_state):
    state = dict(hf_state)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        convert_llama(state, config)


def test_unexpected_key_raises(config, hf_state):
    state = dict(hf_state, **{"model.layers.2.input_layernorm.weight": np.ones(64, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys \['model\.layers\.2\.input_layernorm\.weight'\]"):
        convert_llama(state, config)


def test_wrong_shape_raises(config, hf_state):
    state = dict(hf_state)
    state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)  # MHA shape, GQA config
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(64, 64\), "
                                         r"expected \(32, 64\)"):
        convert_llama(state, config)
