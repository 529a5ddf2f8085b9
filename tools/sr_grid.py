"""A super-resolution model's samples beside its input: low-res input | bicubic | the model at 1 step | at 4 steps |
ground truth, on the first held-out scenes of a split, with their captions.

    python tools/sr_grid.py --model=runs/sr-tiny [--split=test] [--rows=8] [--out=docs/sr_samples.png]

The inputs are the evaluation's (evaluate.held_out on configs/sr.py:tiny: the same scenes, degradations and noise
seeds), so the images are those the report scores. The low-res input is shown enlarged by pixel repetition, so its
pixels stay visible.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codi_jax import evaluate, tasks  # noqa: E402
from codi_jax.sample import Pipeline  # noqa: E402
from codi_jax.testing import tiny_config  # noqa: E402


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a finished SR run's workdir or its export/ folder")
    p.add_argument("--split", default="test", choices=("validation", "test"))
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", default="1,4", help="comma-separated sampling steps, one column each")
    p.add_argument("--out", default="sr_samples.png")
    args = p.parse_args(argv)

    pipe = Pipeline(args.model)
    if pipe.meta.get("task") != tasks.sr.TASK.name:
        p.error(f"{args.model!r} holds a {pipe.meta.get('task')!r} model, not a super-resolution one")
    config = tiny_config("sr", **{"eval.split": args.split, "eval.batch_size": args.rows,
                                  "data.sr_scale": int(pipe.meta.get("sr_scale", 4)),
                                  "data.sr_degradation": pipe.meta.get("sr_degradation", "bicubic")})
    batches, real, cond, captions = evaluate.held_out(config, args.rows)
    extras = evaluate.batch_extras(batches)
    scale = real.shape[1] // extras["lowres"].shape[1]
    columns = [tasks.sr.TASK.show(cond, extras), tasks.to_uint8(cond)]
    for steps in (int(s) for s in args.steps.split(",")):
        columns.append(pipe(cond, captions, steps=steps, seed=int(config.eval.seed)))
    columns.append(real)
    zoom = max(1, 128 // real.shape[1])
    gutter = lambda x: np.pad(x.repeat(zoom, 0).repeat(zoom, 1), ((0, 2), (0, 2), (0, 0)), constant_values=255)  # noqa
    grid = np.concatenate([np.concatenate([gutter(c[i]) for c in columns], 1) for i in range(len(real))], 0)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out}: columns low-res input x{scale} | bicubic | " +
          " | ".join(f"{s} step(s)" for s in args.steps.split(",")) + " | ground truth; rows:")
    for i, text in enumerate(captions):
        print(f"  {i + 1}. {text}")
    return args.out


if __name__ == "__main__":
    main()
