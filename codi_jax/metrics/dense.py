"""Saving, loading and running the metrics' dense readers (codi_jax/models/dense_unet.py): the depth estimator of
depth controllability and the colour segmenter of caption following.

A reader is a folder with model.safetensors (float32, keys 'conv_in/kernel', ...) and config.json (a DenseUNetConfig).
Readers are trained here (`python -m codi_jax.metrics.train_depth`), never downloaded, and read from safetensors only.
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
from codi_jax.models.dense_unet import DenseUNet, DenseUNetConfig
from codi_jax.weights.convert import WeightsMismatchError, read_safetensors, write_safetensors

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save(path: str | os.PathLike, config: DenseUNetConfig, params: dict) -> Path:
    """Writes path/model.safetensors and path/config.json; returns path."""
    path = Path(path)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params.get("params", params)), sep="/")
    write_safetensors(str(path), {k: np.asarray(v, np.float32) for k, v in flat.items()}, WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(config.to_json() + "\n")
    return path


def load(path: str | os.PathLike, metric: str, train_command: str, head: str) -> tuple[DenseUNet, dict]:
    """(module, variables) from a reader folder.

    A missing folder or file raises MetricUnavailable naming `metric` and how to train the reader (`train_command`,
    completed with --out path); a reader with another head (a segmenter given as the depth estimator), or weights that
    do not fit the config, raise WeightsMismatchError listing the differences.
    """
    path = Path(path).expanduser()
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (path / f).is_file()]
    if missing:
        raise MetricUnavailable(f"{metric}: no reader at {path} (missing {', '.join(missing)}); train one with "
                                f"`{train_command} --out {path}`")
    config = DenseUNetConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    if config.head != head:
        raise WeightsMismatchError(f"{path} holds a {config.head!r}-head network, but {metric} needs a {head!r} head")
    got = read_safetensors(str(path))
    want = _expected_shapes(config)
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k].shape)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra or wrong:
        raise WeightsMismatchError(
            f"{metric} weights in {path} do not fit its config.json: missing {missing[:5]}, unexpected "
            f"{extra[:5]}, wrong shape {[(k, got[k].shape, want[k]) for k in wrong[:5]]}")
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in got.items()}, sep="/")
    return DenseUNet(config), {"params": params}


@functools.cache
def _expected_shapes(config: DenseUNetConfig) -> dict[str, tuple[int, ...]]:
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(DenseUNet(config).init, jax.random.key(0), x))["params"]
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


@functools.cache
def _apply(config: DenseUNetConfig):
    # One jitted function per config; jax.jit then compiles once per batch shape.
    module = DenseUNet(config)
    return jax.jit(module.apply)


def as_signed(images) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] NHWC RGB -> float32 [-1, 1]."""
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


def predict(model: tuple[DenseUNet, dict], images, batch_size: int = 128) -> np.ndarray:
    """(N, H, W, 3) images -> (N, H, W, out_channels) float32 outputs.

    images: uint8 in [0, 255] (as evaluation saves them; exact), or float in [-1, 1] (the generator's output range;
    NOT [0, 1] as the FID/LPIPS metrics take: a [0, 1] float image would be read as a brightened one). H and W must be
    the reader's training size: it is not resized here, because resizing changes the blur the reader sees.
    The last batch is padded, so one compiled program serves every call of one image size.
    """
    module, variables = model
    size = module.config.image_size
    x = as_signed(images)
    if x.shape[1:3] != (size, size):
        raise ValueError(f"the reader was trained at {size}x{size}, got {x.shape[1]}x{x.shape[2]} images; train one at "
                         f"that size (train_depth --image_size {x.shape[1]}) or resize the images")
    fn = _apply(module.config)
    return map_batches(lambda batch: fn(variables, batch), x, max(1, min(batch_size, x.shape[0])),
                       (size, size, module.config.out_channels))
