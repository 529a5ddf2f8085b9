"""Instruction editing: the condition is the image to edit, the caption the instruction (InstructPix2Pix's setting)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from codi_jax.tasks import inputs
from codi_jax.tasks.base import Options, SampleInput, Task, to_signed


def _condition(rec: dict, rng: np.random.Generator, options: Options) -> dict[str, np.ndarray]:
    if "input_image" not in rec:
        raise ValueError("task 'edit' needs an 'input_image' field (edit folders, tfds_edit_input_key, or scenes)")
    return {"cond": to_signed(rec["input_image"])}


def _sample_condition(item: SampleInput):
    image = inputs.open_image(item.path, "image").convert("RGB")
    pixels, box, note = inputs.fit(image, item.size, item.fit_how or "crop", Image.Resampling.BICUBIC)
    return to_signed(pixels), box, note


TASK = Task(
    name="edit", summary="instruction editing: the image to edit and an instruction", channels=3,
    condition=_condition, record_fields={"input_image": "tfds_edit_input_key"}, paired=True,
    # the caption is the instruction, not a description of the target
    reads_captions=False, tag="image-editing",
    sample_input="the image to edit", sample_help='--image=input.png --prompt="the instruction"',
    sample_condition=_sample_condition,
    diffusers_input=lambda meta: [
        f"# the image to edit at {meta.get('image_size', 512)} px, [0, 255] -> [-1, 1]; the prompt is the instruction",
        "image = np.asarray(Image.open('input.png').convert('RGB'), np.float32) / 127.5 - 1",
        "cond = torch.from_numpy(image).permute(2, 0, 1)[None]"],
)
