"""Inpainting: the condition is the image with its hole set to mid-grey, and the hole mask (Palette's setting). The
hole is a free-form or box mask, or one object of a procedural scene (data.mask_kind, codi_jax/data/masks.py)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from codi_jax.data import masks
from codi_jax.tasks import inputs
from codi_jax.tasks.base import Options, SampleInput, Task, to_signed


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


def inpaint_condition(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked image (holes set to 0, i.e. mid-grey) and the mask in [-1,1] (1 = hole): (H,W,4)."""
    keep = (1.0 - mask)[..., None]
    return np.concatenate([image * keep, (mask * 2 - 1)[..., None]], -1).astype(np.float32)


def _condition(rec: dict, rng: np.random.Generator, options: Options) -> dict[str, np.ndarray]:
    image = to_signed(rec["image"])
    return {"cond": inpaint_condition(image, masks.make_mask(rng, image.shape[0], image.shape[1], options.mask_kind,
                                                             options.mask_fraction, rec.get("ids")))}


def _metrics(scorer, images: np.ndarray) -> dict:
    """Known region unchanged (psnr_known), hole filled right (psnr_hole, ssim_hole) and, where the colour segmenter
    reads the images (the procedural scenes), the same things drawn back in the hole (hole_label_agreement): per image
    against the ground truth, mean and bootstrap interval (codi_jax/metrics/inpaint.py says what each measures)."""
    if scorer.cond is None:
        return {}
    # The ground truth against itself: every score is its ceiling (100 dB, SSIM 1, agreement 1) and says nothing.
    if np.array_equal(images, scorer.real):
        return {}
    from codi_jax.metrics import inpaint, stats

    hole = inpaint.hole_of(scorer.cond)
    per_image = inpaint.inpaint_scores(images, scorer.real, hole)
    if scorer.segmenter is not None:
        from codi_jax.metrics import captions

        per_image["hole_label_agreement"] = inpaint.label_agreement(
            captions.segment(scorer.segmenter, images), captions.segment(scorer.segmenter, scorer.real), hole)
    # NaN: an image with no hole (or nothing known) has no score there; the others are averaged.
    return stats.with_ci({k: v[np.isfinite(v)] for k, v in per_image.items()}, "", scorer.seed)


MEAN_FILL = "mean fill (the known region's mean colour)"


def _references(real: np.ndarray, cond: np.ndarray, extras: dict) -> dict[str, np.ndarray]:
    """The hole painted in the known region's mean colour, per image: what a fill scores that knows nothing of the
    hole beyond its surroundings' average; hole_label_agreement's floor in the issue's "closes half the gap" test."""
    from codi_jax.metrics import inpaint

    return {MEAN_FILL: inpaint.mean_fill(real, inpaint.hole_of(cond))}


def _hole(item: SampleInput, image: Image.Image, how: str) -> tuple[np.ndarray, str]:
    """The hole mask {0,1} (1 = fill) at the model's size, from --mask (white = fill) or the image's alpha (0 = fill),
    fitted with the same geometry as the image; padding is never a hole."""
    path, mask_path, size = item.path, item.mask, item.size
    if mask_path is not None:
        mask = inputs.read_mask(mask_path)
        if mask.size != image.size:
            raise ValueError(f"mask {mask_path!r} is {mask.size[0]}x{mask.size[1]} but its image {path!r} is "
                             f"{image.size[0]}x{image.size[1]}: a mask must have its image's size")
        convention, source = "white", os.path.basename(mask_path)
    else:
        alpha = inputs.alpha(image)
        if alpha is None:
            raise ValueError(f"inpainting {path!r} needs a mask: pass --mask=mask.png (white = fill), or an RGBA image "
                             "whose transparent pixels (alpha 0) mark the hole")
        mask, convention, source = Image.fromarray(alpha), "alpha", "alpha"
    values, _, _ = inputs.fit(mask, size, how, Image.Resampling.BILINEAR,
                              pad_value=0.0 if convention == "white" else 1.0)
    hole = hole_mask(values, convention)
    if not hole.any():
        raise ValueError(f"the mask of {path!r} ({source}) marks nothing to fill" +
                         (f" once fitted with --fit={how} (try --fit=pad)" if mask.size != (size, size) else
                          (": white marks the hole" if convention == "white" else ": alpha 0 marks the hole")))
    return hole, f", mask: {source} ({'white' if convention == 'white' else 'alpha 0'} = fill, {hole.mean():.0%})"


def _sample_condition(item: SampleInput):
    image = inputs.open_image(item.path, "image")
    how = item.fit_how or "crop"
    pixels, box, note = inputs.fit(image.convert("RGB"), item.size, how, Image.Resampling.BICUBIC)
    hole, mask_note = _hole(item, image, how)
    return inpaint_condition(to_signed(pixels), hole), box, note + mask_note


TASK = Task(
    name="inpaint", summary="inpainting: an image with a hole (free-form, box or object-shaped mask) and a caption",
    channels=4,
    condition=_condition, tag="inpainting", metrics=_metrics,
    metric_directions={"psnr_known": False, "psnr_hole": False, "ssim_hole": False, "hole_label_agreement": False},
    segmenter_metrics=("hole_label_agreement",), references=_references,
    sample_input="a photo, with --mask or alpha", sample_flags=("--mask",),
    sample_help="--image=photo.png --mask=mask.png (white = fill), or --image=photo.png with alpha 0 = fill",
    sample_condition=_sample_condition,
    diffusers_input=lambda meta: [
        f"# a photo and its mask (white = fill) at {meta.get('image_size', 512)} px: the hole mid-grey, the mask as a "
        "fourth channel",
        "image = np.asarray(Image.open('photo.png').convert('RGB'), np.float32) / 127.5 - 1",
        "hole = np.asarray(Image.open('mask.png').convert('L'), np.float32)[..., None] >= 127.5",
        "cond = torch.from_numpy(np.concatenate([image * ~hole, hole * 2.0 - 1], -1)).permute(2, 0, 1)[None].float()"],
)
