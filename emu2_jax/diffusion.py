"""Noise schedule, epsilon- / v-prediction training inputs and the Euler sampler of Emu2's visual decoders.

The sampler reproduces diffusers' `EulerDiscreteScheduler` as Emu2-Gen configures it (docs/model.md#visual-decoder:
scaled-linear betas 0.00085..0.012 over 1000 steps, timestep_spacing "leading", steps_offset 1,
linear sigma interpolation, epsilon prediction, no churn) and the pipeline's classifier-free
guidance: conditional and unconditional halves in one batch, conditional first,
eps = uncond + g * (cond - uncond). The whole loop is one jitted `lax.fori_loop`.

`ScheduleConfig(prediction_type="v_prediction")` is SD 2.1's variant (the video decoder's): same
betas and spacing, the model predicts v = sqrt(a) eps - sqrt(1 - a) x_0 (diffusers `get_velocity`).
Samplers take any latent rank ([B,H,W,C] images, [B,F,H,W,C] clips).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

# apply_fn(params, latents [N,H,W,C], timesteps [N], context [N,S,D], added_cond | None) -> eps [N,H,W,C]
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Mapping[str, jax.Array] | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1
    prediction_type: str = "epsilon"  # or "v_prediction" (SD 2.1)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r}; expected one of {PREDICTION_TYPES}")


PREDICTION_TYPES = ("epsilon", "v_prediction")


def alphas_cumprod(config: ScheduleConfig = ScheduleConfig()) -> np.ndarray:
    """Cumulative products of 1 - beta for the "scaled_linear" schedule, float32 [T]."""
    betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                        dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


def _alpha(timesteps: jax.Array, like: jax.Array, config: ScheduleConfig) -> jax.Array:
    a = jnp.asarray(alphas_cumprod(config))[timesteps].astype(like.dtype)
    return a.reshape((-1,) + (1,) * (like.ndim - 1))


def add_noise(samples: jax.Array, noise: jax.Array, timesteps: jax.Array,
              config: ScheduleConfig = ScheduleConfig()) -> jax.Array:
    """Forward process q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise, with integer timesteps [B]."""
    chex.assert_equal_shape([samples, noise])
    chex.assert_shape(timesteps, (samples.shape[0],))
    a = _alpha(timesteps, samples, config)
    return jnp.sqrt(a) * samples + jnp.sqrt(1.0 - a) * noise


def velocity(samples: jax.Array, noise: jax.Array, timesteps: jax.Array,
             config: ScheduleConfig = ScheduleConfig()) -> jax.Array:
    """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x_0 (diffusers `get_velocity`)."""
    chex.assert_equal_shape([samples, noise])
    a = _alpha(timesteps, samples, config)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * samples


def training_noise(rng: jax.Array, shape: tuple[int, ...], noise_offset: float = 0.0,
                   dtype: Any = jnp.float32) -> jax.Array:
    """N(0, 1) noise for NHWC latents; `noise_offset` adds offset * N(0, 1) per (sample, channel),
    i.e. of shape [B, 1, 1, C] (the common SDXL recipe that lets the model shift mean brightness)."""
    rng_noise, rng_offset = jax.random.split(rng)
    noise = jax.random.normal(rng_noise, shape, dtype)
    if noise_offset:
        offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
        noise = noise + noise_offset * jax.random.normal(rng_offset, offset_shape, dtype)
    return noise


def diffusion_training_inputs(rng: jax.Array, latents: jax.Array, noise_offset: float = 0.0,
                              config: ScheduleConfig = ScheduleConfig()
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(noisy latents, timesteps [B] int32 uniform in [0, T), target) for scaled latents [B,...,C]; the
    target is the noise (epsilon) or the velocity (v_prediction) as `config.prediction_type` says."""
    rng_t, rng_noise = jax.random.split(rng)
    timesteps = jax.random.randint(rng_t, (latents.shape[0],), 0, config.num_train_timesteps)
    noise = training_noise(rng_noise, latents.shape, noise_offset, latents.dtype)
    target = noise if config.prediction_type == "epsilon" else velocity(latents, noise, timesteps, config)
    return add_noise(latents, noise, timesteps, config), timesteps, target


