"""Schedule, training noise and Euler sampler against diffusers' schedulers."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from emu2_jax import diffusion

EMU2_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                      beta_end=0.012, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                      interpolation_type="linear", use_karras_sigmas=False)


def euler_scheduler():
    return diffusers.EulerDiscreteScheduler(**EMU2_SCHEDULER)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_emu2_default_schedule():
    timesteps, sigmas = diffusion.euler_schedule(50)
    assert timesteps.shape == (50,) and sigmas.shape == (51,)
    assert timesteps[0] == 981 and timesteps[-1] == 1 and np.all(np.diff(timesteps) == -20)
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("num_steps", [50, 30, 7])
def test_euler_scheduler_parity(num_steps):
    ref = euler_scheduler()
    ref.set_timesteps(num_steps)
    timesteps, sigmas = diffusion.euler_schedule(num_steps)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    assert rel_err(sigmas, ref.sigmas.numpy()) <= 1e-5 and sigmas[-1] == 0
    assert abs(diffusion.init_noise_sigma(sigmas) / float(ref.init_noise_sigma) - 1) <= 1e-5

    # Step by step on the same (sample, model output) pairs.
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 4, 8, 8), generator=gen) * ref.init_noise_sigma
    ours = jnp.asarray(sample.numpy())
    step = jax.jit(diffusion.euler_step)
    for i, t in enumerate(ref.timesteps):
        model_in = ref.scale_model_input(sample, t)
        ours_in = diffusion.scale_model_input(ours, sigmas[i])
        assert rel_err(ours_in, model_in.numpy()) <= 1e-5
        eps = torch.tanh(model_in) * 0.9 + 0.1 * torch.randn(model_in.shape, generator=gen)  # fake model
        sample = ref.step(eps, t, sample).prev_sample
        ours = step(jnp.asarray(eps.numpy()), ours, sigmas[i], sigmas[i + 1])
        assert rel_err(ours, sample.numpy()) <= 1e-4, (i, rel_err(ours, sample.numpy()))


def fake_unet_jax(params, x, t, context, added):
    """Deterministic stand-in for the UNet: depends on sample, timestep, context and added cond."""
    shift = context.mean(axis=(1, 2)) + added["text_embeds"].mean(axis=1) + 1e-3 * added["time_ids"].sum(axis=1)
    return jnp.tanh(params["w"] * x + shift[:, None, None, None]) * (t / 1000.0)[:, None, None, None]


def fake_unet_torch(w, x, t, context, added):
    shift = context.mean(dim=(1, 2)) + added["text_embeds"].mean(dim=1) + 1e-3 * added["time_ids"].sum(dim=1)
    return torch.tanh(w * x + shift[:, None, None, None]) * (t / 1000.0)


def test_cfg_sampler_parity():
    """The jitted fori_loop sampler equals diffusers' Euler loop with the Emu2 pipeline's CFG."""
    batch, num_steps, guidance = 2, 12, 3.0
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((batch, 5, 6)).astype(np.float32)
    uncond = rng.standard_normal((1, 5, 6)).astype(np.float32)
    added = dict(text_embeds=cond.mean(axis=1), time_ids=np.tile(np.float32([64, 64, 0, 0, 64, 64]), (batch, 1)))
    uncond_added = dict(text_embeds=np.repeat(uncond.mean(axis=1), batch, 0), time_ids=added["time_ids"])
    key = jax.random.key(3)
    latents_shape = (batch, 8, 8, 4)

    ours = diffusion.euler_sample(fake_unet_jax, {"w": jnp.float32(1.5)}, jnp.asarray(cond), jnp.asarray(uncond),
                                  latents_shape, key, num_steps=num_steps, guidance_scale=guidance,
                                  added_cond=added, uncond_added_cond=uncond_added)

    # Reference: the same initial noise, diffusers' scheduler, the pipeline's batching and guidance.
    scheduler = euler_scheduler()
    scheduler.set_timesteps(num_steps)
    noise = np.array(jax.random.normal(key, latents_shape, jnp.float32))
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    context = torch.from_numpy(np.concatenate([cond, np.repeat(uncond, batch, 0)]))
    added_t = {k: torch.from_numpy(np.concatenate([added[k], uncond_added[k]])) for k in added}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_cond, eps_uncond = fake_unet_torch(1.5, model_in, t, context, added_t).chunk(2)
        latents = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latents).prev_sample

    assert ours.shape == latents_shape and ours.dtype == jnp.float32
    err = rel_err(ours, latents.numpy())
    print(f"CFG Euler sampler relative error {err:.2e}")
    assert err <= 1e-4
    # Guidance matters: a different scale gives a different result.
    other = diffusion.euler_sample(fake_unet_jax, {"w": jnp.float32(1.5)}, jnp.asarray(cond), jnp.asarray(uncond),
                                   latents_shape, key, num_steps=num_steps, guidance_scale=1.0,
                                   added_cond=added, uncond_added_cond=uncond_added)
    assert rel_err(other, latents.numpy()) > 1e-2


def test_add_noise_matches_ddpm():
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012)
    np.testing.assert_allclose(diffusion.alphas_cumprod(), ddpm.alphas_cumprod.numpy(), rtol=1e-5)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    ref = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    ours = diffusion.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_training_noise_offset_and_inputs():
    key = jax.random.key(0)
    shape = (64, 4, 4, 4)
    plain = diffusion.training_noise(key, shape)
    offset = diffusion.training_noise(key, shape, noise_offset=0.1)
    delta = np.asarray(offset - plain)
    # The offset is one draw per (sample, channel), constant over space, with std 0.1.
    np.testing.assert_allclose(delta, np.broadcast_to(delta[:, :1, :1, :], shape), atol=1e-6)
    assert 0.08 < delta[:, 0, 0, :].std() < 0.12
    assert abs(float(plain.std()) - 1.0) < 0.05

    latents = jax.random.normal(jax.random.key(1), shape)
    noisy, t, target = diffusion.diffusion_training_inputs(jax.random.key(2), latents, noise_offset=0.1)
    assert t.shape == (64,) and int(t.min()) >= 0 and int(t.max()) < 1000 and len(np.unique(t)) > 30
    np.testing.assert_allclose(noisy, diffusion.add_noise(latents, target, t), atol=1e-6)
    assert float(jnp.abs(target - latents).max()) > 0.1


SD21_SCHEDULER = {**EMU2_SCHEDULER, "prediction_type": "v_prediction"}  # SD 2.1 (the video decoder's)


def test_velocity_target_matches_diffusers():
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type="v_prediction")
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((4, 2, 8, 8, 4)).astype(np.float32)  # video latents [B,F,H,W,C]
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    ref = ddpm.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    config = diffusion.ScheduleConfig(prediction_type="v_prediction")
    np.testing.assert_allclose(diffusion.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), config),
                               ref, atol=1e-5)
    # Training inputs carry the velocity as target; the epsilon default is unchanged.
    latents = jnp.asarray(x0)
    noisy, ts, target = diffusion.diffusion_training_inputs(jax.random.key(0), latents, config=config)
    _, ts_eps, eps = diffusion.diffusion_training_inputs(jax.random.key(0), latents)
    np.testing.assert_array_equal(ts, ts_eps)
    np.testing.assert_allclose(target, diffusion.velocity(latents, eps, ts, config), atol=1e-6)
    np.testing.assert_allclose(noisy, diffusion.add_noise(latents, eps, ts), atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        diffusion.ScheduleConfig(prediction_type="sample")


def test_euler_v_prediction_parity():
    """Euler steps on v-prediction outputs equal diffusers' EulerDiscreteScheduler (SD 2.1 config)."""
    ref = diffusers.EulerDiscreteScheduler(**SD21_SCHEDULER)
    ref.set_timesteps(10)
    timesteps, sigmas = diffusion.euler_schedule(10)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 4, 3, 8, 8), generator=gen) * ref.init_noise_sigma
    ours = jnp.asarray(sample.numpy())
    step = jax.jit(diffusion.euler_step, static_argnames="prediction_type")
    for i, t in enumerate(ref.timesteps):
        model_in = ref.scale_model_input(sample, t)
        v = torch.tanh(model_in) * 0.9 + 0.1 * torch.randn(model_in.shape, generator=gen)
        sample = ref.step(v, t, sample).prev_sample
        ours = step(jnp.asarray(v.numpy()), ours, sigmas[i], sigmas[i + 1], prediction_type="v_prediction")
        assert rel_err(ours, sample.numpy()) <= 1e-4, (i, rel_err(ours, sample.numpy()))
    x, out = jnp.asarray(sample.numpy()), jnp.asarray(v.numpy())
    as_eps, as_v = step(out, x, sigmas[0], sigmas[1]), step(out, x, sigmas[0], sigmas[1], "v_prediction")
    assert rel_err(as_eps, as_v) > 1e-2  # the prediction type matters
