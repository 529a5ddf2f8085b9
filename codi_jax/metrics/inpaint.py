"""Inpainting fidelity, per image: does the known region come back unchanged, and is the hole filled right?

    hole = hole_of(cond)                              # (N, H, W) bool from the condition's mask channel
    scores = inpaint_scores(fake, real, hole)         # {'psnr_known', 'psnr_hole', 'ssim_hole'}: (N,) float64
    agree = label_agreement(segment(fake), segment(real), hole)   # (N,): the colour segmenter's labels in the hole
    filled = mean_fill(real, hole)                    # the reference fill: the known region's mean colour

Conventions, and why:
- Images are RGB, uint8 [0, 255] or float [0, 1] (floats clipped to [0, 1], as saving them does); data range 1.
- psnr_known: PSNR over the pixels outside the hole (all three channels), against the ground truth, which is the
  input there. It says whether the known region returns unchanged: the model regenerates every pixel and decodes
  through the VAE, so it is never exact unless a method pastes the known pixels back.
- psnr_hole: the same over the hole's pixels only, against the ground truth: whether the fill matches what was there.
- PSNR is capped at PSNR_CAP = 100 dB (MSE floored at 1e-10): an exact region (a paste-back, or the mean fill's known
  region) scores 100 dB, not +inf, so a row can be averaged and bootstrapped. One uint8 level off in one channel of
  one pixel of a 32x32 image's known region already scores 10 log10(3 * 1024 * 255^2) = 83 dB, below the cap; at
  256 px and above a handful of one-level differences can reach it, a difference no PSNR reading tells apart anyway.
- ssim_hole: the mean over the hole's pixels of the SSIM map (Wang et al. 2004: Gaussian window sigma 1.5 truncated
  at 3.5 sigma, i.e. 11x11, K1 = 0.01, K2 = 0.03, population statistics), averaged over the three channels. The map is
  computed at every pixel with the image borders mirrored (scipy.ndimage 'reflect', as scikit-image's
  structural_similarity(full=True) computes it), so holes that touch the border are scored all the way out; the
  whole-image SSIM of the report (codi_jax.metrics.image.ssim) averages only the positions whose window fits in the
  image instead. A window centred in the hole reaches up to 5 px into the known region, so a fill that continues its
  surroundings smoothly scores higher at the hole's edge than in its middle: that is SSIM's structure term, and the
  reason to read psnr_hole beside it.
- label_agreement: the fraction of the hole's pixels to which the colour segmenter (codi_jax.metrics.captions: one
  of 'background' and the ten palette colours per pixel) gives the output the same label as the ground truth. It
  asks whether the hole shows the same things (which object colour, or background) as the ground truth, pixel by
  pixel, where PSNR weighs every colour difference alike (a grey smear can beat a sharp object drawn one pixel off).
  Both label maps are the segmenter's readings, so its ceiling is not 1 but what it reads on the VAE round trip.
- An image whose hole (or known region) is empty has no score there: NaN, which the task's metrics leave out.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PSNR_CAP = 100.0
MSE_FLOOR = 10.0 ** (-PSNR_CAP / 10.0)
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
SCORE_NAMES = ("psnr_known", "psnr_hole", "ssim_hole")


def _unit(images, what: str) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] (N, H, W, 3) -> float64 in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be RGB images (N, H, W, 3), got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 or float in [0, 1], got {images.dtype}")
    return np.clip(images.astype(np.float64), 0.0, 1.0)


def _check_hole(hole, shape: tuple[int, ...]) -> np.ndarray:
    hole = np.asarray(hole)
    if hole.shape != shape[:3]:
        raise ValueError(f"the hole mask must be (N, H, W) {shape[:3]} for images of shape {shape}, got {hole.shape}")
    return hole.astype(bool)


def hole_of(cond) -> np.ndarray:
    """The inpaint condition (N, H, W, 4), mask channel in {-1, 1} (1 = hole) -> (N, H, W) bool, True in the hole."""
    cond = np.asarray(cond)
    if cond.ndim != 4 or cond.shape[-1] != 4:
        raise ValueError(f"an inpaint condition is (N, H, W, 4) with the mask last, got shape {cond.shape}")
    return cond[..., 3] > 0


def region_psnr(fake, real, region) -> np.ndarray:
    """(N,) PSNR in dB (data range 1, capped at PSNR_CAP) over each image's `region` (N, H, W) bool, all three
    channels; NaN for an image whose region is empty."""
    fake, real = _unit(fake, "fake"), _unit(real, "real")
    if fake.shape != real.shape:
        raise ValueError(f"fake and real must have the same shape, got {fake.shape} and {real.shape}")
    region = _check_hole(region, fake.shape)
    count = 3 * region.sum(axis=(1, 2))
    sq = np.sum(((fake - real) ** 2).sum(axis=-1) * region, axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = sq / count
        return np.where(count > 0, 10.0 * np.log10(1.0 / np.maximum(mse, MSE_FLOOR)), np.nan)


def ssim_map(fake, real) -> np.ndarray:
    """(N, H, W) SSIM map of each image, averaged over the channels; borders reflected (module docstring)."""
    x, y = _unit(fake, "fake"), _unit(real, "real")
    if x.shape != y.shape:
        raise ValueError(f"fake and real must have the same shape, got {x.shape} and {y.shape}")

    def blur(a):  # each channel of each image on its own: no smoothing across the batch or the channels
        return ndimage.gaussian_filter(a, sigma=(0, SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE,
                                       mode="reflect")

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=-1)


def hole_ssim(fake, real, hole) -> np.ndarray:
    """(N,) mean of the SSIM map over each image's hole; NaN for an image without a hole."""
    s = ssim_map(fake, real)
    hole = _check_hole(hole, s.shape + (3,))
    count = hole.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (s * hole).sum(axis=(1, 2)) / count, np.nan)


