"""Inpainting: the condition is the masked image and the mask (Palette-style free-form masks).

    # SD1.5 scale, full CoDi: the teacher folder gives image size, tokenizer, prediction type and schedule
    python -m codi_jax.main --config=configs/inpaint.py --workdir=gs://bucket/inpaint \\
        --config.teacher=/data/stable-diffusion-v1-5 --config.data.dataset=folder --config.data.data_dir=/data/images
    # PE-CoDi (frozen UNet); ':gpu' sizes a run for one 80 GB GPU (launch/gpu_local.sh)
    python -m codi_jax.main --config=configs/inpaint.py:pe --workdir=gs://bucket/inpaint-pe --config.teacher=... [data flags]
    python -m codi_jax.main --config=configs/inpaint.py:tiny --workdir=runs/inpaint-tiny       # the whole pipeline on a CPU

Variants (comma-separated after the colon): tiny, gpu, pe, mode=<vae|pretrain|finetune|codi|pe_codi|cm|gd>, steps=N, batch=N.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("inpaint")
    common.apply_variants(c, arg)
    return common.finalize(c)
