"""Diffusion math as pure functions: schedules, parameterisations, samplers, objectives (no Flax modules here)."""

from codi_jax.diffusion import objectives
from codi_jax.diffusion.objectives import OBJECTIVES, Networks
from codi_jax.diffusion.parameterization import (PREDICTION_TYPES, boundary, boundary_coefficients, consistency_output,
                                                 ddim_step, from_x_eps, guide, to_x_eps)
from codi_jax.diffusion.samplers import METHODS, sample
from codi_jax.diffusion.schedules import (Schedule, codi_timesteps, ddim_timesteps, distill_grid, dpm_timesteps,
                                          euler_timesteps, make_schedule)

__all__ = [
    "objectives", "OBJECTIVES", "Networks",
    "PREDICTION_TYPES", "boundary", "boundary_coefficients", "consistency_output", "ddim_step", "from_x_eps", "guide",
    "to_x_eps", "METHODS", "sample", "Schedule", "codi_timesteps", "ddim_timesteps", "distill_grid", "dpm_timesteps",
    "euler_timesteps", "make_schedule",
]
