"""AutoencoderKL parity against diffusers on a tiny random config (float32, CPU)."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from emu2_jax import sharding as sh
from emu2_jax.convert.diffusers import convert_vae
from emu2_jax.models import vae as vae_lib
from tests.models.test_unet import randomize_
from tests.torch_refs import state_dict_np

TINY_VAE_DIFFUSERS = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                          latent_channels=4)


def torch_vae(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**cfg).eval()
    randomize_(model, seed)
    return model


def test_vae_parity():
    model = torch_vae(TINY_VAE_DIFFUSERS)
    config = vae_lib.vae_config_from_diffusers(model.config)
    assert config == vae_lib.tiny_vae_config(scaling_factor=0.18215)
    params = convert_vae(state_dict_np(model), config)
    ours = vae_lib.AutoencoderKL(config)

    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(image)).latent_dist
        ref_mean, ref_logvar = posterior.mean.numpy(), posterior.logvar.numpy()
        ref_image = model.decode(torch.from_numpy(latents)).sample.numpy()

    encode = jax.jit(lambda p, x: ours.apply({"params": p}, x, method=ours.encode))
    decode = jax.jit(lambda p, z: ours.apply({"params": p}, z, method=ours.decode))
    mean, logvar = encode(params, jnp.asarray(image.transpose(0, 2, 3, 1)))
    decoded = decode(params, jnp.asarray(latents.transpose(0, 2, 3, 1)))
    assert mean.shape == logvar.shape == (2, 8, 8, 4) and decoded.shape == (2, 16, 16, 3)
    diffs = {
        "mean": np.abs(np.asarray(mean).transpose(0, 3, 1, 2) - ref_mean).max(),
        "logvar": np.abs(np.asarray(logvar).transpose(0, 3, 1, 2) - ref_logvar).max(),
        "decode": np.abs(np.asarray(decoded).transpose(0, 3, 1, 2) - ref_image).max(),
    }
    print("VAE max abs diffs", {k: f"{v:.2e}" for k, v in diffs.items()})
    for ref in (ref_mean, ref_logvar, ref_image):
        assert np.abs(ref).mean() > 0.05
    assert max(diffs.values()) <= 1e-4, diffs


def test_presets_and_sampling():
    assert vae_lib.sdxl_vae_config().scaling_factor == 0.13025
    assert vae_lib.sd15_vae_config().scaling_factor == 0.18215
    assert vae_lib.sdxl_vae_config().block_out_channels == (128, 256, 512, 512)
    mean = jnp.full((2, 4, 4, 4), 3.0)
    logvar = jnp.full((2, 4, 4, 4), np.log(0.25))  # std 0.5
    draws = vae_lib.sample_latents(jax.random.key(0), mean, logvar)
    assert abs(float(draws.mean()) - 3.0) < 0.15 and abs(float(draws.std()) - 0.5) < 0.1
    with pytest.raises(ValueError, match="divisible"):
        vae_lib.AutoencoderKL(vae_lib.tiny_vae_config()).init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))


def test_every_param_has_logical_axes():
    config = vae_lib.sdxl_vae_config()
    shapes = jax.eval_shape(lambda: vae_lib.AutoencoderKL(config).init(jax.random.key(0),
                                                                        jnp.zeros((1, 8, 8, 3))))
    specs = nn.get_partition_spec(shapes)["params"]
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    flat_shapes = jax.tree.leaves(nn.unbox(shapes["params"]))
    assert len(flat_specs) == len(flat_shapes)
    for (path, spec), leaf in zip(flat_specs, flat_shapes):
        assert len(spec) == leaf.ndim and all(isinstance(n, str) for n in spec), (jax.tree_util.keystr(path), spec)
    nn.logical_to_mesh(specs, sh.LOGICAL_RULES)
    n_params = sum(x.size for x in flat_shapes)
    assert 83e6 < n_params < 84e6, n_params  # the SD/SDXL VAE has 83.65M parameters


def test_remat_matches():
    model = torch_vae(TINY_VAE_DIFFUSERS)
    params = convert_vae(state_dict_np(model), vae_lib.vae_config_from_diffusers(model.config))
    image = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3), minval=-1, maxval=1)
    outs = []
    for policy in ("none", "full"):
        ae = vae_lib.AutoencoderKL(vae_lib.vae_config_from_diffusers(model.config, remat_policy=policy))
        outs.append(jax.jit(ae.apply)({"params": params}, image))
    assert outs[0].shape == (1, 8, 8, 3)
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)
