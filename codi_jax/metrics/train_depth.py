"""Trains the depth estimator of the depth-controllability metric on the procedural scenes, and writes its model card.

    python -m codi_jax.metrics.train_depth --out codi_jax/pretrained/depth_scenes32 --steps 2000

The training set is rendered once into memory from the *train* split of a world (--seed) that the diffusion model's
evaluation never draws from (it uses the test split), so the held-out errors in the card are honest. Targets are the
conditioning maps themselves (`tasks.depth.disparity_condition`), so the estimator predicts exactly what a generator was
conditioned on.

Generated images are blurrier, noisier and a little off in colour compared with the renders, and an estimator that
has only seen clean renders would blame the generator for that. So every batch is augmented on the fly (inside the
jitted step): horizontal flips (with the target), colour gain/contrast/brightness jitter, random Gaussian blur, random
2x down-up sampling, additive noise, and 8-bit quantisation last (evaluation feeds uint8 images). The card reports the
held-out errors on clean and on degraded test renders, plus the chance level (each prediction against another scene's
map) and a constant-map baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from codi_jax.data import scenes
from codi_jax.tasks import depth as depth_task
from codi_jax.metrics import depth, stats
from codi_jax.models.dense_unet import DenseUNet, DenseUNetConfig


def render_set(split: str, seed: int, num: int, image_size: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scenes start..start+num of a split as the depth task sees them: uint8 (N, H, W, 3) images and (N, H, W) float32
    conditioning maps in [-1, 1]. The defaults of `render_example` (1-3 objects, 2x2 supersampling) are the data
    pipeline's defaults."""
    images = np.empty((num, image_size, image_size, 3), np.uint8)
    cond = np.empty((num, image_size, image_size), np.float32)
    for i in range(num):
        rec = scenes.render_example(seed, start + i, split, image_size)
        images[i] = rec["image"]
        cond[i] = depth_task.disparity_condition(rec)[..., 0]
    return images, cond


def _blur(x, sigma):
    """Per-image separable Gaussian blur (5 taps, edge padding); sigma (B,), 0 = identity."""
    taps = jnp.arange(-2.0, 3.0)
    w = jnp.exp(-taps[None] ** 2 / (2 * jnp.maximum(sigma, 1e-3)[:, None] ** 2))
    w = w / w.sum(-1, keepdims=True)  # (B, 5)
    h, wd = x.shape[1], x.shape[2]
    p = jnp.pad(x, ((0, 0), (2, 2), (0, 0), (0, 0)), mode="edge")
    x = sum(w[:, k, None, None, None] * p[:, k:k + h] for k in range(5))
    p = jnp.pad(x, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")
    return sum(w[:, k, None, None, None] * p[:, :, k:k + wd] for k in range(5))


def _down_up(x):
    """2x box downsampling then bilinear upsampling: the softness of a decoder that works at half resolution."""
    b, h, w, c = x.shape
    small = x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
    return jax.image.resize(small, x.shape, "bilinear")


def augment(rng, images, cond):
    """images uint8 (B, H, W, 3), cond (B, H, W) -> augmented images in [-1, 1] and the (flipped) cond."""
    b = images.shape[0]
    k = jax.random.split(rng, 9)
    x = images.astype(jnp.float32) / 255.0
    flip = jax.random.bernoulli(k[0], 0.5, (b, 1, 1))
    cond = jnp.where(flip, cond[:, :, ::-1], cond)
    x = jnp.where(flip[..., None], x[:, :, ::-1], x)
    gain = jax.random.uniform(k[1], (b, 1, 1, 3), minval=0.92, maxval=1.08)
    contrast = jax.random.uniform(k[2], (b, 1, 1, 1), minval=0.8, maxval=1.2)
    bright = jax.random.uniform(k[3], (b, 1, 1, 1), minval=-0.08, maxval=0.08)
    mean = x.mean((1, 2, 3), keepdims=True)
    x = (x * gain - mean) * contrast + mean + bright
    sigma = jax.random.uniform(k[4], (b,), maxval=1.2) * jax.random.bernoulli(k[5], 0.5, (b,))
    x = _blur(x, sigma)
    x = jnp.where(jax.random.bernoulli(k[6], 0.2, (b, 1, 1, 1)), _down_up(x), x)
    noise = jax.random.uniform(k[7], (b, 1, 1, 1), maxval=0.05) * jax.random.bernoulli(k[8], 0.5, (b, 1, 1, 1))
    x = x + noise * jax.random.normal(jax.random.fold_in(rng, 1), x.shape)
    x = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0) / 255.0
    return x * 2.0 - 1.0, cond


