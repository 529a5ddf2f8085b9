"""Inpainting masks, 1 = hole to fill: free-form brush strokes and boxes (Palette / DeepFill v2 style), and holes
shaped like one object of a procedural scene (from the renderer's object ids), which the model can only draw back
from the caption and the context.

    mask = make_mask(rng, h, w, kind="mixed", fraction=0.3, ids=record["ids"])   # float32 (H,W) in {0,1}
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


def _stroke(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int) -> None:
    """One DeepFill-v2 brush stroke: a random walk of thick line segments with round joints."""
    scale = min(h, w)
    width = int(max(2, rng.uniform(0.04, 0.12) * scale))
    x, y = rng.uniform(0, w), rng.uniform(0, h)
    angle = rng.uniform(0, 2 * math.pi)
    pts = [(x, y)]
    for _ in range(int(rng.integers(2, 6))):
        angle += rng.uniform(-1.2, 1.2)
        length = rng.uniform(0.08, 0.3) * scale
        x = float(np.clip(x + length * math.cos(angle), 0, w - 1))
        y = float(np.clip(y + length * math.sin(angle), 0, h - 1))
        pts.append((x, y))
    draw.line(pts, fill=1, width=width)
    r = width / 2
    for px, py in pts:
        draw.ellipse((px - r, py - r, px + r, py + r), fill=1)


def _box(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int) -> None:
    bh, bw = rng.uniform(0.1, 0.35) * h, rng.uniform(0.1, 0.35) * w
    y0, x0 = rng.uniform(0, h - bh), rng.uniform(0, w - bw)
    draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=1)


def random_mask(rng: np.random.Generator, height: int, width: int, fraction: float = 0.3,
                box_prob: float = 0.3) -> np.ndarray:
    """float32 (H,W) mask in {0,1} covering about `fraction` of the image.

    Strokes and boxes are added until the coverage reaches the target; the last shape is kept only if that lands closer
    to the target than stopping before it, so coverage is unbiased on average rather than always overshooting.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"mask_fraction must be in (0, 1), got {fraction}")
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    prev = np.zeros((height, width), np.float32)
    for _ in range(200):
        (_box if rng.random() < box_prob else _stroke)(draw, rng, height, width)
        cur = (np.asarray(img) > 0).astype(np.float32)
        if cur.mean() >= fraction:
            if fraction - prev.mean() < cur.mean() - fraction and prev.any():
                return prev
            return cur
        prev = cur
    return prev


# data.mask_kind: 'random' (strokes and boxes), 'object' (one rendered object), 'mixed' (either, OBJECT_SHARE objects)
KINDS = ("random", "object", "mixed")
OBJECT_SHARE = 0.5
# The hole is the object's pixels grown by this many pixels (a 3x3 square per pixel): ids are the objects hit by
# each pixel's centre ray, and the image averages 2x2 rays per pixel, so a pixel just outside the object's ids
# can still show some of its colour on the anti-aliased edge; the ring takes those edge pixels into the hole. Over
# 100 test scenes at 32 px, 1 of the 17 364 pixels that any of the 2x2 rays finds an object in falls outside its
# hole (a sliver seen past an occluder, between pixel centres; tests/test_data_tasks.py). The price: a hole is about
# 1.5x the object's pixels at 32 px, a quarter of it background or neighbours that the model must redraw too.
OBJECT_DILATION = 1


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """(H,W) bool grown by `pixels` pixels in the 8 directions (Chebyshev distance), clipped at the border."""
    mask = np.asarray(mask, bool)
    if int(pixels) <= 0:
        return mask
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=int(pixels))


def object_mask(rng: np.random.Generator, ids: np.ndarray, dilation: int = OBJECT_DILATION) -> np.ndarray | None:
    """float32 (H,W) in {0,1}: the pixels of one object, drawn uniformly among those visible in `ids` (int (H,W),
    >= 0 an object, < 0 ground or sky), grown by `dilation` pixels; None when no object is visible. The object's
    shadow and its reflections in shiny neighbours stay in the known region: context, as in a photo."""
    ids = np.asarray(ids)
    visible = np.unique(ids[ids >= 0])
    if not len(visible):
        return None
    chosen = visible[int(rng.integers(len(visible)))]
    return dilate(ids == chosen, dilation).astype(np.float32)


def make_mask(rng: np.random.Generator, height: int, width: int, kind: str = "random", fraction: float = 0.3,
              ids: np.ndarray | None = None) -> np.ndarray:
    """float32 (H,W) hole mask of data.mask_kind `kind`: 'random' is random_mask (the same draws as calling it);
    'object' is object_mask of the record's ids, or random_mask when no object is visible (a hole is always drawn);
    'mixed' is 'object' with probability OBJECT_SHARE, else 'random'."""
    if kind not in KINDS:
        raise ValueError(f"mask_kind must be one of {KINDS}, got {kind!r}")
    if kind == "random":
        return random_mask(rng, height, width, fraction)
    if ids is None:
        raise ValueError(f"mask_kind={kind!r} needs the renderer's object ids ('ids'), which only the procedural "
                         "scenes' records carry (data.dataset='scenes'); use mask_kind='random' for other data")
    if np.shape(ids) != (height, width):
        raise ValueError(f"object ids of shape {np.shape(ids)} for a {height}x{width} image")
    if kind == "mixed" and rng.random() >= OBJECT_SHARE:
        return random_mask(rng, height, width, fraction)
    hole = object_mask(rng, ids)
    return random_mask(rng, height, width, fraction) if hole is None else hole
