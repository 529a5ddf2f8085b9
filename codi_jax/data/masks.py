"""Inpainting masks: free-form brush strokes and boxes (Palette / DeepFill v2 style), 1 = hole to fill."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


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