def euler_schedule(num_steps: int, config: ScheduleConfig = ScheduleConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Inference timesteps [N] (float32, descending) and sigmas [N + 1] (last 0), "leading" spacing."""
    step_ratio = config.num_train_timesteps // num_steps
    timesteps = (np.arange(num_steps) * step_ratio).round()[::-1].astype(np.float32) + config.steps_offset
    a = alphas_cumprod(config)
    train_sigmas = ((1 - a) / a) ** 0.5
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def init_noise_sigma(sigmas: np.ndarray) -> float:
    """Std of the initial latents for "leading" spacing: sqrt(max sigma^2 + 1)."""
    return float((np.max(sigmas) ** 2 + 1) ** 0.5)


def scale_model_input(sample: jax.Array, sigma: jax.Array) -> jax.Array:
    return sample / jnp.sqrt(sigma ** 2 + 1)


def euler_step(eps: jax.Array, sample: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
               prediction_type: str = "epsilon") -> jax.Array:
    """One Euler step of the probability-flow ODE from sigma to sigma_next (float32 math, as diffusers).
    `eps` is the model output: epsilon, or v for "v_prediction"."""
    sample = sample.astype(jnp.float32)
    if prediction_type == "v_prediction":  # x_0 from v on the sigma-scaled sample (diffusers' formula)
        pred_original = eps * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)
    else:
        pred_original = sample - sigma * eps
    derivative = (sample - pred_original) / sigma
    return sample + derivative * (sigma_next - sigma)


@functools.partial(jax.jit, static_argnames=("apply_fn", "latents_shape", "num_steps", "config"))
def euler_sample(apply_fn: ApplyFn, params: Any, cond: jax.Array, uncond: jax.Array,
                 latents_shape: tuple[int, ...], rng: jax.Array, num_steps: int = 50,
                 guidance_scale: float | jax.Array = 3.0, added_cond: Mapping[str, jax.Array] | None = None,
                 uncond_added_cond: Mapping[str, jax.Array] | None = None,
                 config: ScheduleConfig = ScheduleConfig()) -> jax.Array:
    """Classifier-free-guided Euler sampling; returns latents of `latents_shape` (float32, still scaled).

    cond, uncond: cross-attention context [B,S,D] (uncond may have batch 1 and is broadcast);
    latents_shape: (B, H, W, C); added_cond / uncond_added_cond: per-half UNet added conditioning
    ({"text_embeds", "time_ids"}; the unconditional half reuses `added_cond` when None).
    Initial latents are N(0, 1) drawn from `rng` times `init_noise_sigma`.
    """
    batch = latents_shape[0]
    chex.assert_rank(cond, 3)
    chex.assert_axis_dimension(cond, 0, batch)
    uncond = jnp.broadcast_to(uncond, cond.shape)
    context = jnp.concatenate([cond, uncond], axis=0)
    if added_cond is not None:
        uncond_added_cond = added_cond if uncond_added_cond is None else uncond_added_cond
        added_cond = {k: jnp.concatenate([added_cond[k], uncond_added_cond[k]], axis=0) for k in added_cond}

    timesteps, sigmas = euler_schedule(num_steps, config)
    latents = jax.random.normal(rng, latents_shape, jnp.float32) * init_noise_sigma(sigmas)
    timesteps, sigmas = jnp.asarray(timesteps), jnp.asarray(sigmas)

    def body(i, latents):
        model_in = scale_model_input(jnp.concatenate([latents, latents], axis=0), sigmas[i])
        eps = apply_fn(params, model_in, jnp.full((2 * batch,), timesteps[i]), context, added_cond)
        eps_cond, eps_uncond = jnp.split(eps.astype(jnp.float32), 2, axis=0)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return euler_step(eps, latents, sigmas[i], sigmas[i + 1], config.prediction_type)

    return jax.lax.fori_loop(0, num_steps, body, latents)
