"""Reading a user's input files for `python -m codi_jax.sample`: decoded in full, checked, and fitted to the model's
size without a silent squash. Shared by the task files' sample builders (no JAX)."""

from __future__ import annotations

import numpy as np
from PIL import Image

FITS = ("crop", "pad", "resize")


def open_image(path: str, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # the full decode, so that a truncated file fails here
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files.
        raise ValueError(f"cannot read {what} {path!r}: {e}") from e
    return image


def alpha(image: Image.Image) -> np.ndarray | None:
    """The image's alpha in [0, 1] (H, W), or None when it has none or is opaque everywhere."""
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return None
    alpha = np.asarray(image.convert("RGBA"), np.float32)[..., 3] / 255.0
    return None if alpha.min() >= 1.0 else alpha


def _describe(image: Image.Image) -> str:
    return f"{image.size[0]}x{image.size[1]}, {image.mode} ({len(image.getbands())} channel(s))"


def read_depth(path: str, *, kind: str = "disparity", convert: bool = False) -> Image.Image:
    """A depth map file -> a float image (mode 'F') scaled to [0, 1] exactly as training reads prepare_depth's maps
    (16-bit: / 65535, 8-bit: / 255). A colour or transparent file is refused unless `convert` (then its luminance):
    a colourised depth visualisation is not a depth map. kind 'depth' (metric, larger = farther): zeros, the usual
    'no reading', become the farthest value, so that they do not turn into the nearest after inversion."""
    image = open_image(path, "depth map")
    if image.mode not in ("L", "I", "F") and not image.mode.startswith("I;16"):
        rgba = np.asarray(image.convert("RGBA"))
        grey = bool(np.all(rgba[..., 0] == rgba[..., 1]) and np.all(rgba[..., 1] == rgba[..., 2]))
        if not convert and (not grey or alpha(image) is not None):
            problem = "is transparent in places" if grey else "has colour"
            raise ValueError(f"depth map {path!r} is {_describe(image)} and {problem}: a depth map is one grey channel "
                             "(an 8- or 16-bit PNG, near = bright, as prepare_depth writes it); prepare it so, or pass "
                             "--convert to take its luminance")
        image = image.convert("L")
    values = np.asarray(image).astype(np.float32)
    # The rule sources.load_disparity applies to the training set's maps.
    values = values / (65535.0 if values.max() > 255 or image.mode.startswith("I") else 255.0)
    if kind == "depth":
        if not np.any(values > 0):
            raise ValueError(f"depth map {path!r} is zero everywhere: no depth to condition on")
        values = np.where(values > 0, values, values.max())
    return Image.fromarray(values.astype(np.float32))


def read_mask(path: str) -> Image.Image:
    """A mask file (white = fill) -> a float image in [0, 1]."""
    image = open_image(path, "mask")
    if image.mode.startswith("I"):
        return Image.fromarray(np.asarray(image).astype(np.float32) / 65535.0)
    if image.mode == "F":
        return image
    return Image.fromarray(np.asarray(image.convert("L"), np.float32) / 255.0)


def fit(image: Image.Image, size: int, how: str, resample, pad_value: float | None = None
        ) -> tuple[np.ndarray, tuple[int, int, int, int], str]:
    """An image of any size -> (size, size) array, never a silent squash: 'crop' centre-crops the largest square and
    resizes it (as training reads folder images), 'pad' resizes the long side to `size` and pads the short one
    (mirrored content, or `pad_value`), 'resize' squashes. Returns (array, box of the input's content in it as
    (top, left, height, width), a note saying what was done)."""
    if how not in FITS:
        raise ValueError(f"--fit must be one of {FITS}, got {how!r}")
    w, h = image.size
    full = (0, 0, size, size)
    if (w, h) == (size, size):
        return np.asarray(image), full, f"{w}x{h} as is"
    if w == h or how == "resize":
        note = f"{w}x{h} resized to {size}x{size}" if w == h else f"{w}x{h} squashed to {size}x{size} (--fit=resize)"
        return np.asarray(image.resize((size, size), resample)), full, note
    if how == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        note = f"{w}x{h} centre-cropped to {s}x{s}" + (f", resized to {size}x{size}" if s != size else "")
        return np.asarray(image.crop((left, top, left + s, top + s)).resize((size, size), resample)), full, note
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    arr = np.asarray(image.resize((nw, nh), resample))
    top, left = (size - nh) // 2, (size - nw) // 2
    widths = ((top, size - nh - top), (left, size - nw - left)) + ((0, 0),) * (arr.ndim - 2)
    if pad_value is None:
        arr = np.pad(arr, widths, mode="symmetric")
    else:
        arr = np.pad(arr, widths, mode="constant", constant_values=pad_value)
    note = (f"{w}x{h} resized to {nw}x{nh}, padded to {size}x{size} (output cropped back to {nw}x{nh})"
            if (nw, nh) != (w, h) else f"{w}x{h} padded to {size}x{size} (output cropped back)")
    return arr, (top, left, nh, nw), note


