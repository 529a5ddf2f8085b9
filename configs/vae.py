"""Autoencoder training on the procedural scenes (the embedded default has no pretrained VAE).

    python -m codi_jax.main --config=configs/vae.py:tiny --workdir=runs/vae

Variants: tiny, steps=N, batch=N.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("t2i")
    c.mode = "vae"
    common.apply_variants(c, arg)
    c.optimizer.learning_rate = max(c.optimizer.learning_rate, 1e-4)
    return common.finalize(c)
