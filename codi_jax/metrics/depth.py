"""Depth controllability: does a generated image have the depth it was conditioned on?

As in ControlNet++ and Uni-ControlNet, a depth estimator reads the generated image and its estimate is compared with
the conditioning map. Our estimator (codi_jax/models/dense_unet.py) is trained on the procedural scenes' exact
depth by `python -m codi_jax.metrics.train_depth` and predicts the conditioning map itself (MiDaS-style inverse depth,
min-max normalised per image, [-1, 1]), so prediction and condition are compared in the representation the generator
was given, with no depth-range guessing.

    model = load_depth_estimator()                     # shipped weights, codi_jax/pretrained/depth_scenes32
    pred = predict(model, generated_uint8)             # (N, H, W) in [-1, 1]
    errs = depth_errors(pred, batch["cond"])           # {'rmse': (N,), 'si_rmse': (N,), 'delta1': (N,)}
    mean, low, high = stats.bootstrap_ci(errs["rmse"])

The estimator's own error on real test scenes (its model card, README.md next to the weights) is the floor a perfect
generator would reach; the same errors against another scene's map (shuffled pairs) are the chance level.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from codi_jax.metrics import dense
from codi_jax.models.dense_unet import DenseUNet, DenseUNetConfig

DEFAULT_PATH = dense.PRETRAINED / "depth_scenes32"
# delta1 compares ratios, which a [0, 1] map makes undefined (0 at the farthest point); 0.1 + 0.9 * map keeps the
# farthest point at 0.1, i.e. a 10:1 near:far disparity range, about what the scenes' camera sees.
DELTA_OFFSET = 0.1
DELTA_THRESHOLD = 1.25


def save_depth_estimator(path: str | os.PathLike, config: DenseUNetConfig, params: dict) -> Path:
    """Writes path/model.safetensors (float32, keys 'conv_in/kernel', ...) and path/config.json; returns path."""
    return dense.save(path, config, params)


def load_depth_estimator(path: str | os.PathLike | None = None) -> tuple[DenseUNet, dict]:
    """(module, variables) from a folder holding model.safetensors and config.json; default: the shipped estimator.

    A missing folder or file raises MetricUnavailable (never a stand-in); weights that do not fit the config raise
    WeightsMismatchError listing the differences.
    """
    return dense.load(DEFAULT_PATH if path is None else path, "depth controllability",
                      "python -m codi_jax.metrics.train_depth", head="tanh")


def predict(model: tuple[DenseUNet, dict], images, batch_size: int = 128) -> np.ndarray:
    """(N, H, W, 3) images (uint8, or float in [-1, 1]; see `dense.predict`) -> (N, H, W) float32 predicted
    conditioning maps in [-1, 1] (near = +1)."""
    return dense.predict(model, images, batch_size)[..., 0]


def _as_maps(a, name: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, H, W, 1) maps, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has {np.count_nonzero(~np.isfinite(a))} non-finite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{name} must be conditioning maps in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return (np.clip(a, -1.0, 1.0) + 1.0) / 2.0


def depth_errors(pred, cond) -> dict[str, np.ndarray]:
    """Per-image errors between predicted and conditioning maps, each (N,) float64.

    pred, cond: (N, H, W) or (N, H, W, 1) conditioning maps in [-1, 1], mapped to p, c in [0, 1] (map + 1) / 2.
      rmse:    sqrt(mean((p - c)^2)). The primary metric; 0 is a perfect match.
      si_rmse: the rmse after the per-image least-squares scale and shift of p onto c, min_{s,t} rmse(s p + t, c),
               as MiDaS evaluates relative depth: it forgives a wrong near/far range, not a wrong layout. A constant p
               gets s = 0, t = mean(c).
      delta1:  the fraction of pixels with max(p'/c', c'/p') < 1.25, where p' = 0.1 + 0.9 p and c' = 0.1 + 0.9 c
               (the offset keeps ratios defined where a map is 0). Higher is better; 1 is a perfect match.
    """
    p, c = _as_maps(pred, "pred"), _as_maps(cond, "cond")
    if p.shape != c.shape:
        raise ValueError(f"pred and cond must have equal shapes, got {p.shape} and {c.shape}")
    rmse = np.sqrt(np.mean((p - c) ** 2, axis=(1, 2)))

    pm, cm = p.mean(axis=(1, 2), keepdims=True), c.mean(axis=(1, 2), keepdims=True)
    pc, cc = p - pm, c - cm
    var = np.mean(pc * pc, axis=(1, 2), keepdims=True)
    scale = np.where(var > 1e-12, np.mean(pc * cc, axis=(1, 2), keepdims=True) / np.maximum(var, 1e-12), 0.0)
    si_rmse = np.sqrt(np.mean((scale * pc - cc) ** 2, axis=(1, 2)))

    pd, cd = DELTA_OFFSET + (1 - DELTA_OFFSET) * p, DELTA_OFFSET + (1 - DELTA_OFFSET) * c
    delta1 = np.mean(np.maximum(pd / cd, cd / pd) < DELTA_THRESHOLD, axis=(1, 2))
    return {"rmse": rmse, "si_rmse": si_rmse, "delta1": delta1}
