"""Depth-to-image: the condition is a relative depth map (MiDaS-style inverse depth, near = bright)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from codi_jax.tasks import inputs
from codi_jax.tasks.base import Options, Reader, SampleInput, Task

KINDS = ("disparity", "depth")  # what a depth map's values are: larger = nearer, or larger = farther
ERRORS = ("depth_rmse", "depth_si_rmse", "depth_delta1")


def disparity_condition(rec: dict[str, Any]) -> np.ndarray:
    """(H,W,1) in [-1,1], near = bright: MiDaS-style relative inverse depth, min-max normalised per image."""
    if "disparity" in rec:
        disp = np.asarray(rec["disparity"], np.float32)
    elif "depth" in rec:
        disp = 1.0 / np.maximum(np.asarray(rec["depth"], np.float32), 1e-3)
    else:
        raise ValueError("task 'depth' needs a 'depth' or 'disparity' field in the records")
    lo, hi = float(disp.min()), float(disp.max())
    norm = (disp - lo) / (hi - lo) if hi > lo else np.zeros_like(disp)
    return (norm * 2 - 1)[..., None].astype(np.float32)


def depth_condition(values: np.ndarray, kind: str = "disparity") -> np.ndarray:
    """A depth map (H,W) of either kind -> the depth task's condition (H,W,1), exactly as training builds it from a
    record: 'disparity' (prepare_depth's maps, near = bright) as is, 'depth' (metric, larger = farther) as 1/depth;
    then min-max normalised per image, near = bright. Any scale of the values (and, for disparity, any offset) gives
    the same condition."""
    if kind not in KINDS:
        raise ValueError(f"depth kind must be one of {KINDS}, got {kind!r}")
    return disparity_condition({kind: values})


def _condition(rec: dict, rng: np.random.Generator, options: Options) -> dict[str, np.ndarray]:
    return {"cond": disparity_condition(rec)}


def _load_estimator(path: str | None):
    from codi_jax.metrics import depth  # JAX: only when an evaluation loads it

    return depth.load_depth_estimator(path)


ESTIMATOR = Reader("depth_estimator", "depth estimator", "depth_scenes32", "python -m codi_jax.metrics.train_depth",
                   _load_estimator, ERRORS)


def _metrics(scorer, images: np.ndarray) -> dict:
    """Controllability: the depth error between what the estimator reads from each image and its conditioning map
    (as ControlNet++ measures it), mean and bootstrap interval."""
    model = scorer.readers.get(ESTIMATOR.field)
    if model is None or scorer.cond is None:
        return {}
    from codi_jax.metrics import depth, stats

    return stats.with_ci(depth.depth_errors(depth.predict(model, images), scorer.cond), "depth_", scorer.seed)


def _sample_condition(item: SampleInput):
    values, box, note = inputs.fit(inputs.read_depth(item.path, kind=item.depth_kind, convert=item.convert), item.size,
                                   item.fit_how or "crop", Image.Resampling.BILINEAR)
    note += f", {item.depth_kind} ({'near' if item.depth_kind == 'disparity' else 'far'} = bright)"
    return depth_condition(values, item.depth_kind), box, note


TASK = Task(
    name="depth", summary="depth-to-image: a relative depth map (near = bright) and a caption", channels=1,
    condition=_condition, record_fields={"depth": "tfds_depth_key"}, tag="depth-to-image", pipeline_tag="text-to-image",
    readers=(ESTIMATOR,), metrics=_metrics,
    metric_directions={"depth_rmse": True, "depth_si_rmse": True, "depth_delta1": False},
    sample_input="a depth map, near = bright", sample_flags=("--depth-kind", "--convert"),
    sample_help=("--image=depth.png: a depth map, one grey channel, 8- or 16-bit, as prepare_depth writes it:\n"
                 "disparity, near = bright (--depth-kind=depth for metric maps, larger = farther; 0 = no reading);\n"
                 "normalised per image to [-1, 1] (min-max), as in training, so its scale does not matter"),
    sample_condition=_sample_condition,
    diffusers_input=lambda meta: [
        f"# a depth map at {meta.get('image_size', 512)} px, one grey channel, disparity (near = bright), 8 or 16 bit;",
        "# normalised per image as in training",
        "d = np.asarray(Image.open('depth.png'), np.float32)",
        "cond = torch.from_numpy((d - d.min()) / max(d.max() - d.min(), 1e-8) * 2 - 1)[None, None]"],
)
