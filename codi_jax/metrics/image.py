"""PSNR and SSIM in JAX (jittable), and the image-convention check shared by the network metrics.

Images are (..., H, W, C); leading dimensions are batch dimensions and each image gets its own score.
SSIM is Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population statistics,
averaged over the valid (unpadded) positions and the channels: the same number as
skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=..., channel_axis=-1) and tf.image.ssim.
"""

import jax
import jax.numpy as jnp
import numpy as np


def as_unit_float(images, channels: int | None = 3) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] (N, H, W, C) -> float32 [0, 1] numpy; raises on any other layout or range.

    Decoders overshoot [0, 1] slightly, which callers clip as the references do; values in [-1, 1] or [0, 255]
    stored as float are a convention bug and raise.
    """
    images = np.asarray(images)
    if images.ndim != 4 or (channels is not None and images.shape[-1] != channels):
        want = f"(N, H, W, {channels})" if channels is not None else "(N, H, W, C)"
        raise ValueError(f"images must be NHWC {want}, got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -0.05 or hi > 1.05:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return images.astype(np.float32)


def map_batches(fn, images: np.ndarray, batch_size: int, out_shape: tuple, dtype=np.float32) -> np.ndarray:
    """fn over fixed-size batches of `images`, the last one zero-padded, so one compiled program serves every call with
    the same image size; returns (N, *out_shape). The batches are as even as `batch_size` allows (64 images at 50:
    two of 32, not 50 and 14 padded to 50), so little is spent on padding: an evaluation calls this with the same
    N for every row, so it still compiles once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    if n:
        batch_size = -(-n // -(-n // batch_size))  # ceil(n / number of batches)
    out = np.empty((n, *out_shape), dtype)
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        m = batch.shape[0]
        if m < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - m, *batch.shape[1:]), batch.dtype)])
        out[start:start + m] = np.asarray(fn(jnp.asarray(batch)))[:m]
    return out


def _prepare(x, y, data_range: float):
    if x.shape != y.shape or x.ndim < 3:
        raise ValueError(f"images must have equal shapes (..., H, W, C), got {x.shape} and {y.shape}")
    for a in (x, y):
        if a.dtype == jnp.uint8 and data_range != 255:
            raise ValueError(f"uint8 images need data_range=255, got {data_range}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    # Scaling by the range first keeps float32 variances well conditioned for [0, 255] data (SSIM is scale-free).
    return jnp.asarray(x, jnp.float32) / data_range, jnp.asarray(y, jnp.float32) / data_range


def psnr(x, y, data_range: float = 1.0):
    """Peak signal-to-noise ratio in dB per image: 10 log10(range^2 / MSE); +inf for identical images."""
    x, y = _prepare(x, y, data_range)
    mse = jnp.mean((x - y) ** 2, axis=(-3, -2, -1))
    return -10.0 * jnp.log10(mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def _filter_valid(x, window):
    """Separable 'valid' Gaussian filter of every channel of (B, H, W, C)."""
    c = x.shape[-1]
    k = window.shape[0]
    dn = ("NHWC", "HWIO", "NHWC")
    prec = jax.lax.Precision.HIGHEST
    kh = jnp.broadcast_to(jnp.asarray(window).reshape(k, 1, 1, 1), (k, 1, 1, c))
    kw = jnp.broadcast_to(jnp.asarray(window).reshape(1, k, 1, 1), (1, k, 1, c))
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                     precision=prec)
    return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                        precision=prec)


def ssim(x, y, data_range: float = 1.0, filter_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03):
    """Structural similarity per image (mean of the SSIM map over valid positions and channels)."""
    x, y = _prepare(x, y, data_range)
    *batch, h, w, c = x.shape
    if h < filter_size or w < filter_size:
        raise ValueError(f"SSIM needs images of at least {filter_size}x{filter_size}, got {h}x{w}")
    x, y = x.reshape(-1, h, w, c), y.reshape(-1, h, w, c)
    stats = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), gaussian_window(filter_size, sigma))
    mx, my, xx, yy, xy = jnp.split(stats, 5, axis=-1)
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = k1 ** 2, k2 ** 2  # (K * L)^2 with L = 1 after the scaling above
    ssim_map = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3)).reshape(batch)
