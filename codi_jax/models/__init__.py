"""Flax linen models (NHWC, diffusers/transformers parameter names): layers, unet, controlnet, conditional, vae, clip.

Import the submodule you need (`from codi_jax.models import unet`); nothing heavy is imported here.
"""
