"""Depth-to-image: the condition is a depth map (paper 5, WebLI depth; here any folder with precomputed depth).

    # SD1.5 scale, full CoDi: the teacher folder gives image size, tokenizer, prediction type and schedule
    python -m codi_jax.main --config=configs/depth.py --workdir=gs://bucket/depth \\
        --config.teacher=/data/stable-diffusion-v1-5 --config.data.dataset=folder --config.data.data_dir=/data/images
    # PE-CoDi (frozen UNet); ':gpu' sizes a run for one 80 GB GPU (launch/gpu_local.sh)
    python -m codi_jax.main --config=configs/depth.py:pe --workdir=gs://bucket/depth-pe --config.teacher=... [data flags]
    python -m codi_jax.main --config=configs/depth.py:tiny --workdir=runs/depth-tiny       # CPU: CoDi from the shipped
                                                                                          # pretrained tiny teacher
    python -m codi_jax.main --config=configs/depth.py:tiny,scratch --workdir=runs/scratch  # CPU: VAE, teacher, CoDi

Variants (comma-separated after the colon): tiny, scratch, gpu (one 80 GB GPU), pe, mode=<vae|pretrain|finetune|codi|pe_codi|cm|gd>,
steps=N, batch=N.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("depth")
    common.apply_variants(c, arg)
    return common.finalize(c)
