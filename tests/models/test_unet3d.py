"""Video UNet: parity against diffusers' UNet3DConditionModel, and inflation from a 2D (SD-2.1-style) UNet."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.convert.diffusers import convert_unet, convert_unet3d
from emu2_jax.models import unet as unet_lib
from emu2_jax.models import unet3d as unet3d_lib
from tests.models.test_unet import randomize_, torch_unet
from tests.torch_refs import state_dict_np

TINY_3D_DIFFUSERS = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    layers_per_block=1, attention_head_dim=4, cross_attention_dim=40, norm_num_groups=8)

# SD-2.1's UNet layout (v-prediction, linear projections, head counts in attention_head_dim, 1024-wide
# cross-attention), shrunk to two levels.
TINY_SD21_DIFFUSERS = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=1024,
    norm_num_groups=8)


def test_unet3d_parity():
    torch.manual_seed(0)
    model = diffusers.UNet3DConditionModel(**TINY_3D_DIFFUSERS).eval()
    randomize_(model, 0)  # zero-initialised temporal convs would hide a wrong temporal path
    config = unet3d_lib.unet3d_config_from_diffusers(model.config)
    params = convert_unet3d(state_dict_np(model), config)

    rng = np.random.default_rng(0)
    batch, frames, size = 2, 3, 8
    sample = rng.standard_normal((batch, 4, frames, size, size)).astype(np.float32)
    timesteps = np.array([981.0, 21.0], np.float32)
    context = rng.standard_normal((batch, 5, 40)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample.numpy()
    out = jax.jit(unet3d_lib.UNet3D(config).apply)(
        {"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 4, 1)), jnp.asarray(timesteps),
        jnp.asarray(context))
    assert out.shape == (batch, frames, size, size, 4)
    assert np.abs(ref).mean() > 0.1
    diff = float(np.abs(np.asarray(out).transpose(0, 4, 1, 2, 3) - ref).max())
    print(f"UNet3D max abs diff {diff:.2e}")
    assert diff <= 1e-4
    # Frames interact: changing one frame changes the others' outputs (the temporal layers are live).
    sample2 = sample.copy()
    sample2[:, :, 0] += 1.0
    out2 = jax.jit(unet3d_lib.UNet3D(config).apply)(
        {"params": params}, jnp.asarray(sample2.transpose(0, 2, 3, 4, 1)), jnp.asarray(timesteps),
        jnp.asarray(context))
    assert float(jnp.abs(out2[:, 2] - out[:, 2]).max()) > 1e-3


def test_inflated_unet3d_equals_2d_per_frame():
    """A 2D SD-2.1-style UNet inflated to 3D (temporal layers at their identity init, learned frame
    positions on) reproduces the 2D UNet on every frame."""
    torch_2d = torch_unet(TINY_SD21_DIFFUSERS, seed=1)
    config_2d = unet_lib.unet_config_from_diffusers(torch_2d.config)
    params_2d = convert_unet(state_dict_np(torch_2d), config_2d)
    config = unet3d_lib.UNet3DConfig(unet=config_2d, transformer_in_heads=2, transformer_in_head_dim=16,
                                     temporal_positions=8)
    params = unet3d_lib.inflate_params(params_2d, unet3d_lib.init_unet3d(config, jax.random.key(0)))

    batch, frames, size = 2, 4, 8
    sample = jax.random.normal(jax.random.key(1), (batch, frames, size, size, 4))
    context = jax.random.normal(jax.random.key(2), (batch, 3, 1024))
    timesteps = jnp.array([999.0, 10.0])
    out = jax.jit(unet3d_lib.UNet3D(config).apply)({"params": params}, sample, timesteps, context)
    ref = jax.jit(unet_lib.UNet(config_2d).apply)(
        {"params": params_2d}, sample.reshape(batch * frames, size, size, 4), jnp.repeat(timesteps, frames),
        jnp.repeat(context, frames, axis=0))
    assert float(jnp.abs(ref).mean()) > 0.1
    diff = float(jnp.abs(out.reshape(ref.shape) - ref).max())
    print(f"inflated UNet3D vs 2D per frame: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    # ... and against diffusers' 2D UNet on one frame, closing the loop to the torch weights.
    with torch.no_grad():
        torch_ref = torch_2d(torch.from_numpy(np.array(sample[:, 1]).transpose(0, 3, 1, 2).copy()),
                             torch.from_numpy(np.array(timesteps)), torch.from_numpy(np.array(context))).sample
    assert float(np.abs(np.asarray(out[:, 1]).transpose(0, 3, 1, 2) - torch_ref.numpy()).max()) <= 1e-4

    with pytest.raises(ValueError, match="no place in the 3D UNet"):
        unet3d_lib.inflate_params({**params_2d, "extra": {"kernel": jnp.zeros(1)}}, params)


def test_unet3d_params_have_logical_axes_and_sd21_preset_shapes():
    config = unet3d_lib.sd21_unet3d_config()
    shapes = jax.eval_shape(lambda: unet3d_lib.UNet3D(config).init(
        jax.random.key(0), **unet3d_lib.unet3d_dummy_inputs(config)))
    p = nn.unbox(shapes["params"])
    assert p["down_blocks_0"]["temp_convs_0"]["conv4_3"]["kernel"].shape == (3, 1, 1, 320, 320)
    assert p["down_blocks_2"]["temp_attentions_1"]["transformer_blocks"]["attn1"]["to_q"]["kernel"].shape == \
        (1, 1280, 20, 64)
    assert p["down_blocks_0"]["attentions_0"]["transformer_blocks"]["attn2"]["to_k"]["kernel"].shape == \
        (1, 1024, 5, 64)
    n_params = sum(x.size for x in jax.tree.leaves(p))
    assert 1.3e9 < n_params < 1.5e9, n_params  # SD-2.1's 866M + temporal layers (ModelScope T2V: 1.41B)
    specs = nn.get_partition_spec(shapes)["params"]
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
        assert all(isinstance(n, str) for n in spec), (jax.tree_util.keystr(path), spec)
    nn.logical_to_mesh(specs, sh.LOGICAL_RULES)


def test_unet3d_config_errors():
    with pytest.raises(ValueError, match="addition_embed_type"):
        unet3d_lib.UNet3DConfig(unet=unet_lib.tiny_sdxl_unet_config())
    with pytest.raises(ValueError, match="attention_head_dim"):
        unet3d_lib.unet3d_config_from_diffusers({**TINY_3D_DIFFUSERS, "attention_head_dim": (4, 4)})
