"""EVA tower converter: output layout, prefixes and ignored keys, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from emu2_jax.convert.eva_vit import convert_eva_vit
from emu2_jax.models.eva_vit import EvaVisionTransformer, VisionConfig
from tests.models.test_eva_vit import EVA02_VARIANTS, POST_NORM, PRE_NORM
from tests.torch_refs import state_dict_np, timm_eva


def _init_params(cfg: VisionConfig) -> dict:
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    return nn.unbox(EvaVisionTransformer(cfg).init(jax.random.PRNGKey(0), images))["params"]


_CASES = {
    "post_norm": (POST_NORM, True),
    "pre_norm_final_norm": (PRE_NORM, True),
    "no_qkv_bias": (VisionConfig(**{**POST_NORM.__dict__, "qkv_bias": False}), True),
    "bf16_params": (VisionConfig(**{**PRE_NORM.__dict__, "param_dtype": jnp.bfloat16}), True),
    **{name: (VisionConfig(**{**POST_NORM.__dict__, **overrides}), fused)
       for name, (overrides, fused) in EVA02_VARIANTS.items()},
}


@pytest.mark.parametrize("name", list(_CASES))
def test_converted_tree_matches_init(name):
    cfg, qkv_fused = _CASES[name]
    params = convert_eva_vit(state_dict_np(timm_eva(cfg, qkv_fused=qkv_fused)), cfg)
    expected = _init_params(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.shape == want.shape
        assert got.dtype == jnp.dtype(cfg.param_dtype)


def test_qkv_split_and_transposes():
    cfg = POST_NORM
    sd = state_dict_np(timm_eva(cfg))
    params = convert_eva_vit(sd, cfg)
    e, d = cfg.width, cfg.head_dim
    qkv = sd["blocks.1.attn.qkv.weight"]
    # Output feature (head 2, dim 5) of K is row e + 2 * d + 5 of the fused weight.
    np.testing.assert_array_equal(params["blocks"]["attn"]["k"]["kernel"][1, :, 2, 5], qkv[e + 2 * d + 5])
    np.testing.assert_array_equal(params["blocks"]["attn"]["v"]["bias"][1].reshape(-1), sd["blocks.1.attn.v_bias"])
    np.testing.assert_array_equal(params["blocks"]["attn"]["proj"]["kernel"][0, 3, 1],
                                  sd["blocks.0.attn.proj.weight"][:, 3 * d + 1])
    np.testing.assert_array_equal(params["patch_embed"]["kernel"][2, 7, 1], sd["patch_embed.proj.weight"][:, 1, 2, 7])
    assert "bias" not in params["blocks"]["attn"]["k"]


def test_prefix_and_ignored_keys():
    """HF Emu2 layout: tower under "model.visual.", other model parts next to it; timm extras are dropped."""
    cfg = POST_NORM
    sd = state_dict_np(timm_eva(cfg))
    reference = convert_eva_vit(sd, cfg)
    prefixed = {"model.visual." + k: v for k, v in sd.items()}
    prefixed.update({
        "model.decoder.lm.model.norm.weight": np.ones(8, np.float32),
        "project_up.weight": np.ones((8, cfg.width), np.float32),
        "model.visual.blocks.0.attn.k_bias": np.zeros(cfg.width, np.float32),  # timm's zero buffer
        "model.visual.head.weight": np.ones((10, cfg.width), np.float32),
        "model.visual.head.bias": np.ones(10, np.float32),
        "model.visual.fc_norm.weight": np.ones(cfg.width, np.float32),
        "model.visual.fc_norm.bias": np.zeros(cfg.width, np.float32),
    })
    params = convert_eva_vit(prefixed, cfg, prefix="model.visual.")
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_missing_key_raises():
    cfg = POST_NORM
    sd = {"visual." + k: v for k, v in state_dict_np(timm_eva(cfg)).items()}
    del sd["visual.blocks.1.attn.v_bias"]
    with pytest.raises(ValueError, match=r"missing key 'visual\.blocks\.1\.attn\.v_bias'"):
        convert_eva_vit(sd, cfg, prefix="visual.")


def test_final_norm_missing_raises():
    with pytest.raises(ValueError, match=r"missing key 'norm\.weight'"):
        convert_eva_vit(state_dict_np(timm_eva(POST_NORM)), VisionConfig(**{**POST_NORM.__dict__,
                                                                               "final_norm": True}))


def test_unfused_qkv_missing_key_raises():
    overrides, _ = EVA02_VARIANTS["rope_swiglu_packed_unfused_qkv"]
    cfg = VisionConfig(**{**POST_NORM.__dict__, **overrides})
    sd = state_dict_np(timm_eva(cfg, qkv_fused=False))
    del sd["blocks.0.attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing key 'blocks\.0\.attn\.k_proj\.weight'"):
        convert_eva_vit(sd, cfg)


def test_wrong_shape_raises():
    cfg = POST_NORM
    sd = state_dict_np(timm_eva(cfg))
    sd["pos_embed"] = np.zeros((1, 17, cfg.width), np.float32)  # e.g. a 56 px checkpoint for a 42 px config
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 17, 64\), expected \(1, 10, 64\)"):
        convert_eva_vit(sd, cfg)


def test_unexpected_key_raises():
    """A final norm in the checkpoint that the config does not use must not be silently dropped."""
    sd = state_dict_np(timm_eva(PRE_NORM))
    with pytest.raises(ValueError, match=r"unexpected keys.*'norm\.bias', 'norm\.weight'"):
        convert_eva_vit(sd, VisionConfig(**{**PRE_NORM.__dict__, "final_norm": False}))
