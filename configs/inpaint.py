"""Inpainting: the condition is the masked image and the mask (Palette-style free-form masks).

    python -m codi_jax.main --config=configs/inpaint.py --workdir=gs://bucket/inpaint          # SD1.5 scale, full CoDi
    python -m codi_jax.main --config=configs/inpaint.py:pe --workdir=gs://bucket/inpaint-pe    # PE-CoDi (frozen UNet)
    python -m codi_jax.main --config=configs/inpaint.py:tiny --workdir=runs/inpaint-tiny       # the whole pipeline on a CPU

Variants (comma-separated after the colon): tiny, pe, mode=<vae|pretrain|finetune|codi|pe_codi|cm|gd>, steps=N, batch=N.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("inpaint")
    common.apply_variants(c, arg)
    return common.finalize(c)
