"""Flax linen models (NHWC, diffusers/transformers parameter names): layers, unet, controlnet, conditional, vae, clip.

Import the submodule you need (`from codi_jax.models import unet`); nothing heavy is imported here.
"""

import dataclasses


def with_compute(module, dtype, remat: bool):
    """The same module with another compute dtype / remat setting (params are unaffected)."""
    cfg = module.config
    updates = {}
    if hasattr(cfg, "dtype"):
        updates["dtype"] = dtype
    if hasattr(cfg, "remat"):
        updates["remat"] = remat
    return type(module)(dataclasses.replace(cfg, **updates))