def inpaint_scores(fake, real, hole) -> dict[str, np.ndarray]:
    """Per-image {'psnr_known', 'psnr_hole', 'ssim_hole'}, each (N,) float64 (module docstring); hole (N, H, W)."""
    hole = np.asarray(hole, bool)
    return {"psnr_known": region_psnr(fake, real, ~hole), "psnr_hole": region_psnr(fake, real, hole),
            "ssim_hole": hole_ssim(fake, real, hole)}


def label_agreement(labels_fake, labels_real, hole) -> np.ndarray:
    """(N,) fraction of each image's hole pixels whose labels (N, H, W) agree; NaN for an image without a hole."""
    labels_fake, labels_real, hole = np.asarray(labels_fake), np.asarray(labels_real), np.asarray(hole, bool)
    if not labels_fake.shape == labels_real.shape == hole.shape or hole.ndim != 3:
        raise ValueError(f"labels and hole must all be (N, H, W), got {labels_fake.shape}, {labels_real.shape} and "
                         f"{hole.shape}")
    count = hole.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, ((labels_fake == labels_real) & hole).sum(axis=(1, 2)) / count, np.nan)


def mean_fill(real, hole) -> np.ndarray:
    """uint8 (N, H, W, 3): each image with its hole painted in the mean colour of its known region (rounded), the
    known region as it is. What a fill scores with no idea of what was there beyond the average surrounding colour;
    an image with no known pixel is filled with mid-grey, what the condition shows in the hole."""
    real = np.asarray(real)
    if real.dtype != np.uint8 or real.ndim != 4 or real.shape[-1] != 3:
        raise ValueError(f"mean_fill needs uint8 RGB images (N, H, W, 3), got {real.dtype} {real.shape}")
    hole = _check_hole(hole, real.shape)
    known = ~hole
    count = known.sum(axis=(1, 2))[:, None]
    total = (real.astype(np.float64) * known[..., None]).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        colour = np.where(count > 0, total / count, 127.5)
    colour = np.round(colour).astype(np.uint8)  # 127.5 rounds to 128 (half to even)
    return np.where(hole[..., None], colour[:, None, None, :], real)
