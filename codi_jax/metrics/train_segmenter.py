"""Trains the colour segmenter of the caption-following metric on the procedural scenes, and writes its model card.

    python -m codi_jax.metrics.train_segmenter --out codi_jax/pretrained/colours_scenes32 --steps 2000

Targets are exact: each pixel's label is the palette colour of the object its centre ray hits (the renderer's id
buffer), or background for ground and sky. Data, split discipline (train split of world --seed; the held-out scores
on the test split that evaluation samples from), optimiser and augmentations are the depth estimator's
(`train_depth.fit`): both read generated images, which are blurrier and noisier than renders. Colour jitter stays
small (gain 0.92-1.08), so a colour name stays true under it.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from codi_jax.data import scenes
from codi_jax.metrics import captions, dense, stats
from codi_jax.metrics.train_depth import degrade, fit, parse_args, write_card
from codi_jax.models.dense_unet import DenseUNet, DenseUNetConfig


def render_labels(split: str, seed: int, num: int, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scenes 0..num-1 of a split: uint8 (N, H, W, 3) images as the data pipeline renders them, int32 (N, H, W) colour
    labels (0 background, 1 + COLOURS index) and the captions."""
    images = np.empty((num, image_size, image_size, 3), np.uint8)
    labels = np.empty((num, image_size, image_size), np.int32)
    texts = []
    for i in range(num):
        scene = scenes.sample_scene(seed, i, split)
        out = scenes.render(scene, image_size, image_size)
        images[i] = np.round(np.clip(out["image"], 0, 1) * 255).astype(np.uint8)
        colour = np.asarray([1 + scenes.COLOURS.index(o.colour) for o in scene.objects] + [0], np.int32)
        labels[i] = colour[np.where(out["ids"] >= 0, out["ids"], len(scene.objects))]
        texts.append(scenes.caption(scene))
    return images, labels, texts


def score_table(labels: np.ndarray, texts: list[str]) -> dict[str, list[float]]:
    """{metric: [mean, ci_low, ci_high]} with 95 % bootstrap intervals."""
    return {k: list(stats.bootstrap_ci(v)) for k, v in captions.caption_following(labels, texts).items()}


def train(args) -> dict:
    config = DenseUNetConfig(image_size=args.image_size, channels=tuple(args.channels),
                             out_channels=len(captions.CLASSES), head="logits")
    t0 = time.time()
    train_x, train_y, _ = render_labels("train", args.seed, args.num_train, args.image_size)
    print(f"rendered {args.num_train} train scenes in {time.time() - t0:.0f}s", flush=True)

    def loss_fn(logits, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    params, n_params, train_s = fit(DenseUNet(config), loss_fn, train_x, train_y, args)
    out = Path(args.out)
    dense.save(out, config, {"params": params})
    model = captions.load_segmenter(out)  # evaluate what was written, not what is in memory
    test_x, test_y, texts = render_labels("test", args.test_seed, args.num_test, args.image_size)
    pred = captions.segment(model, test_x)
    objects = test_y > 0
    results = {
        "pixel_accuracy_objects": float(np.mean(pred[objects] == test_y[objects])),
        "pixel_accuracy_background": float(np.mean(pred[~objects] == 0)),
        "clean": score_table(pred, texts),
        "degraded": score_table(captions.segment(model, degrade(test_x)), texts),
        "shuffled": score_table(pred, texts[1:] + texts[:1]),
        "exact_labels": score_table(test_y, texts),
    }
    return write_card(out, results, t0, lambda wall_s: model_card(args, n_params, train_s, wall_s, results))


def model_card(args, n_params: int, train_s: float, wall_s: float, results: dict) -> str:
    cmd = "python -m codi_jax.metrics.train_segmenter " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = {"exact_labels": "the renderer's exact labels (what the metric's rules allow at best)",
            "clean": "test renders with their captions (the segmenter's ceiling)",
            "degraded": "test renders, blur sigma 0.8 px + noise 0.03",
            "shuffled": "chance: each image against another scene's caption"}

    def fmt(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    table = "\n".join(f"| {rows[k]} | {fmt(results[k]['colour_recall'])} | {fmt(results[k]['colour_exact'])} | "
                      f"{fmt(results[k]['relation'])} |" for k in rows)
    return f"""# Colour segmenter for the caption-following metric ({args.image_size}x{args.image_size} scenes)

A {n_params:,}-parameter U-Net (`codi_jax.models.dense_unet`, channels {tuple(args.channels)}, {len(captions.CLASSES)}
classes: background and the palette's colours) that labels each pixel of an RGB image in [-1, 1] with the colour of
the object it shows. Used by `codi_jax.metrics.captions` to score whether a generated image has the caption's objects
in the caption's colours and left/right places. Valid only for the procedural scenes at
{args.image_size}x{args.image_size}.

## Training

    {cmd}

- data: {args.num_train} scenes of the *train* split, world seed {args.seed}, rendered once (labels from the exact id
  buffer)
- {args.steps} steps of Adam, batch {args.batch}, peak learning rate {args.lr} (warmup + cosine), pixel cross-entropy,
  the depth estimator's augmentations (`codi_jax.metrics.train_depth.augment`)
- wall time {wall_s:.0f} s in all ({train_s:.0f} s of training steps) on {jax.devices()[0].platform.upper()}
  ({jax.device_count()} device(s), {os.cpu_count()} CPU cores), jax {jax.__version__}

## Held-out scores

{args.num_test} scenes 0..{args.num_test - 1} of the *test* split, world seed {args.test_seed} (the scenes evaluation
uses). Pixel accuracy: {results['pixel_accuracy_objects']:.3f} on object pixels and
{results['pixel_accuracy_background']:.3f} on background. Caption following (definitions: `codi_jax.metrics.captions`; mean with a 95 % bootstrap interval,
higher is better):

| labels read from | colour recall | colours exact | left/right relation |
|---|---|---|---|
{table}
"""


if __name__ == "__main__":
    train(parse_args(doc=__doc__))
