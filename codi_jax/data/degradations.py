"""Real-ESRGAN second-order degradation (Wang et al. 2021) in numpy/scipy/PIL.

Follows basicsr's `degradations.py` and the RealESRGAN x4 training options: random blur kernel (isotropic/anisotropic
Gaussian, generalized Gaussian, plateau, sinc) -> random resize -> Gaussian or Poisson noise (colour or grey) -> JPEG,
applied twice, then resize to 1/scale and a final [sinc, JPEG] in random order. Images are float32 HWC in [0,1].
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage, special


@dataclasses.dataclass(frozen=True)
class DegradationConfig:
    """Defaults are RealESRGAN's `train_realesrnet_x4plus.yml`; kernels shrink for small images (see `degrade`)."""
    kernel_list: tuple[str, ...] = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                                    "plateau_aniso")
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)
    second_blur_prob: float = 0.8
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)
    final_sinc_prob: float = 0.8
    max_kernel_size: int = 21


# ----------------------------------------------------------------------------------------------------------------------
# Kernels (basicsr.data.degradations).


def _sigma_matrix(sx: float, sy: float, theta: float) -> np.ndarray:
    d = np.diag([sx**2, sy**2])
    u = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return u @ d @ u.T


def _grid(size: int) -> np.ndarray:
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], -1)


def _anisotropic_kernel(size: int, sx: float, sy: float, theta: float, kind: str, beta: float) -> np.ndarray:
    g = _grid(size)
    inv = np.linalg.inv(_sigma_matrix(sx, sy, theta))
    q = np.einsum("...i,ij,...j->...", g, inv, g)
    if kind == "gaussian":
        k = np.exp(-0.5 * q)
    elif kind == "generalized":
        k = np.exp(-0.5 * np.power(q, beta))
    else:  # plateau
        k = 1.0 / (np.power(q, beta) + 1)
    return k / k.sum()


def random_mixed_kernel(rng: np.random.Generator, size: int, cfg: DegradationConfig, sigma_range) -> np.ndarray:
    kind = cfg.kernel_list[rng.choice(len(cfg.kernel_list), p=np.asarray(cfg.kernel_prob) / sum(cfg.kernel_prob))]
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sx = rng.uniform(*sigma_range)
    sy, theta = (sx, 0.0) if iso else (rng.uniform(*sigma_range), rng.uniform(-math.pi, math.pi))
    if kind.startswith("generalized"):
        # basicsr: half the time beta in [0.5, 1), half in [1, 4].
        beta = rng.uniform(cfg.betag_range[0], 1) if rng.random() < 0.5 else rng.uniform(1, cfg.betag_range[1])
        return _anisotropic_kernel(size, sx, sy, theta, "generalized", beta)
    if kind.startswith("plateau"):
        beta = rng.uniform(cfg.betap_range[0], 1) if rng.random() < 0.5 else rng.uniform(1, cfg.betap_range[1])
        return _anisotropic_kernel(size, sx, sy, theta, "plateau", beta)
    return _anisotropic_kernel(size, sx, sy, theta, "gaussian", 1.0)


def sinc_kernel(cutoff: float, size: int) -> np.ndarray:
    """2D circular low-pass (jinc) kernel with cutoff in radians, as basicsr's circular_lowpass_kernel."""
    g = _grid(size)
    r = np.hypot(g[..., 0], g[..., 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2 * math.pi * r)
    k[size // 2, size // 2] = cutoff**2 / (4 * math.pi)
    return k / k.sum()


def _random_size(rng: np.random.Generator, max_size: int) -> int:
    sizes = list(range(7, max(max_size, 7) + 1, 2))
    return int(sizes[rng.integers(len(sizes))])


def _random_sinc(rng: np.random.Generator, size: int) -> np.ndarray:
    # Smaller kernels get a larger cutoff, otherwise the ringing dominates (basicsr's choice).
    cutoff = rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi)
    return sinc_kernel(cutoff, size)


# ----------------------------------------------------------------------------------------------------------------------
# Operators.


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.correlate(img[..., c], kernel, mode="reflect") for c in range(img.shape[-1])], -1)


_PIL_MODES = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize(img: np.ndarray, height: int, width: int, mode: str = "bicubic") -> np.ndarray:
    """Per-channel float resize with PIL (mode 'F' keeps values outside [0,1], like torch's interpolate)."""
    height, width = max(int(height), 1), max(int(width), 1)
    return np.stack([np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(
        (width, height), _PIL_MODES[mode])) for c in range(img.shape[-1])], -1)


def add_gaussian_noise(rng, img, sigma_range, gray_prob):
    sigma = rng.uniform(*sigma_range) / 255.0
    if rng.random() < gray_prob:
        noise = rng.standard_normal(img.shape[:2])[..., None] * sigma
    else:
        noise = rng.standard_normal(img.shape) * sigma
    return img + noise


def add_poisson_noise(rng, img, scale_range, gray_prob):
    scale = rng.uniform(*scale_range)
    x = np.clip(img, 0, 1)
    if rng.random() < gray_prob:
        gray = x @ np.array([0.299, 0.587, 0.114])
        vals = 2 ** np.ceil(np.log2(max(len(np.unique(np.round(gray * 255))), 2)))
        noise = (rng.poisson(gray * vals) / vals - gray)[..., None]
    else:
        vals = 2 ** np.ceil(np.log2(max(len(np.unique(np.round(x * 255))), 2)))
        noise = rng.poisson(x * vals) / vals - x
    return img + noise * scale


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    u8 = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
    buf = io.BytesIO()
    u8.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0


