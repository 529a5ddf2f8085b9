"""Real-world super-resolution (the paper's headline task, section 5): the condition is the Real-ESRGAN-degraded
low-resolution image (data/degradations.py), bicubic-upsampled back to the target size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from codi_jax.data import degradations
from codi_jax.tasks import inputs
from codi_jax.tasks.base import Options, SampleInput, Task, to_uint8

# How far past its trained size a super-resolution model is run: a fully convolutional UNet runs at any multiple of
# its downsampling, but its attention and receptive field are tuned to the trained size, and memory grows with area.
MAX_FACTOR = 2
METRICS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y", "lr_rmse")
BICUBIC = "bicubic (the input upsampled)"


def sr_condition_from_lowres(lowres: np.ndarray, height: int, width: int) -> np.ndarray:
    """The sr condition from a low-res image (h,w,3) in [0,1]: bicubic up to (height, width), clipped, in [-1,1]. The
    last step of training's condition, after the degradation made the low-res image."""
    up = np.clip(degradations.resize(np.asarray(lowres, np.float32), height, width, "bicubic"), 0, 1)
    return up.astype(np.float32) * 2 - 1


def _condition(rec: dict, rng: np.random.Generator, options: Options) -> dict[str, np.ndarray]:
    hr = np.asarray(rec["image"], np.float32) / 255.0
    lowres = degradations.degrade(hr, rng, options.sr_scale, kind=options.sr_degradation)
    return {"cond": sr_condition_from_lowres(lowres, hr.shape[0], hr.shape[1]), "lowres": lowres}


def _metrics(scorer, images: np.ndarray) -> dict:
    """PSNR and SSIM on RGB and on the luma Y, with a border of sr_scale pixels cropped, and LR consistency: the RMSE
    between the output area-downsampled by sr_scale and its own low-resolution input (codi_jax/metrics/sr.py)."""
    lowres = scorer.extras.get("lowres")
    if lowres is None:
        return {}
    from codi_jax.metrics import sr, stats

    scale = images.shape[1] // lowres.shape[1]
    per_image = sr.sr_scores(images, scorer.real, lowres, scale=scale)
    # The ground truth against itself: infinite PSNR, SSIM 1; only its LR consistency (the degradation's own
    # distance from a plain downsampling) says something.
    # (psnr_y comes out finite there, ~155 dB of float rounding in the luma conversion, so ask for the images.)
    if np.array_equal(images, scorer.real):
        per_image = {"lr_rmse": per_image["lr_rmse"]}
    return stats.with_ci(per_image, "", scorer.seed)


def _references(real: np.ndarray, cond: np.ndarray, extras: dict) -> dict[str, np.ndarray]:
    return {BICUBIC: to_uint8(cond)}


def _shown(cond: np.ndarray, extras: dict) -> np.ndarray:
    """The low-res input as it is, each pixel repeated up to the output size."""
    lowres = extras.get("lowres")
    if lowres is None:
        return to_uint8(cond)
    lowres = np.asarray(lowres)[: len(cond)]
    r = cond.shape[1] // lowres.shape[1]
    return np.clip(np.round(lowres.repeat(r, axis=1).repeat(r, axis=2) * 255), 0, 255).astype(np.uint8)


def _sample_condition(item: SampleInput):
    """A low-res image -> the sr condition: bicubic up by sr_scale, as training's last step. By default at sr_scale x
    the image's own size (padded to the model's multiple, the output cropped back), up to MAX_FACTOR x the trained
    size; with --fit, first fitted to the trained size / sr_scale (the output is then the trained size)."""
    image = inputs.open_image(item.path, "low-res image").convert("RGB")
    r, w, h, size = item.sr_scale, image.size[0], image.size[1], item.size
    if item.fit_how is not None:
        if size % r:
            raise ValueError(f"--sr-scale={r} does not divide the model's size {size}")
        pixels, (top, left, bh, bw), note = inputs.fit(image, size // r, item.fit_how, Image.Resampling.BICUBIC)
        cond = sr_condition_from_lowres(np.asarray(pixels, np.float32) / 255.0, size, size)
        return cond, (top * r, left * r, bh * r, bw * r), f"{note}, x{r} -> {size}x{size}"
    height, width = r * h, r * w
    if max(height, width) > MAX_FACTOR * size:
        raise ValueError(f"low-res image {item.path!r} is {w}x{h}: x{r} makes {width}x{height}, more than "
                         f"{MAX_FACTOR} x the {size} px the model was trained at; pass --fit=crop|pad|resize "
                         f"to bring it to {size // r}x{size // r} (output {size}x{size}), or split it into tiles")
    cond = sr_condition_from_lowres(np.asarray(image, np.float32) / 255.0, height, width)
    m = item.multiple
    ph, pw = -height % m, -width % m
    note = f"{w}x{h}, x{r} -> {width}x{height}"
    if ph or pw:
        cond = np.pad(cond, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
        note += f" (run at {width + pw}x{height + ph}, a multiple of {m}, output cropped back)"
    return cond, (0, 0, height, width), note


TASK = Task(
    name="sr", summary="real-world super-resolution: a degraded low-resolution image (x data.sr_scale) and a caption",
    channels=3, condition=_condition, tag="super-resolution",
    # what sample upsamples an input by, and how training degraded its inputs (for the model card)
    export_meta=lambda config: {"sr_scale": int(config.data.sr_scale), "sr_degradation": config.data.sr_degradation},
    metrics=_metrics,
    metric_directions={"psnr_rgb": False, "ssim_rgb": False, "psnr_y": False, "ssim_y": False, "lr_rmse": True},
    references=_references, shown=_shown,
    sample_input="a low-res image", sample_flags=("--sr-scale",),
    sample_help=("--image=lowres.png of any size: upsampled (bicubic) by the model's sr_scale as in training; the\n"
                 "output is sr_scale x the input's size (up to 2x the trained size; --fit brings it to the trained\n"
                 "one)"),
    sample_condition=_sample_condition,
    diffusers_input=lambda meta: [
        f"# the low-resolution image, upsampled x{int(meta.get('sr_scale', 4))} with a float bicubic (PIL mode F), "
        "clipped, in [-1, 1]: the condition exactly as training builds it",
        "low = np.asarray(Image.open('lowres.png').convert('RGB'), np.float32) / 255",
        f"size = (low.shape[1] * {int(meta.get('sr_scale', 4))}, low.shape[0] * {int(meta.get('sr_scale', 4))})",
        "up = np.stack([np.asarray(Image.fromarray(c, 'F').resize(size, Image.BICUBIC)) "
        "for c in low.transpose(2, 0, 1)])",
        "cond = torch.from_numpy(np.clip(up, 0, 1) * 2 - 1)[None]"],
    # Real-ESRGAN's noise and JPEG erase an 8 px input (module docstring of data/degradations.py): the tiny configs
    # super-resolve clean bicubic downsamplings; Stable Diffusion scale keeps the real-world degradations.
    tiny_defaults={"data.sr_degradation": "bicubic"},
)
