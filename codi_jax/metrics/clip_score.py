"""CLIP score (Hessel et al. 2021; torchmetrics' CLIPScore): mean over pairs of 100 * max(cos(image, caption), 0).

The CoDi paper's tables print it divided by 100 (e.g. 0.3073); `ClipScore.cosine` is the raw mean cosine and
`ClipScore.score` the torchmetrics value. The CLIP weights come from a local transformers CLIPModel folder
(config.json + model.safetensors + tokenizer files, e.g. a copy of openai/clip-vit-large-patch14); nothing is
downloaded.

    model, params, tokenizer = load_clip("/models/clip-vit-large-patch14")
    result = clip_score(model, params, tokenizer, images_uint8_nhwc, captions)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.models import clip as clip_lib
from codi_jax.data.tokenizer import load_tokenizer
from codi_jax.metrics import MetricUnavailable
from codi_jax.weights import convert

# OpenAI CLIP's pixel statistics (transformers OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipScore:
    score: float            # torchmetrics CLIPScore: mean of 100 * max(cos, 0)
    cosine: float           # mean raw cosine (the paper's table value is score / 100)
    per_sample: np.ndarray  # (N,) raw cosines


def load_clip(path: str | None, *, dtype=jnp.float32):
    """A transformers CLIPModel folder -> (CLIPModel module, params, CLIPTokenizer).

    No path -> codi_jax.metrics.MetricUnavailable (CLIP score is then reported as unavailable, never estimated).
    """
    if not path:
        raise MetricUnavailable("CLIP score needs CLIP weights: give the path of a local transformers CLIPModel folder "
                                "(config.json, model.safetensors, vocab.json, merges.txt), e.g. a copy of "
                                "openai/clip-vit-large-patch14")
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"CLIP folder {path!r} has no config.json")
    with open(config_file) as f:
        config = clip_lib.clip_config_from_dict(json.load(f), dtype=dtype)
    model = clip_lib.CLIPModel(config)
    v = config.vision_config
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                            jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32))["params"]
    try:
        params = convert.torch_to_flax(convert.read_safetensors(path), target, ignore=clip_lib.IGNORE_KEYS)
    except convert.WeightsMismatchError as e:
        raise convert.WeightsMismatchError(f"CLIP weights in {path!r}: {e}") from None
    return model, params, load_tokenizer(path)


def resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shortest side -> size, the other truncated as transformers' get_resize_output_image_size does."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _resize_axis(x, size: int, axis: int):
    if x.shape[axis] == size:
        return x
    shape = list(x.shape)
    shape[axis] = size
    # PIL stores each pass in uint8: round and clip, so bicubic overshoot is cut as it is there.
    return jnp.clip(jnp.round(jax.image.resize(x, shape, method="bicubic", antialias=True)), 0.0, 255.0)


@functools.partial(jax.jit, static_argnames=("image_size",))
def preprocess_images(images: jax.Array, image_size: int) -> jax.Array:
    """(N, H, W, C) uint8 in [0, 255] or float in [0, 1] -> (N, S, S, 3) normalised CLIP input.

    CLIPImageProcessor's steps as transformers runs them through PIL: quantise to uint8, bicubic resize of the
    shortest side to S (antialiased when shrinking; width pass then height pass, each rounded to uint8), centre crop,
    CLIP mean/std. Matches PIL to one grey level, except on hard high-contrast edges for the shapes where Pillow
    runs the height pass first.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels; got {images.shape}")
    x = images.astype(jnp.float32)
    if images.dtype != jnp.uint8:
        x = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    rh, rw = resize_shape(x.shape[1], x.shape[2], image_size)
    x = _resize_axis(_resize_axis(x, rw, 2), rh, 1)
    top, left = (rh - image_size) // 2, (rw - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size] / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def tokenize(tokenizer, captions, max_length: int) -> np.ndarray:
    """(N, max_length) int32 ids, padded and truncated as the CLIP text tower expects."""
    ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)


def clip_score_from_embeddings(image_embeds, text_embeds) -> ClipScore:
    """Pairwise (row i with row i) CLIP score of projected embeddings; they need not be normalised."""
    img = np.asarray(image_embeds, np.float64)
    txt = np.asarray(text_embeds, np.float64)
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"need matching (N, D) image and text embeddings; got {img.shape} and {txt.shape}")
    cos = np.sum(img * txt, -1) / (np.linalg.norm(img, axis=-1) * np.linalg.norm(txt, axis=-1))
    return ClipScore(score=float(np.mean(np.maximum(100.0 * cos, 0.0))), cosine=float(np.mean(cos)),
                     per_sample=cos.astype(np.float32))


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: clip_lib.CLIPModel, params, pixel_values, input_ids):
    img = model.apply({"params": params}, pixel_values, method=clip_lib.CLIPModel.get_image_features)
    txt = model.apply({"params": params}, input_ids, method=clip_lib.CLIPModel.get_text_features)
    return img.astype(jnp.float32), txt.astype(jnp.float32)


def clip_score(model: clip_lib.CLIPModel, params, tokenizer, images, captions, *, batch_size: int = 32) -> ClipScore:
    """CLIP score of N images (NHWC, uint8 or float in [0, 1]) against their N captions.

    Every batch is padded to batch_size, so the model compiles once per image size.
    """
    images = np.asarray(images) if not isinstance(images, jax.Array) else images
    captions = list(captions)
    n = len(captions)
    if images.shape[0] != n or n == 0:
        raise ValueError(f"clip_score needs one caption per image; got {images.shape[0]} images, {n} captions")
    if jnp.issubdtype(images.dtype, jnp.floating):
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1] (got [{lo:.3f}, {hi:.3f}]); map [-1, 1] outputs "
                             "with (x + 1) / 2 first")
    c = model.config
    ids = tokenize(tokenizer, captions, c.text_config.max_position_embeddings)
    img_out, txt_out = [], []
    for start in range(0, n, batch_size):
        pix = preprocess_images(jnp.asarray(images[start:start + batch_size]), c.vision_config.image_size)
        tok = ids[start:start + batch_size]
        pad = batch_size - tok.shape[0]
        if pad:
            pix = jnp.pad(pix, ((0, pad), (0, 0), (0, 0), (0, 0)))
            tok = np.pad(tok, ((0, pad), (0, 0)))
        img, txt = _embed(model, params, pix, jnp.asarray(tok))
        img_out.append(np.asarray(img)[:batch_size - pad])
        txt_out.append(np.asarray(txt)[:batch_size - pad])
    return clip_score_from_embeddings(np.concatenate(img_out), np.concatenate(txt_out))
