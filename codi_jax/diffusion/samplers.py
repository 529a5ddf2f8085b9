"""Samplers: DDIM, DPM-Solver++ 2M, Euler (each step-for-step the diffusers scheduler of the same name, SD1.5
defaults) and the few-step CoDi consistency sampler.

Every grid is static numpy (it depends on num_steps and the spacing only); per-step coefficients are gathered from the
schedule with jnp, so the schedule may be a traced argument. The loop is one lax.fori_loop: the model is traced once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.diffusion import parameterization as pz
from codi_jax.diffusion import schedules as sch

METHODS = ("ddim", "dpmpp_2m", "euler", "codi")


def _guided_fn(model_fn: Callable, guidance_scale) -> Callable:
    """Wraps model_fn so it returns one raw output. A Python 1.0 means unguided (model_fn returns one array);
    anything else (a number != 1 or an array, possibly traced) means model_fn returns (cond, uncond)."""
    unguided = isinstance(guidance_scale, (int, float)) and float(guidance_scale) == 1.0

    def fn(z, t):
        out = model_fn(z, t)
        if unguided:
            if isinstance(out, (tuple, list)):
                raise ValueError("model_fn returned a pair but guidance_scale == 1; return a single array")
            return out
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError("with guidance_scale != 1, model_fn must return (conditional, unconditional)")
        return pz.guide(out[0], out[1], guidance_scale)

    return fn


def _tvec(t, z):
    return jnp.full((z.shape[0],), t, dtype=t.dtype)


def sample(model_fn: Callable, z_T: jax.Array, *, method: str, num_steps: int, schedule: sch.Schedule,
           prediction_type: str, timestep_spacing: str = "leading", guidance_scale=1.0, rng: jax.Array | None = None,
           **kw: Any) -> jax.Array:
    """Runs `method` for `num_steps` from z_T (N(0, I) latents, B first) and returns the final latents.

    model_fn(z, timesteps) -> raw output, or (cond, uncond) when guidance_scale != 1; timesteps is (B,) int32 indices
    (float32 for euler with 'linspace' spacing, whose timesteps are fractional as in diffusers).
    kw: steps_offset (1), set_alpha_to_one (False) as in SD1.5's scheduler config; unroll (1): lax.fori_loop's
    unroll (True: straight-line, one network copy per step, longer compiles; 4 codi steps of a small UNet ran no faster
    that way on an H200); for 'codi': distill_steps (50), timestep_scaling (10), sigma_data (0.5), stochastic (False;
    needs rng). 'codi' walks the training grid of distill_steps, so timestep_spacing does not apply to it.
    """
    pz.check_prediction_type(prediction_type)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if timestep_spacing not in sch.SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {sch.SPACINGS}, got {timestep_spacing!r}")
    steps_offset = kw.pop("steps_offset", 1)
    set_alpha_to_one = kw.pop("set_alpha_to_one", False)
    unroll = kw.pop("unroll", 1)
    codi_kw = {k: kw.pop(k) for k in ("distill_steps", "timestep_scaling", "sigma_data", "stochastic") if k in kw}
    if kw:
        raise ValueError(f"unknown sampler options {sorted(kw)} for method {method!r}")
    if method != "codi" and codi_kw:
        raise ValueError(f"options {sorted(codi_kw)} only apply to method 'codi'")
    fn = _guided_fn(model_fn, guidance_scale)
    T = schedule.num_train_timesteps
    if method == "ddim":
        return _ddim(fn, z_T, schedule, prediction_type, sch.ddim_timesteps(num_steps, T, timestep_spacing, steps_offset),
                     T // num_steps, set_alpha_to_one, unroll)
    if method == "dpmpp_2m":
        return _dpmpp_2m(fn, z_T, schedule, prediction_type,
                         sch.dpm_timesteps(num_steps, T, timestep_spacing, steps_offset), unroll)
    if method == "euler":
        return _euler(fn, z_T, schedule, prediction_type,
                      sch.euler_timesteps(num_steps, T, timestep_spacing, steps_offset), timestep_spacing, unroll)
    return _codi(fn, z_T, schedule, prediction_type, num_steps, rng, unroll, **codi_kw)


def _ddim(fn, z, schedule, prediction_type, timesteps: np.ndarray, step: int, set_alpha_to_one: bool, unroll):
    # diffusers: prev = t - T // num_steps for every spacing; a negative prev uses the "final" alpha (abar_0 for SD).
    prev = timesteps - step
    ts = jnp.asarray(timesteps, jnp.int32)
    a_t, s_t = schedule.alpha_sigma(ts)
    final = jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]
    abar_prev = jnp.where(jnp.asarray(prev >= 0), schedule.alphas_cumprod[np.maximum(prev, 0)], final)
    a_p, s_p = jnp.sqrt(abar_prev), jnp.sqrt(1.0 - abar_prev)

    def body(i, z):
        x_hat, eps_hat = pz.to_x_eps(fn(z, _tvec(ts[i], z)), z, a_t[i], s_t[i], prediction_type)
        return pz.ddim_step(x_hat, eps_hat, a_p[i], s_p[i]).astype(z.dtype)

    return jax.lax.fori_loop(0, len(timesteps), body, z, unroll=unroll)


def _dpmpp_2m(fn, z, schedule, prediction_type, timesteps: np.ndarray, unroll):
    """DPM-Solver++(2M), midpoint, lower_order_final, final sigma zero: step 0 and the last step are first order and
    the last one lands on sigma = 0, i.e. returns the data prediction."""
    n = len(timesteps)
    ts = jnp.asarray(timesteps, jnp.int32)
    a, s = schedule.alpha_sigma(ts)  # (n,) at the step's own timestep
    lam = jnp.log(a) - jnp.log(s)
    # Next-point values; the last step goes to sigma = 0 (alpha = 1), handled in closed form below.
    a_next = jnp.concatenate([a[1:], jnp.ones((1,), a.dtype)])
    s_next = jnp.concatenate([s[1:], jnp.zeros((1,), s.dtype)])
    is_last = np.arange(n) == n - 1
    first = (np.arange(n) == 0) | is_last
    # lambda(sigma = 0) is +inf; the last step's coefficients are set in closed form, so keep h finite there.
    lam_next = jnp.concatenate([lam[1:], lam[-1:]])
    h = jnp.where(is_last, 1.0, lam_next - lam)
    em1 = jnp.expm1(-h)  # exp(-h) - 1
    h_prev = jnp.concatenate([h[:1], h[:-1]])  # lambda_s0 - lambda_s1, meaningful from step 1
    r0 = h_prev / h
    # x_next = c_z z + c_0 m0 + c_1 m1, where m0 is the current data prediction and m1 the previous one.
    A = a_next * em1
    c_z = jnp.where(is_last, 0.0, s_next / s)
    c_0 = jnp.where(is_last, 1.0, jnp.where(first, -A, -A - 0.5 * A / r0))
    c_1 = jnp.where(first, 0.0, 0.5 * A / r0)

    def body(i, carry):
        z, m1 = carry
        m0, _ = pz.to_x_eps(fn(z, _tvec(ts[i], z)), z, a[i], s[i], prediction_type)
        z_next = c_z[i] * z + c_0[i] * m0 + c_1[i] * m1
        return z_next.astype(z.dtype), m0.astype(z.dtype)

    z, _ = jax.lax.fori_loop(0, n, body, (z, jnp.zeros_like(z)), unroll=unroll)
    return z


def _euler(fn, z, schedule, prediction_type, timesteps: np.ndarray, spacing: str, unroll):
    """Euler in the VE variable x = z / alpha with sigma_VE = sqrt((1 - abar) / abar), linearly interpolated at
    fractional timesteps; the model sees x / sqrt(sigma^2 + 1) = z, as scale_model_input does."""
    T = schedule.num_train_timesteps
    table = jnp.sqrt((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    lo = np.floor(timesteps).astype(np.int32)
    hi = np.minimum(lo + 1, T - 1)
    w = jnp.asarray(timesteps - lo, jnp.float32)
    sig = (1.0 - w) * table[lo] + w * table[hi]
    sig_next = jnp.concatenate([sig[1:], jnp.zeros((1,), sig.dtype)])
    integral = np.all(timesteps == np.round(timesteps))
    ts = jnp.asarray(timesteps, jnp.int32 if integral else jnp.float32)
    # diffusers' init_noise_sigma (over the inference sigmas): max for linspace/trailing, sqrt(max^2 + 1) for leading.
    init = jnp.max(sig) if spacing in ("linspace", "trailing") else jnp.sqrt(jnp.max(sig) ** 2 + 1.0)
    x = z * init.astype(z.dtype)

    def body(i, x):
        a = jax.lax.rsqrt(sig[i] ** 2 + 1.0)
        zi = x * a
        x0, _ = pz.to_x_eps(fn(zi, _tvec(ts[i], x)), zi, a, sig[i] * a, prediction_type)
        return (x + (x - x0) / sig[i] * (sig_next[i] - sig[i])).astype(x.dtype)

    return jax.lax.fori_loop(0, len(timesteps), body, x, unroll=unroll)


def _codi(fn, z, schedule, prediction_type, num_steps, rng, unroll, *, distill_steps: int = 50, timestep_scaling: float = 10.0,
          sigma_data: float = 0.5, stochastic: bool = False):
    timesteps = sch.codi_timesteps(num_steps, distill_steps, schedule.num_train_timesteps)
    if stochastic and rng is None:
        raise ValueError("codi sampling with stochastic=True needs rng")
    n = len(timesteps)
    ts = jnp.asarray(timesteps, jnp.int32)
    a, s = schedule.alpha_sigma(ts)
    a_next = jnp.concatenate([a[1:], a[-1:]])  # the last step returns f; its "next" values are unused
    s_next = jnp.concatenate([s[1:], s[-1:]])

    # Every step, the last included, runs inside one loop so the network is traced (and compiled) once; the last
    # iteration's re-noised z is discarded and its f returned.
    def body(i, carry):
        z, _ = carry
        out = fn(z, _tvec(ts[i], z))
        f, eps_f = pz.consistency_output(out, z, ts[i], a[i], s[i], prediction_type,
                                         timestep_scaling=timestep_scaling, sigma_data=sigma_data)
        if stochastic:  # CM multistep: re-noise the clean estimate with fresh noise
            eps_f = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
        return (a_next[i] * f + s_next[i] * eps_f).astype(z.dtype), f.astype(z.dtype)

    _, f = jax.lax.fori_loop(0, n, body, (z, jnp.zeros_like(z)), unroll=unroll)
    return f
