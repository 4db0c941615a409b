"""EVA vision tower: parity with timm's `Eva`, sharding metadata, remat, mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.convert.eva_vit import convert_eva_vit
from emu2_jax.models.eva_vit import EvaVisionTransformer, VisionConfig
from tests.torch_refs import state_dict_np, timm_eva

POST_NORM = VisionConfig(image_size=42, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=160)
PRE_NORM = VisionConfig(image_size=28, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=160,
                        post_norm=False, final_norm=True)


def _images(cfg: VisionConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size)


def _assert_parity(cfg: VisionConfig, qkv_fused: bool = True) -> float:
    ref = timm_eva(cfg, qkv_fused=qkv_fused)
    images = _images(cfg)
    with torch.no_grad():
        expected = ref.forward_features(images).numpy()
    params = convert_eva_vit(state_dict_np(ref), cfg)
    got = EvaVisionTransformer(cfg).apply({"params": params}, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    assert got.shape == expected.shape == (2, 1 + cfg.num_patches, cfg.width)
    diff = float(np.max(np.abs(np.asarray(got) - expected)))
    print(f"max abs diff vs timm: {diff:.3g}")
    assert diff <= 1e-4
    return diff


def test_eva_post_norm_parity():
    _assert_parity(POST_NORM)


def test_eva_pre_norm_parity():
    _assert_parity(PRE_NORM)


# EVA-02 ingredients. timm picks the MLP class from them: packed GluMlp for SwiGLU alone, split SwiGLU
# with scale_mlp (sub-LN), Mlp + norm for sub-LN alone; its EVA-02 models use unfused q/k/v projections.
EVA02_VARIANTS = {
    "rope_swiglu_packed_unfused_qkv": (dict(post_norm=False, use_rope=True, rope_ref_grid=4, swiglu=True), False),
    "rope_swiglu_subln": (dict(post_norm=False, use_rope=True, swiglu=True, sub_ln=True, final_norm=True), True),
    "post_norm_subln_gelu": (dict(sub_ln=True), True),
}


@pytest.mark.parametrize("name", list(EVA02_VARIANTS))
def test_eva02_variant_parity(name):
    overrides, qkv_fused = EVA02_VARIANTS[name]
    _assert_parity(VisionConfig(**{**POST_NORM.__dict__, **overrides}), qkv_fused=qkv_fused)


def _init(cfg: VisionConfig):
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    return EvaVisionTransformer(cfg).init(jax.random.PRNGKey(0), images)


@pytest.mark.parametrize("cfg", [POST_NORM, PRE_NORM], ids=["post_norm", "pre_norm"])
def test_every_param_has_logical_axes(cfg):
    variables = _init(cfg)
    specs = nn.get_partition_spec(variables)["params"]
    params = nn.unbox(variables)["params"]
    known = {name for name, _ in sh.LOGICAL_RULES}
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    assert len(flat_specs) == len(flat_params)
    for path, spec in flat_specs:
        shape = flat_params[path].shape
        name = jax.tree_util.keystr(path)
        assert len(spec) == len(shape), name
        assert all(axis in known for axis in spec if axis is not None), name
        # Only the singleton leading dims of cls_token / pos_embed stay unnamed.
        unnamed = [i for i, axis in enumerate(spec) if axis is None and shape[i] > 1]
        assert unnamed == [], (name, spec)
        if name.startswith("['blocks']"):
            assert spec[0] == sh.LAYERS and shape[0] == cfg.depth, name
    assert "norm" in params if cfg.final_norm else "norm" not in params


def _sharded_forward(use_set_mesh: bool):
    """Tokens from unsharded params and from params laid out over a (data 2, fsdp 2, tensor 2) mesh."""
    cfg = POST_NORM
    model = EvaVisionTransformer(cfg)
    variables = _init(cfg)
    params = nn.unbox(variables)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, cfg.image_size, cfg.image_size, 3))
    expected = model.apply(params, images)
    mesh = sh.create_mesh((2, 2, 2))
    sharded = jax.device_put(params, sh.logical_to_sharding(nn.get_partition_spec(variables), mesh))
    if use_set_mesh:  # activates the logical constraints (flax applies them only under an abstract mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
            got = jax.jit(model.apply)(sharded, images)
    else:
        got = jax.jit(model.apply)(sharded, images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    return got


def test_sharded_params_forward_matches_unsharded():
    got = _sharded_forward(use_set_mesh=False)
    assert got.shape == (4, 1 + POST_NORM.num_patches, POST_NORM.width)


def test_activation_constraints_under_set_mesh():
    got = _sharded_forward(use_set_mesh=True)
    assert got.sharding.spec[0] == ("data", "fsdp")  # the residual-stream constraint took effect


def test_wrong_image_size_raises():
    variables = nn.unbox(_init(PRE_NORM))
    with pytest.raises(ValueError, match=r"\[B, 28, 28, 3\].*got \(1, 42, 42, 3\)"):
        EvaVisionTransformer(PRE_NORM).apply(variables, jnp.zeros((1, 42, 42, 3)))
    with pytest.raises(ValueError, match=r"got \(1, 3, 28, 28\)"):  # NCHW by mistake
        EvaVisionTransformer(PRE_NORM).apply(variables, jnp.zeros((1, 3, 28, 28)))


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="num_heads"):
        VisionConfig(width=64, num_heads=5)
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=30, patch_size=14)
    with pytest.raises(ValueError, match="remat_policy"):
        VisionConfig(remat_policy="sometimes")


@pytest.mark.parametrize("policy", ["full", "minimal", "save_qkv_proj", "dots_no_batch"])
def test_remat_policies_match_none_gradients(policy):
    params = nn.unbox(_init(POST_NORM))["params"]
    images = jax.random.normal(jax.random.PRNGKey(2), (2, POST_NORM.image_size, POST_NORM.image_size, 3))

    def grads(policy: str):
        model = EvaVisionTransformer(VisionConfig(**{**POST_NORM.__dict__, "remat_policy": policy}))
        loss = lambda p: jnp.mean(model.apply({"params": p}, images) ** 2)
        return jax.jit(jax.grad(loss))(params)

    reference, remat = grads("none"), grads(policy)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(reference))


def test_bf16_compute_close_to_fp32():
    ref = timm_eva(PRE_NORM)
    params = convert_eva_vit(state_dict_np(ref), PRE_NORM)
    images = jnp.asarray(_images(PRE_NORM).numpy().transpose(0, 2, 3, 1))
    fp32 = EvaVisionTransformer(PRE_NORM).apply({"params": params}, images)
    bf16_cfg = VisionConfig(**{**PRE_NORM.__dict__, "dtype": jnp.bfloat16})
    bf16 = EvaVisionTransformer(bf16_cfg).apply({"params": params}, images)
    assert bf16.dtype == jnp.bfloat16
    rel = float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - fp32)) / jnp.max(jnp.abs(fp32)))
    print(f"bf16 vs fp32 max abs diff / max abs: {rel:.3g}")
    assert rel < 5e-2
