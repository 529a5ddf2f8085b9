"""Real-world x4 super-resolution: the condition is a Real-ESRGAN-degraded image resized back (paper 5, DF2K).

    python -m codi_jax.main --config=configs/sr.py --workdir=gs://bucket/sr          # SD1.5 scale, full CoDi
    python -m codi_jax.main --config=configs/sr.py:pe --workdir=gs://bucket/sr-pe    # PE-CoDi (frozen UNet)
    python -m codi_jax.main --config=configs/sr.py:tiny --workdir=runs/sr-tiny       # the whole pipeline on a CPU

Variants (comma-separated after the colon): tiny, pe, mode=<vae|pretrain|finetune|codi|pe_codi|cm|gd>, steps=N, batch=N.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("sr")
    common.apply_variants(c, arg)
    return common.finalize(c)
