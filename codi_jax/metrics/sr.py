"""Super-resolution fidelity, computed the way the SR literature reports it (BasicSR, Real-ESRGAN, StableSR, CoDi).

    scores = sr_scores(fake, real, lowres, scale=4)   # fake/real (N, H, W, 3), lowres (N, H/4, W/4, 3)
    scores["psnr_y"], scores["ssim_y"], ...           # (N,) float64 numpy, one value per image
    mean, low, high = stats.bootstrap_ci(scores["psnr_y"])

Conventions, and why:
- Inputs are RGB, uint8 [0, 255] or float [0, 1] (float outputs are clipped to [0, 1], as saving them to uint8 does
  in BasicSR's tensor2img), and every score uses data range 1: the same numbers as BasicSR's [0, 255] ones.
- Y channel: luma of ITU-R BT.601 in studio range, as MATLAB's rgb2ycbcr and BasicSR's bgr2ycbcr(y_only=True),
  Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 with R, G, B in [0, 1], so Y lies in [16/255, 235/255]. It is not
  rounded to 8 bits (BasicSR's to_y_channel does not round either). psnr_y / ssim_y are the numbers SR papers quote
  ("PSNR/SSIM on Y"); psnr_rgb / ssim_rgb (SSIM averaged over the three channels) are reported alongside.
- Border: crop_border pixels are dropped on every side before PSNR/SSIM, defaulting to crop_border = scale, as
  BasicSR's calculate_psnr / calculate_ssim(crop_border=scale, test_y_channel=True) in its SR test configs: the
  border is where the degradation's and the upsampler's padding dominate.
- SSIM: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, mean over the valid positions
  (codi_jax.metrics.image.ssim; BasicSR's _ssim computes the same with cv2.GaussianBlur and a 5 px valid crop).
- lr_rmse: RMSE (data range 1, no crop) between the output brought back to the low-resolution grid by area averaging
  over scale x scale blocks (exact for an integer scale) and the low-resolution input it was conditioned on. It
  measures whether the output is consistent with its own input (0 for a nearest-neighbour upsampling of it), which
  PSNR against the ground truth cannot tell apart from hallucinated detail. Its floor is not 0 for real data: the
  Real-ESRGAN degradation (blur, noise, JPEG) makes the low-res image differ from the area-downsampled ground truth,
  so report it next to the same number for the ground truth (sr_scores(real, real, lowres, ...)["lr_rmse"]).
PSNR is +inf for an image identical to its reference; compare medians or clip before averaging if that can occur.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.metrics import image

# BT.601 studio-range luma for R, G, B in [0, 1], giving Y in [16, 235] (MATLAB rgb2ycbcr's 'Y' row).
Y_OFFSET = 16.0
Y_WEIGHTS = (65.481, 128.553, 24.966)
SSIM_WINDOW = 11


def rgb_to_y(images):
    """Float [0, 1] RGB (..., H, W, 3) -> BT.601 luma Y (..., H, W, 1) in [16/255, 235/255], same array type.

    A weighted sum rather than a matmul, so accelerators that lower float32 matmuls to TF32/bf16 give the exact value.
    """
    if images.shape[-1] != 3:
        raise ValueError(f"rgb_to_y needs RGB images (..., H, W, 3), got shape {tuple(images.shape)}")
    r, g, b = images[..., 0:1], images[..., 1:2], images[..., 2:3]
    wr, wg, wb = Y_WEIGHTS
    return (Y_OFFSET + wr * r + wg * g + wb * b) / 255.0


def crop(images, border: int):
    """(N, H, W, C) -> (N, H - 2 border, W - 2 border, C); at least SSIM's 11x11 window must remain."""
    if isinstance(border, bool) or not isinstance(border, (int, np.integer)) or border < 0:
        raise ValueError(f"crop_border must be an integer >= 0, got {border!r}")
    h, w = images.shape[-3], images.shape[-2]
    if h - 2 * border < SSIM_WINDOW or w - 2 * border < SSIM_WINDOW:
        raise ValueError(f"crop_border={border} leaves {max(h - 2 * border, 0)}x{max(w - 2 * border, 0)} of images of "
                         f"shape {tuple(images.shape)}; SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW}: "
                         f"lower crop_border or use larger images")
    if border == 0:
        return images
    return images[..., border:h - border, border:w - border, :]


def _check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    return int(scale)


def downsample(images, scale: int) -> np.ndarray:
    """(N, H, W, C) uint8 or float [0, 1] -> (N, H/scale, W/scale, C) float32 in [0, 1]: the mean of each
    scale x scale block (area resampling)."""
    scale = _check_scale(scale)
    images = image.as_unit_float(images, channels=None)
    n, h, w, c = images.shape
    if h % scale or w % scale:
        raise ValueError(f"downsample by scale={scale} needs H and W divisible by {scale}, got images of shape "
                         f"{images.shape}")
    blocks = images.astype(np.float64).reshape(n, h // scale, scale, w // scale, scale, c)
    return blocks.mean(axis=(2, 4)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("border",))
def _scores(pairs, border: int):
    """(B, 2, H, W, 3) float [0, 1] (output, reference) -> (B, 4): psnr_rgb, ssim_rgb, psnr_y, ssim_y."""
    fake, real = crop(pairs[:, 0], border), crop(pairs[:, 1], border)
    fake_y, real_y = rgb_to_y(fake), rgb_to_y(real)
    return jnp.stack([image.psnr(fake, real, 1.0), image.ssim(fake, real, 1.0),
                      image.psnr(fake_y, real_y, 1.0), image.ssim(fake_y, real_y, 1.0)], axis=-1)


SCORE_NAMES = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y", "lr_rmse")


def sr_scores(fake, real, lowres, *, scale: int, crop_border: int | None = None,
              batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-image SR scores of outputs `fake` against ground truth `real` and the low-res inputs `lowres`.

    fake, real: (N, H, W, 3) uint8 or float [0, 1]; lowres: (N, H/scale, W/scale, 3) uint8 or float [0, 1].
    Returns {'psnr_rgb', 'ssim_rgb', 'psnr_y', 'ssim_y', 'lr_rmse'}, each (N,) float64 numpy (PSNR in dB; see the
    module docstring for the conventions). crop_border defaults to scale.
    """
    scale = _check_scale(scale)
    border = scale if crop_border is None else crop_border
    fake = np.clip(image.as_unit_float(fake), 0.0, 1.0)
    real = np.clip(image.as_unit_float(real), 0.0, 1.0)
    lowres = np.clip(image.as_unit_float(lowres), 0.0, 1.0)
    n, h, w, _ = fake.shape
    if (real.shape != fake.shape or h % scale or w % scale
            or lowres.shape != (n, h // scale, w // scale, 3)):
        raise ValueError(f"sr_scores needs fake and real of equal shape (N, H, W, 3) with H, W divisible by "
                         f"scale={scale}, and lowres of shape (N, H/{scale}, W/{scale}, 3); got fake {fake.shape}, "
                         f"real {real.shape}, lowres {lowres.shape}")
    crop(fake, border)  # raises here, with the shapes, rather than inside the traced function
    scores = image.map_batches(functools.partial(_scores, border=int(border)), np.stack([fake, real], axis=1),
                               min(batch_size, n), (4,))
    out = {name: scores[:, i].astype(np.float64) for i, name in enumerate(SCORE_NAMES[:4])}
    diff = downsample(fake, scale).astype(np.float64) - lowres.astype(np.float64)
    out["lr_rmse"] = np.sqrt(np.mean(diff ** 2, axis=(1, 2, 3)))
    return out