def _stage(rng, img, ori_hw, cfg: DegradationConfig, second: bool, max_k: int, scale: int):
    h0, w0 = ori_hw
    blur_prob = cfg.second_blur_prob if second else 1.0
    if rng.random() < blur_prob:
        size = _random_size(rng, max_k)
        if rng.random() < (cfg.sinc_prob2 if second else cfg.sinc_prob):
            kernel = _random_sinc(rng, size)
        else:
            kernel = random_mixed_kernel(rng, size, cfg, cfg.blur_sigma2 if second else cfg.blur_sigma)
        img = filter2d(img, kernel)
    probs = cfg.resize_prob2 if second else cfg.resize_prob
    lo, hi = cfg.resize_range2 if second else cfg.resize_range
    kind = rng.choice(3, p=probs)
    factor = rng.uniform(1, hi) if kind == 0 else (rng.uniform(lo, 1) if kind == 1 else 1.0)
    mode = list(_PIL_MODES)[rng.integers(3)]
    if second:  # basicsr resizes the second stage relative to ori_size / sr scale
        h, w = int(h0 / scale * factor), int(w0 / scale * factor)
    else:
        h, w = int(img.shape[0] * factor), int(img.shape[1] * factor)
    h, w = max(h, 1), max(w, 1)
    img = resize(img, h, w, mode)
    gray_prob = cfg.gray_noise_prob2 if second else cfg.gray_noise_prob
    if rng.random() < (cfg.gaussian_noise_prob2 if second else cfg.gaussian_noise_prob):
        img = add_gaussian_noise(rng, img, cfg.noise_range2 if second else cfg.noise_range, gray_prob)
    else:
        img = add_poisson_noise(rng, img, cfg.poisson_scale_range2 if second else cfg.poisson_scale_range, gray_prob)
    img = np.clip(img, 0, 1)
    return jpeg(img, rng.integers(*(cfg.jpeg_range2 if second else cfg.jpeg_range), endpoint=True))


KINDS = ("realesrgan", "bicubic")


def degrade(img: np.ndarray, rng: np.random.Generator, scale: int = 4,
            cfg: DegradationConfig = DegradationConfig(), kind: str = "realesrgan") -> np.ndarray:
    """HWC float [0,1] high-res image -> low-res (H/scale, W/scale) degraded image, float32 in [0,1].

    kind 'realesrgan': the second-order pipeline above (real-world SR, the paper's setting). 'bicubic': a plain
    antialiased bicubic downsampling (classical SR's x4 bicubic; draws nothing from rng). At 32 px the Real-ESRGAN
    pipeline, tuned for 256-400 px crops, leaves an 8 px input that has lost its objects and colours (per-pixel noise
    and JPEG's 4:2:0 chroma on an image one JPEG block wide; docs/tasks.md), so the tiny configs use 'bicubic'."""
    if kind not in KINDS:
        raise ValueError(f"sr degradation must be one of {KINDS}, got {kind!r}")
    h, w = img.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"sr scale {scale} must divide the image size, got {h}x{w}")
    if kind == "bicubic":
        return np.clip(resize(img.astype(np.float32), h // scale, w // scale, "bicubic"), 0, 1).astype(np.float32)
    # RealESRGAN kernels (up to 21 px) are tuned for 256-400 px crops; scale the cap so a 32 px image is not erased.
    max_k = min(cfg.max_kernel_size, max(7, (min(h, w) // 12) | 1))
    x = img.astype(np.float32)
    x = _stage(rng, x, (h, w), cfg, second=False, max_k=max_k, scale=scale)
    x = _stage(rng, x, (h, w), cfg, second=True, max_k=max_k, scale=scale)
    lh, lw = h // scale, w // scale
    mode = list(_PIL_MODES)[rng.integers(3)]
    quality = rng.integers(*cfg.jpeg_range2, endpoint=True)
    sinc = _random_sinc(rng, _random_size(rng, max_k)) if rng.random() < cfg.final_sinc_prob else None
    if rng.random() < 0.5:  # resize + sinc, then JPEG
        x = resize(x, lh, lw, mode)
        if sinc is not None:
            x = filter2d(x, sinc)
        x = jpeg(np.clip(x, 0, 1), quality)
    else:  # JPEG, then resize + sinc
        x = jpeg(np.clip(x, 0, 1), quality)
        x = resize(x, lh, lw, mode)
        if sinc is not None:
            x = filter2d(x, sinc)
    return np.clip(x, 0, 1).astype(np.float32)


def sr_condition(img: np.ndarray, rng: np.random.Generator, scale: int = 4,
                 cfg: DegradationConfig = DegradationConfig(), kind: str = "realesrgan") -> np.ndarray:
    """The SR task's condition: the degraded low-res image resized back (bicubic) to the target size, in [0,1]."""
    lr = degrade(img, rng, scale, cfg, kind)
    return np.clip(resize(lr, img.shape[0], img.shape[1], "bicubic"), 0, 1).astype(np.float32)
