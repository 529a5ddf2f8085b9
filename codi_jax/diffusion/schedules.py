"""Discrete VP noise schedules (SD style) and the timestep grids the samplers and objectives walk.

Notation (docs/algorithm.md): T training timesteps, abar_n the cumulative product of (1 - beta), alpha_n = sqrt(abar_n),
sigma_n = sqrt(1 - abar_n), log-SNR lambda_n = log(abar_n / (1 - abar_n)). The network's timestep input is the index n.

The tables live in a small pytree so a jitted sampler or loss may take the schedule as a traced argument; every grid
below depends only on static integers, so it is plain numpy computed at trace time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

KINDS = ("scaled_linear", "linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")


@struct.dataclass
class Schedule:
    """A discrete VP schedule. Index n in [0, T-1]; continuous t in [0, 1] maps to n = t * T."""

    betas: jax.Array  # (T,) float32
    alphas_cumprod: jax.Array  # (T,) float32, abar_n
    kind: str = struct.field(pytree_node=False, default="scaled_linear")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    # Discrete index n (int array, any shape).
    def alpha(self, n) -> jax.Array:
        return jnp.sqrt(self.alphas_cumprod[n])

    def sigma(self, n) -> jax.Array:
        return jnp.sqrt(1.0 - self.alphas_cumprod[n])

    def alpha_sigma(self, n) -> tuple[jax.Array, jax.Array]:
        abar = self.alphas_cumprod[n]
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

    def log_snr(self, n) -> jax.Array:
        abar = self.alphas_cumprod[n]
        return jnp.log(abar) - jnp.log1p(-abar)

    def snr(self, n) -> jax.Array:
        abar = self.alphas_cumprod[n]
        return abar / (1.0 - abar)

    # Continuous t in [0, 1]: n = t * T, clipped to the table [0, T-1]. Interpolating log-SNR (not alpha) keeps
    # alpha^2 + sigma^2 = 1 exactly and matches the table at integer n.
    def log_snr_t(self, t) -> jax.Array:
        table = jnp.log(self.alphas_cumprod) - jnp.log1p(-self.alphas_cumprod)
        n = jnp.clip(jnp.asarray(t, jnp.float32) * self.num_train_timesteps, 0.0, self.num_train_timesteps - 1)
        lo = jnp.floor(n).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, self.num_train_timesteps - 1)
        w = n - lo
        return (1.0 - w) * table[lo] + w * table[hi]

    def alpha_sigma_t(self, t) -> tuple[jax.Array, jax.Array]:
        lam = self.log_snr_t(t)
        return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


def _betas(kind: str, beta_start: float, beta_end: float, T: int) -> np.ndarray:
    if kind == "scaled_linear":  # SD 1.x / 2.x
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "cosine":  # Nichol & Dhariwal, diffusers' squaredcos_cap_v2 (beta_start/end unused)
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], np.float64)
    raise ValueError(f"schedule kind must be one of {KINDS}, got {kind!r}")


def make_schedule(kind: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012,
                  num_train_timesteps: int = 1000) -> Schedule:
    """Builds a schedule; defaults are Stable Diffusion 1.x (scaled_linear 0.00085 -> 0.012, T = 1000)."""
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    betas = _betas(kind, beta_start, beta_end, num_train_timesteps)
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"betas must lie in (0, 1); got beta_start={beta_start}, beta_end={beta_end}")
    abar = np.cumprod(1.0 - betas)
    return Schedule(betas=jnp.asarray(betas, jnp.float32), alphas_cumprod=jnp.asarray(abar, jnp.float32), kind=kind)


# ---- timestep grids (numpy, static). Each mirrors the diffusers scheduler of the same name exactly. ----

def _check_steps(num_steps: int, T: int):
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")


def ddim_timesteps(num_steps: int, T: int, spacing: str = "leading", steps_offset: int = 1) -> np.ndarray:
    """DDIMScheduler.set_timesteps: descending int64 indices."""
    _check_steps(num_steps, T)
    if spacing == "linspace":
        return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")


def dpm_timesteps(num_steps: int, T: int, spacing: str = "leading", steps_offset: int = 1) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps (no lambda clipping, no karras): descending int64 indices."""
    _check_steps(num_steps, T)
    if spacing == "linspace":
        return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = T // (num_steps + 1)
        return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")


def euler_timesteps(num_steps: int, T: int, spacing: str = "leading", steps_offset: int = 1) -> np.ndarray:
    """EulerDiscreteScheduler.set_timesteps: descending float32; fractional for 'linspace' (sigmas interpolated)."""
    _check_steps(num_steps, T)
    if spacing == "linspace":
        return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(num_steps) * (T // num_steps)).round()[::-1].astype(np.float32) + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / num_steps).round().astype(np.float32) - 1
    raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")


def distill_grid(distill_steps: int, T: int) -> np.ndarray:
    """The CoDi grid {0, T/N, ..., T - T/N} (int64, ascending): training uses t = grid[k], s = grid[k - 1]."""
    if not isinstance(distill_steps, (int, np.integer)) or not 2 <= distill_steps <= T:
        raise ValueError(f"distill_steps must be an int in [2, {T}], got {distill_steps!r}")
    return (np.arange(distill_steps, dtype=np.int64) * T) // distill_steps


def codi_timesteps(num_steps: int, distill_steps: int, T: int) -> np.ndarray:
    """Few-step consistency inference timesteps: `num_steps` distinct entries of the training grid, evenly spread from
    the top, grid[N - 1 - floor(j N / num_steps)] for j < num_steps, each > 0.

    LCM's stride rule grid[::-1][::ceil(N / steps)] can end on n = 0, where the boundary (c_out = 0) ignores the network,
    and can return fewer entries than asked (N=25, 8 steps -> 7 entries ending at 0); here every step is one model
    evaluation whose output is used. num_steps <= N - 1 (the grid has N - 1 entries above 0)."""
    if not isinstance(distill_steps, (int, np.integer)) or not 2 <= distill_steps <= T:
        raise ValueError(f"distill_steps must be an int in [2, {T}], got {distill_steps!r}")
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps < distill_steps:
        raise ValueError(f"num_steps must be an int in [1, distill_steps - 1 = {distill_steps - 1}] (the grid's "
                         f"entries above n = 0), got {num_steps!r}")
    k = distill_steps - 1 - (np.arange(num_steps) * distill_steps) // num_steps
    return distill_grid(distill_steps, T)[k].copy()
