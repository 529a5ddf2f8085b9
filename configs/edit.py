"""Instruction editing: the condition is the input image, the text is the instruction (InstructPix2Pix data).

    python -m codi_jax.main --config=configs/edit.py --workdir=gs://bucket/edit          # SD1.5 scale, full CoDi
    python -m codi_jax.main --config=configs/edit.py:pe --workdir=gs://bucket/edit-pe    # PE-CoDi (frozen UNet)
    python -m codi_jax.main --config=configs/edit.py:tiny --workdir=runs/edit-tiny       # the whole pipeline on a CPU

Variants (comma-separated after the colon): tiny, pe, mode=<vae|pretrain|finetune|codi|pe_codi|cm|gd>, steps=N, batch=N.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("edit")
    common.apply_variants(c, arg)
    return common.finalize(c)
