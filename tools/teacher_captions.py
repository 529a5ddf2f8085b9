"""Does a text-to-image pipeline follow its captions? Its DDIM samples of the first held-out scenes' captions, read by
the caption metric's colour segmenter, at one or more classifier-free guidance scales: colour recall, exact colour
sets, left/right relations and their order when both objects are found, each with a bootstrap 95 % interval as
codi_jax.evaluate reports them, as JSON on stdout; optionally a figure of the samples (one column per guidance
scale, then the real scene).

    python tools/teacher_captions.py [--pipeline builtin:scenes32] [--examples 200] [--guidance 1,2,4]
                                     [--steps 50] [--out teacher_captions.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codi_jax import evaluate  # noqa: E402
from codi_jax import recipes  # noqa: E402
from codi_jax.metrics import captions  # noqa: E402
from codi_jax.sample import Pipeline  # noqa: E402
from codi_jax.testing import tiny_config  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="builtin:scenes32", help="text-to-image pipeline folder (diffusers layout)")
    p.add_argument("--examples", type=int, default=200, help="held-out scenes (the evaluation's first ones)")
    p.add_argument("--guidance", default="1", help="comma-separated classifier-free guidance scales")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--rows", type=int, default=8, help="scenes shown in the figure")
    p.add_argument("--out", default="", help="figure path (PNG); none by default")
    args = p.parse_args(argv)
    scales = [float(s) for s in args.guidance.split(",")]

    cfg = tiny_config("depth", args.pipeline)
    batches, real, _, texts = evaluate.held_out(cfg, args.examples)
    pipe = Pipeline(recipes.resolve(args.pipeline, os.getcwd()), schedule=cfg.schedule.to_dict(),
                         prediction_type=cfg.model.prediction_type)
    segmenter = captions.load_segmenter()
    result, images = {"pipeline": args.pipeline, "examples": len(texts), "ddim_steps": args.steps}, []
    for w in scales:
        # The same initial noise per scene at every scale (seed = the evaluation's per-batch seeds).
        out = np.concatenate([pipe(b["image"], list(b["caption"]), method="ddim", steps=args.steps,
                                   seed=int(cfg.eval.seed) + i, guidance_scale=w) for i, b in enumerate(batches)])
        scores = captions.caption_following(captions.segment(segmenter, out), texts)
        # Means and bootstrap intervals as the evaluation reports them (keys colour_recall, colour_recall_ci, ...).
        result[f"guidance {w:g}"] = {**evaluate.with_ci(scores, seed=int(cfg.eval.seed)),
                                     "relations_scored": int(scores["relation"].size),
                                     "orders_scored": int(scores["order"].size)}
        images.append(out)
    if args.out:
        n = min(args.rows, len(texts))
        grid = np.concatenate([np.concatenate([im[i] for im in images] + [real[i]], 1) for i in range(n)], 0)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.out)
        result["figure"] = args.out
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
