"""Network-output parameterisations (paper eq. 8), the consistency boundary (eq. 11, LCM form) and CFG.

alpha and sigma are per-example (B,) arrays or scalars; they broadcast against (B, h, w, C) latents from the left,
so one call serves a batch that mixes timesteps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def bcast(c, x: jax.Array) -> jax.Array:
    """Reshapes a scalar or (B,) coefficient so it multiplies (B, ...) arrays per example."""
    c = jnp.asarray(c, x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def to_x_eps(output: jax.Array, z: jax.Array, alpha, sigma, prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """Any network output -> (x_hat, eps_hat) at z = alpha x + sigma eps (eq. 8 for v)."""
    check_prediction_type(prediction_type)
    a, s = bcast(alpha, z), bcast(sigma, z)
    if prediction_type == "epsilon":
        return (z - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * z - s * output, a * output + s * z
    return output, (z - a * output) / s


def from_x_eps(x: jax.Array, eps: jax.Array, alpha, sigma, prediction_type: str) -> jax.Array:
    """(x, eps) -> the network output of `prediction_type` (the regression target); inverse of to_x_eps."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return bcast(alpha, x) * eps - bcast(sigma, x) * x
    return x


def ddim_step(x_hat: jax.Array, eps_hat: jax.Array, alpha_s, sigma_s) -> jax.Array:
    """Deterministic DDIM step to index s (eq. 7 / 9): z_s = a_s x_hat + s_s eps_hat."""
    return bcast(alpha_s, x_hat) * x_hat + bcast(sigma_s, eps_hat) * eps_hat


def boundary_coefficients(timesteps, *, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """(c_skip, c_out) of eq. 11 in the LCM form: c = timestep_scaling * n; c_skip(0) = 1, c_out(0) = 0."""
    c = jnp.asarray(timesteps, jnp.float32) * timestep_scaling
    denom = c**2 + sigma_data**2
    return sigma_data**2 / denom, c / jnp.sqrt(denom)


def boundary(x_hat: jax.Array, z: jax.Array, timesteps, alpha, sigma, *, timestep_scaling: float = 10.0,
             sigma_data: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Consistency function f = c_skip z + c_out x_hat and its noise eps_f = (z - a f) / s (eq. 11)."""
    c_skip, c_out = boundary_coefficients(timesteps, timestep_scaling=timestep_scaling, sigma_data=sigma_data)
    f = bcast(c_skip, z) * z + bcast(c_out, z) * x_hat
    eps_f = (z - bcast(alpha, z) * f) / bcast(sigma, z)
    return f, eps_f


def consistency_output(output: jax.Array, z: jax.Array, timesteps, alpha, sigma, prediction_type: str, *,
                       timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Raw network output at (z, n) -> (f, eps_f): to_x_eps then boundary."""
    x_hat, _ = to_x_eps(output, z, alpha, sigma, prediction_type)
    return boundary(x_hat, z, timesteps, alpha, sigma, timestep_scaling=timestep_scaling, sigma_data=sigma_data)


def guide(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance on raw outputs, as diffusers pipelines do: u + w (c - u)."""
    return uncond + bcast(scale, cond) * (cond - uncond)
