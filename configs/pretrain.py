"""Text-to-image teacher pretraining (or fine-tuning of a pretrained teacher) with the diffusion loss.

    python -m codi_jax.main --config=configs/pretrain.py:tiny --workdir=runs/teacher
    python -m codi_jax.main --config=configs/pretrain.py --config.teacher=/path/to/sd15 --workdir=gs://bucket/teacher

Variants: tiny, steps=N, batch=N.
"""

from codi_jax import config as common


def get_config(arg=None):
    c = common.base("t2i")
    c.mode = "pretrain"
    common.apply_variants(c, arg)
    return common.finalize(c)
