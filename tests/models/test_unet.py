"""UNet parity against diffusers' UNet2DConditionModel on tiny random configs (float32, CPU)."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.convert.diffusers import convert_unet
from emu2_jax.models import unet as unet_lib
from tests.torch_refs import state_dict_np


def tiny_sd15_unet_config() -> unet_lib.UNetConfig:
    """A tiny SD-1.5-shaped UNet (cross-attention dim 40, no added embedding): TINY_SD15_DIFFUSERS's."""
    return unet_lib.UNetConfig(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(1, 1),
        num_attention_heads=(4, 4),
        cross_attention_dim=40,
        norm_num_groups=8,
        addition_embed_type=None,
    )


TINY_SDXL_DIFFUSERS = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=48 + 6 * 8, cross_attention_dim=48, norm_num_groups=8)

TINY_SD15_DIFFUSERS = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, attention_head_dim=4, cross_attention_dim=40, norm_num_groups=8)

# Emu2-Gen's unet/config.json fields that matter (SPEC.md §5).
EMU2_GEN_DIFFUSERS = dict(
    in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2, transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    num_attention_heads=None, use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, cross_attention_dim=1792, encoder_hid_dim=None,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=3328)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, including norm scales/biases that torch initialises to 1/0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.rsplit(".", 2)[-2]:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 16
                p.copy_(noise / np.sqrt(fan_in))


def torch_unet(cfg: dict, seed: int = 0) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**cfg).eval()
    randomize_(model, seed)
    return model


def run_parity(cfg_dict: dict, added: bool) -> float:
    model = torch_unet(cfg_dict)
    config = unet_lib.unet_config_from_diffusers(model.config)
    params = convert_unet(state_dict_np(model), config)

    rng = np.random.default_rng(0)
    batch, size = 2, 16
    sample = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    timesteps = np.array([981.0, 21.0], np.float32)
    context = rng.standard_normal((batch, 7, config.cross_attention_dim)).astype(np.float32)
    torch_added, ours_added = None, None
    if added:
        text = rng.standard_normal((batch, config.text_embeds_dim)).astype(np.float32)
        time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 8, 512, 512]], np.float32)
        torch_added = dict(text_embeds=torch.from_numpy(text), time_ids=torch.from_numpy(time_ids))
        ours_added = dict(text_embeds=jnp.asarray(text), time_ids=jnp.asarray(time_ids))
    with torch.no_grad():
        ref = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                    added_cond_kwargs=torch_added).sample.numpy()
    out = jax.jit(unet_lib.UNet(config).apply)({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)),
                                               jnp.asarray(timesteps), jnp.asarray(context), ours_added)
    assert out.shape == (batch, size, size, 4)
    assert np.abs(ref).mean() > 0.1  # the comparison is not between two near-zero tensors
    return float(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref).max())


def test_unet_sdxl_parity():
    diff = run_parity(TINY_SDXL_DIFFUSERS, added=True)
    print(f"SDXL-like UNet max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_unet_sd15_parity():
    diff = run_parity(TINY_SD15_DIFFUSERS, added=False)
    print(f"SD-1.5-like UNet max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_config_from_diffusers_matches_presets():
    assert unet_lib.unet_config_from_diffusers(EMU2_GEN_DIFFUSERS) == unet_lib.sdxl_emu2_unet_config()
    assert unet_lib.unet_config_from_diffusers(TINY_SDXL_DIFFUSERS) == unet_lib.tiny_sdxl_unet_config()
    assert unet_lib.unet_config_from_diffusers(TINY_SD15_DIFFUSERS) == tiny_sd15_unet_config()
    sd15 = unet_lib.sd15_unet_config(cross_attention_dim=1024)
    assert sd15.num_attention_heads == (8, 8, 8, 8) and sd15.addition_embed_type is None
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_lib.unet_config_from_diffusers({**EMU2_GEN_DIFFUSERS, "class_embed_type": "timestep"})


def test_emu2_preset_shapes():
    """The SDXL/Emu2 preset has the parameter shapes SPEC.md §6 lists (abstract init, no allocation)."""
    config = unet_lib.sdxl_emu2_unet_config()
    shapes = jax.eval_shape(lambda: unet_lib.UNet(config).init(jax.random.key(0),
                                                                **unet_lib.unet_dummy_inputs(config)))
    p = nn.unbox(shapes["params"])
    assert p["conv_in"]["kernel"].shape == (3, 3, 4, 320)
    assert p["add_embedding"]["linear_1"]["kernel"].shape == (3328, 1280)
    blocks = p["down_blocks_2"]["attentions_1"]["transformer_blocks"]
    assert blocks["attn2"]["to_k"]["kernel"].shape == (10, 1792, 20, 64)  # 10 layers, 20 heads of 64
    assert blocks["ff"]["net_0"]["proj"]["kernel"].shape == (10, 1280, 8 * 1280)
    assert p["mid_block"]["attentions_0"]["transformer_blocks"]["attn1"]["to_q"]["kernel"].shape == \
        (10, 1280, 20, 64)
    assert p["down_blocks_1"]["attentions_0"]["transformer_blocks"]["attn1"]["to_q"]["kernel"].shape == \
        (2, 640, 10, 64)
    n_params = sum(x.size for x in jax.tree.leaves(p))
    assert 2.5e9 < n_params < 2.65e9, n_params  # SDXL-base UNet is 2.57B


@pytest.mark.parametrize("make_config", [unet_lib.tiny_sdxl_unet_config, tiny_sd15_unet_config])
def test_every_param_has_logical_axes(make_config):
    config = make_config()
    shapes = jax.eval_shape(lambda: unet_lib.UNet(config).init(jax.random.key(0),
                                                                **unet_lib.unet_dummy_inputs(config)))
    specs = nn.get_partition_spec(shapes)["params"]
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    flat_shapes = jax.tree.leaves(nn.unbox(shapes["params"]))
    assert len(flat_specs) == len(flat_shapes)
    for (path, spec), leaf in zip(flat_specs, flat_shapes):
        assert len(spec) == leaf.ndim and all(isinstance(n, str) for n in spec), (jax.tree_util.keystr(path), spec)
    nn.logical_to_mesh(specs, sh.LOGICAL_RULES)  # raises on repeated names within one array


def test_remat_and_bf16_variants():
    """remat changes nothing in the forward pass and differentiates; bf16 compute stays close to fp32."""
    base = unet_lib.tiny_sdxl_unet_config()
    inputs = unet_lib.unet_dummy_inputs(base, batch=2)
    inputs["sample"] = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    inputs["encoder_hidden_states"] = jax.random.normal(jax.random.key(2), (2, 3, 48))
    inputs["timesteps"] = jnp.array([10.0, 500.0])
    params = convert_unet(state_dict_np(torch_unet(TINY_SDXL_DIFFUSERS)), base)  # cheaper than compiling init
    ref = jax.jit(unet_lib.UNet(base).apply)({"params": params}, **inputs)

    remat = unet_lib.UNet(unet_lib.tiny_sdxl_unet_config(remat_policy="full"))
    np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, **inputs), ref, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(remat.apply({"params": p}, **inputs) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["conv_in"]["kernel"]).max()) > 0

    bf16 = unet_lib.UNet(unet_lib.tiny_sdxl_unet_config(dtype=jnp.bfloat16))
    out = jax.jit(bf16.apply)({"params": params}, **inputs)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.1 * float(jnp.abs(ref).max())
