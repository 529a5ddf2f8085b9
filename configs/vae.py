"""Autoencoder training on the procedural scenes (the embedded default has no pretrained VAE).

    python -m codi_jax.main --config=configs/vae.py:tiny --workdir=runs/vae

Variants: tiny, steps=N, batch=N.

config.vae.chroma_weight adds an L1 on each pixel's colour less its grey, so small coloured objects keep their hue
(an RGB L1 alone is dominated by the grey floor and sky). config.vae.train=decoder fine-tunes only the decoder of
config.vae_from: the latents, and any teacher trained on them, stay valid. Check a VAE's colours with
`python tools/vae_colours.py --pipeline=<a pipeline folder with this vae/>`.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("t2i")
    c.mode = "vae"
    common.apply_variants(c, arg)
    c.optimizer.learning_rate = max(c.optimizer.learning_rate, 1e-4)
    return common.finalize(c)
