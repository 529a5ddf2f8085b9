"""Text-to-image: no condition image. The task of the stages that make a teacher (configs/vae.py, pretrain.py)."""

from codi_jax.tasks.base import Task

TASK = Task(name="t2i", summary="text-to-image: a caption only (the teacher's task)", channels=0,
            tag="text-to-image", pipeline_tag="text-to-image",
            sample_help="--prompt only (a 'pretrain' export, the shipped codi_jax/pretrained/scenes32, any\n"
                        "diffusers SD folder)")
