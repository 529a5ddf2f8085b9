"""Tasks: turn a raw record (image, caption[, depth][, input_image]) into a training example.

Output: 'image' float32 (H,W,3) in [-1,1] (the target), 'cond' float32 (H,W,C) in [-1,1] (absent for t2i) and
'caption' str (the text the model is conditioned on; the instruction for edit).

The condition builders below are also what `python -m codi_jax.sample` applies to a user's input (a depth map, a
low-res image, a photo and its mask, an image to edit), so that inference sees the conditions training saw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from codi_jax.data import degradations, masks

TASKS = ("depth", "sr", "inpaint", "edit", "t2i")
COND_CHANNELS = {"depth": 1, "sr": 3, "inpaint": 4, "edit": 3, "t2i": 0}


def to_signed(u8: np.ndarray) -> np.ndarray:
    return (np.asarray(u8, np.float32) / 127.5 - 1.0).astype(np.float32)


DEPTH_KINDS = ("disparity", "depth")  # what a depth map's values are: larger = nearer, or larger = farther


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
    if kind not in DEPTH_KINDS:
        raise ValueError(f"depth kind must be one of {DEPTH_KINDS}, got {kind!r}")
    return disparity_condition({kind: values})


def sr_condition_from_lowres(lowres: np.ndarray, height: int, width: int) -> np.ndarray:
    """The sr condition from a low-res image (h,w,3) in [0,1]: bicubic up to (height, width), clipped, in [-1,1]. The
    last step of training's condition (degradations.sr_condition), after the degradation made the low-res image."""
    up = np.clip(degradations.resize(np.asarray(lowres, np.float32), height, width, "bicubic"), 0, 1)
    return up.astype(np.float32) * 2 - 1


def hole_mask(values: np.ndarray, convention: str = "white") -> np.ndarray:
    """A user's mask (H,W) in [0,1] -> the inpaint task's hole mask in {0,1} (1 = hole to fill), thresholded at
    0.5 because training's masks are binary. convention 'white': white (1) marks the hole (a mask image);
    'alpha': transparent (alpha 0) marks it (an RGBA photo's alpha channel)."""
    values = np.asarray(values, np.float32)
    if convention == "white":
        return (values >= 0.5).astype(np.float32)
    if convention == "alpha":
        return (values < 0.5).astype(np.float32)
    raise ValueError(f"mask convention must be 'white' or 'alpha', got {convention!r}")


def condition_rgb(cond: np.ndarray) -> np.ndarray:
    """A condition (..., C) as an image to look at, (..., 3), same value range: depth's one channel as grey, the
    first three channels otherwise (inpaint: the masked image; its mask channel is dropped)."""
    return cond[..., :3] if cond.shape[-1] >= 3 else np.repeat(cond[..., :1], 3, axis=-1)


def inpaint_condition(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked image (holes set to 0, i.e. mid-grey) and the mask in [-1,1] (1 = hole): (H,W,4)."""
    keep = (1.0 - mask)[..., None]
    return np.concatenate([image * keep, (mask * 2 - 1)[..., None]], -1).astype(np.float32)


def make_example(task: str, rec: dict[str, Any], rng: np.random.Generator, *, sr_scale: int = 4,
                 mask_fraction: float = 0.3, text_dropout: float = 0.0) -> dict[str, Any]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    image = to_signed(rec["image"])
    out: dict[str, Any] = {"image": image, "caption": rec.get("caption", "")}
    if task == "depth":
        out["cond"] = disparity_condition(rec)
    elif task == "sr":
        hr = np.asarray(rec["image"], np.float32) / 255.0
        out["cond"] = sr_condition_from_lowres(degradations.degrade(hr, rng, sr_scale), hr.shape[0], hr.shape[1])
    elif task == "inpaint":
        out["cond"] = inpaint_condition(image, masks.random_mask(rng, image.shape[0], image.shape[1], mask_fraction))
    elif task == "edit":
        if "input_image" not in rec:
            raise ValueError("task 'edit' needs an 'input_image' field (edit folders, tfds_edit_input_key, or scenes)")
        out["cond"] = to_signed(rec["input_image"])
    # Empty captions teach the unconditional branch for classifier-free guidance.
    if text_dropout > 0 and rng.random() < text_dropout:
        out["caption"] = ""
    if "cond" in out:
        out["cond"] = out["cond"].astype(np.float32)
    return out
