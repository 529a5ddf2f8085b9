"""The inference path, pure and jittable: encoded prompts (and a condition) -> latents -> images.

Both the training loop's sample grids (recipes.Recipe.sample) and codi_jax.sample.Pipeline call `generate`; they differ
only in where the encoders' weights and the noise come from.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from codi_jax import diffusion


def sample_latents(apply: Callable, params: Any, inputs: dict, rng: jax.Array, *, method: str, num_steps: int,
                   schedule, prediction_type: str, guidance_scale: float = 1.0, codi_kwargs: dict | None = None,
                   timestep_spacing: str = "leading", z_T: jax.Array | None = None):
    """apply(params, z, t, inputs) -> raw network output; inputs has 'latents' (for the shape), 'text', 'text_null'
    (and 'cond' for a conditional model). z_T: the initial noise (default: drawn from rng)."""
    rng_z, rng_s = jax.random.split(rng)
    if z_T is None:
        z_T = jax.random.normal(rng_z, inputs["latents"].shape, jnp.float32)
    uncond = {**inputs, "text": jnp.broadcast_to(inputs["text_null"], inputs["text"].shape)}

    def model_fn(z, t):
        out = apply(params, z, t, inputs)
        if guidance_scale == 1.0:
            return out
        return out, apply(params, z, t, uncond)

    kw = dict(codi_kwargs or {}) if method == "codi" else {}
    return diffusion.sample(model_fn, z_T, method=method, num_steps=num_steps, schedule=schedule,
                            prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                            guidance_scale=guidance_scale, rng=rng_s, **kw)


def generate(apply: Callable, params: Any, decode: Callable, *, text: jax.Array, text_null: jax.Array,
             cond: jax.Array | None, latent_shape: tuple[int, ...], rng: jax.Array, method: str, num_steps: int,
             schedule, prediction_type: str, guidance_scale: float = 1.0, codi_kwargs: dict | None = None,
             timestep_spacing: str = "leading", z_T: jax.Array | None = None) -> jax.Array:
    """Images in [-1, 1] (float32) from encoded prompts: sample latents of `latent_shape`, then decode(latents)."""
    inputs = {"latents": jnp.zeros(latent_shape, jnp.float32), "text": text, "text_null": text_null}
    if cond is not None:
        inputs["cond"] = cond
    latents = sample_latents(apply, params, inputs, rng, method=method, num_steps=num_steps, schedule=schedule,
                             prediction_type=prediction_type, guidance_scale=guidance_scale, codi_kwargs=codi_kwargs,
                             timestep_spacing=timestep_spacing, z_T=z_T)
    return jnp.clip(decode(latents).astype(jnp.float32), -1.0, 1.0)
