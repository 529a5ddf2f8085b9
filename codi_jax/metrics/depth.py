"""Depth controllability: does a generated image have the depth it was conditioned on?

As in ControlNet++ and Uni-ControlNet, a depth estimator reads the generated image and its estimate is compared with
the conditioning map. Our estimator (codi_jax/models/depth_estimator.py) is trained on the procedural scenes' exact
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

import functools
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from codi_jax.metrics import MetricUnavailable
from codi_jax.metrics.image import map_batches
from codi_jax.models.depth_estimator import DepthEstimator, DepthEstimatorConfig
from codi_jax.weights.convert import WeightsMismatchError, read_safetensors, write_safetensors

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "pretrained" / "depth_scenes32"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# delta1 compares ratios, which a [0, 1] map makes undefined (0 at the farthest point); 0.1 + 0.9 * map keeps the
# farthest point at 0.1, i.e. a 10:1 near:far disparity range, about what the scenes' camera sees.
DELTA_OFFSET = 0.1
DELTA_THRESHOLD = 1.25


def save_depth_estimator(path: str | os.PathLike, config: DepthEstimatorConfig, params: dict) -> Path:
    """Writes path/model.safetensors (float32, keys 'conv_in/kernel', ...) and path/config.json; returns path."""
    path = Path(path)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params.get("params", params)), sep="/")
    write_safetensors(str(path), {k: np.asarray(v, np.float32) for k, v in flat.items()}, WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(config.to_json() + "\n")
    return path


def load_depth_estimator(path: str | os.PathLike | None = None) -> tuple[DepthEstimator, dict]:
    """(module, variables) from a folder holding model.safetensors and config.json; default: the shipped estimator.

    A missing folder or file raises MetricUnavailable (never a stand-in); weights that do not fit the config raise
    WeightsMismatchError listing the differences.
    """
    path = Path(path).expanduser() if path is not None else DEFAULT_PATH
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (path / f).is_file()]
    if missing:
        raise MetricUnavailable(
            f"depth controllability: no depth estimator at {path} (missing {', '.join(missing)}); train one with "
            f"`python -m codi_jax.metrics.train_depth --out {path}`")
    config = DepthEstimatorConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    module = DepthEstimator(config)
    got = read_safetensors(str(path))
    want = _expected_shapes(config)
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k].shape)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra or wrong:
        raise WeightsMismatchError(
            f"depth estimator weights in {path} do not fit its config.json: missing {missing[:5]}, unexpected "
            f"{extra[:5]}, wrong shape {[(k, got[k].shape, want[k]) for k in wrong[:5]]}")
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in got.items()}, sep="/")
    return module, {"params": params}


@functools.cache
def _expected_shapes(config: DepthEstimatorConfig) -> dict[str, tuple[int, ...]]:
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(DepthEstimator(config).init, jax.random.key(0), x))["params"]
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


@functools.cache
def _apply(config: DepthEstimatorConfig):
    # One jitted function per config; jax.jit then compiles once per batch shape.
    module = DepthEstimator(config)
    return jax.jit(lambda variables, x: module.apply(variables, x)[..., 0])


def _as_signed(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be NHWC RGB (N, H, W, 3), got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.05 or hi > 1.05:
        raise ValueError(f"float images must lie in [-1, 1] (the generator's range), "
                         f"got values in [{lo:.3g}, {hi:.3g}]")
    # Decoders overshoot [-1, 1] slightly; saving the image would clip it too.
    return np.clip(images, -1.0, 1.0).astype(np.float32)


def predict(model: tuple[DepthEstimator, dict], images, batch_size: int = 128) -> np.ndarray:
    """(N, H, W, 3) images -> (N, H, W) float32 predicted conditioning maps in [-1, 1] (near = +1).

    images: uint8 in [0, 255] (as evaluation saves them; exact), or float in [-1, 1] (the generator's output range;
    NOT [0, 1] as the FID/LPIPS metrics take: a [0, 1] float image would be read as a brightened one). H and W must be
    the estimator's training size: it is not resized here, because resizing changes the blur the estimator sees.
    The last batch is padded, so one compiled program serves every call of one image size.
    """
    module, variables = model
    size = module.config.image_size
    x = _as_signed(images)
    if x.shape[1:3] != (size, size):
        raise ValueError(f"the depth estimator was trained at {size}x{size}, got {x.shape[1]}x{x.shape[2]} images; "
                         f"train one at that size (train_depth --image_size {x.shape[1]}) or resize the images")
    fn = _apply(module.config)
    return map_batches(lambda batch: fn(variables, batch), x, max(1, min(batch_size, x.shape[0])), (size, size))


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
