"""codi_jax: conditional diffusion distillation (CoDi, CVPR'24) in JAX/Flax."""

__version__ = "0.1.0"