def degrade(images: np.ndarray, seed: int = 0, sigma: float = 0.8, noise: float = 0.03) -> np.ndarray:
    """A fixed generator-like degradation of uint8 test images (blur + noise, re-quantised): the robustness check."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = _blur(x, jnp.full((x.shape[0],), sigma))
    x = x + noise * jax.random.normal(jax.random.key(seed), x.shape)
    return np.asarray(jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)).astype(np.uint8)


def error_table(pred: np.ndarray, cond: np.ndarray) -> dict[str, list[float]]:
    """{metric: [mean, ci_low, ci_high]} with 95 % bootstrap intervals over the images."""
    return {k: list(stats.bootstrap_ci(v)) for k, v in depth.depth_errors(pred, cond).items()}


def shuffled(cond: np.ndarray) -> np.ndarray:
    """Each map replaced by the next scene's: the chance-level pairing (a derangement, so no map meets its own)."""
    return np.roll(cond, 1, axis=0)


def fit(module: nn.Module, loss_fn, train_x: np.ndarray, train_y: np.ndarray, args) -> tuple[dict, int, float]:
    """Adam (warmup + cosine, clipped) on augmented batches drawn from (train_x, train_y); loss_fn(outputs, targets).

    Returns (params, parameter count, seconds of training steps). Shared by the depth estimator and the colour
    segmenter (`train_segmenter`): both read generated images, so both train on the same augmentations."""
    size = train_x.shape[1]
    rng = jax.random.key(args.seed)
    params = nn.meta.unbox(module.init(rng, jnp.zeros((1, size, size, 3))))["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(200, args.steps // 10), args.steps, args.lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, images, targets, key):
        x, y = augment(key, images, targets)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(module.apply({"params": p}, x), y))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    order = np.random.default_rng(args.seed)
    t1, losses = time.time(), []
    for i in range(args.steps):
        idx = order.integers(0, len(train_x), args.batch)
        params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx], jax.random.fold_in(rng, i))
        losses.append(loss)
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            mean_loss = float(np.mean(jax.device_get(losses)))
            if not np.isfinite(mean_loss):
                raise FloatingPointError(f"training diverged at step {i + 1} (loss {mean_loss})")
            print(f"step {i + 1}/{args.steps} loss {mean_loss:.5f} ({(time.time() - t1) / (i + 1):.3f}s/step)",
                  flush=True)
            losses = []
    return params, n_params, time.time() - t1


def train(args) -> dict:
    config = DenseUNetConfig(image_size=args.image_size, channels=tuple(args.channels))
    t0 = time.time()
    train_x, train_y = render_set("train", args.seed, args.num_train, args.image_size)
    print(f"rendered {args.num_train} train scenes in {time.time() - t0:.0f}s", flush=True)
    params, n_params, train_s = fit(DenseUNet(config), lambda out, y: jnp.mean((out[..., 0] - y) ** 2),
                                    train_x, train_y, args)

    out = Path(args.out)
    depth.save_depth_estimator(out, config, {"params": params})
    model = depth.load_depth_estimator(out)  # evaluate what was written, not what is in memory
    test_x, test_y = render_set("test", args.test_seed, args.num_test, args.image_size)
    pred = depth.predict(model, test_x)
    const = np.broadcast_to(train_y.mean(0), test_y.shape)
    results = {
        "clean": error_table(pred, test_y),
        "degraded": error_table(depth.predict(model, degrade(test_x)), test_y),
        "shuffled": error_table(pred, shuffled(test_y)),
        "constant": error_table(const, test_y),
    }
    return write_card(out, results, t0, lambda wall_s: model_card(args, n_params, train_s, wall_s, results))


