"""Instruction editing: the condition is the input image, the text is the instruction (InstructPix2Pix data).

    # SD1.5 scale, full CoDi: the teacher folder gives image size, tokenizer, prediction type and schedule
    python -m codi_jax.main --config=configs/edit.py --workdir=gs://bucket/edit \\
        --config.teacher=/data/stable-diffusion-v1-5 --config.data.dataset=folder --config.data.data_dir=/data/images
    # PE-CoDi (frozen UNet); ':gpu' sizes a run for one 80 GB GPU (launch/gpu_local.sh)
    python -m codi_jax.main --config=configs/edit.py:pe --workdir=gs://bucket/edit-pe --config.teacher=... [data flags]
    python -m codi_jax.main --config=configs/edit.py:tiny --workdir=runs/edit-tiny       # the whole pipeline on a CPU

Variants (comma-separated after the colon): tiny, gpu, pe, mode=<vae|pretrain|finetune|codi|pe_codi|cm|gd>, steps=N, batch=N.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("edit")
    common.apply_variants(c, arg)
    return common.finalize(c)