def write_card(out: Path, results: dict, t0: float, card) -> dict:
    """Writes card(wall seconds since t0) as out/README.md, prints the held-out results, and returns them."""
    wall_s = time.time() - t0
    (out / "README.md").write_text(card(wall_s))
    print(json.dumps(results, indent=1), flush=True)
    print(f"wrote {out} in {wall_s:.0f}s", flush=True)
    return results


def model_card(args, n_params: int, train_s: float, wall_s: float, results: dict) -> str:
    cmd = "python -m codi_jax.metrics.train_depth " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = {"clean": "test renders (the estimator's floor)",
            "degraded": "test renders, blur sigma 0.8 px + noise 0.03",
            "shuffled": "chance: each prediction vs another scene's map",
            "constant": "baseline: the mean training map for every image"}

    def fmt(v):
        return f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"

    table = "\n".join(f"| {rows[k]} | {fmt(r['rmse'])} | {fmt(r['si_rmse'])} | {fmt(r['delta1'])} |"
                      for k, r in results.items())
    return f"""# Depth estimator for the depth-controllability metric ({args.image_size}x{args.image_size} scenes)

A {n_params:,}-parameter U-Net (`codi_jax.models.dense_unet`, channels {tuple(args.channels)}) that reads an RGB
image in [-1, 1] and predicts the depth task's conditioning map: MiDaS-style inverse depth, min-max normalised per
image, in [-1, 1] (`codi_jax.tasks.depth.disparity_condition`). Used by `codi_jax.metrics.depth` to score how well a
generated image follows its depth condition. Valid only for the procedural scenes at
{args.image_size}x{args.image_size}.

## Training

    {cmd}

- data: {args.num_train} scenes of the *train* split, world seed {args.seed}, rendered once (exact z-depth targets)
- {args.steps} steps of Adam, batch {args.batch}, peak learning rate {args.lr} (warmup + cosine), MSE on the map
- augmentations: horizontal flip, colour gain/contrast/brightness jitter, Gaussian blur (sigma up to 1.2 px, half of
  the images), 2x down-up sampling (1 in 5), Gaussian noise (std up to 0.05, half of the images), 8-bit quantisation
- wall time {wall_s:.0f} s in all ({train_s:.0f} s of training steps) on {jax.devices()[0].platform.upper()}
  ({jax.device_count()} device(s), {os.cpu_count()} CPU cores), jax {jax.__version__}

## Held-out errors

{args.num_test} scenes 0..{args.num_test - 1} of the *test* split, world seed {args.test_seed} (the scenes evaluation
uses). Mean over images with a 95 % bootstrap interval. Maps are compared in [0, 1]; rmse and si_rmse lower is better,
delta1 higher is better (definitions: `codi_jax.metrics.depth.depth_errors`).

| pairing | rmse | si_rmse | delta1 |
|---|---|---|---|
{table}
"""


def parse_args(argv=None, doc: str = __doc__):
    """The command line of a reader's training (the segmenter's is the same, with its own docstring)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for model.safetensors, config.json and README.md")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1, help="world seed of the train split, and the training randomness")
    p.add_argument("--num_train", type=int, default=8000, help="train-split scenes rendered once into memory")
    p.add_argument("--test_seed", type=int, default=0, help="world seed of the held-out test split (scenes_seed)")
    p.add_argument("--num_test", type=int, default=512)
    p.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")],
                   default=list(DenseUNetConfig.channels), help="comma-separated channels per level")
    p.add_argument("--log_every", type=int, default=100)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.num_train < 1 or args.num_test < 2:
        p.error("--steps, --batch, --num_train must be >= 1 and --num_test >= 2")
    return args


if __name__ == "__main__":
    train(parse_args())
