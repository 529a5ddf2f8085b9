"""What a super-resolution input keeps, per degradation and scale, on the tiny config's 32 px scenes.

    python benchmarks/sr_inputs.py [--examples 500] [--split validation] [--out docs/sr_inputs.png]

For each data.sr_degradation ('realesrgan': the paper's real-world second-order degradations; 'bicubic': a clean
downsampling) and sr_scale (2, 4, 8), the condition the SR task builds (the degraded low-res image, bicubic-upsampled)
is scored as an output would be (codi_jax/metrics/sr.py: PSNR/SSIM on RGB and Y with a border of sr_scale cropped, LR
consistency) and read by the caption metric's colour segmenter: does the input still show the caption's colours?
The real scenes' own recall is the ceiling. Writes benchmarks/results/sr_inputs.json and a figure (rows: the real
scene, then each degradation's x4 input as the model sees it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import provenance  # noqa: E402
from codi_jax import tasks  # noqa: E402
from codi_jax.data import degradations, pipeline  # noqa: E402
from codi_jax.metrics import captions, sr, stats  # noqa: E402
from codi_jax.testing import tiny_config  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "sr_inputs.png"))
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "sr_inputs.json"))
    args = parser.parse_args(argv)

    cfg = tiny_config("sr").data
    source = pipeline.make_source(cfg, args.split)
    records = [source[i] for i in range(args.examples)]
    real = np.stack([r["image"] for r in records])
    texts = [r["caption"] for r in records]
    segmenter = captions.load_segmenter()
    recall = lambda images: captions.caption_following(captions.segment(segmenter, images), texts)  # noqa: E731
    rows = {"real scenes": stats.with_ci({"caption_colour_recall": recall(real)["colour_recall"]})}
    figure = [real[:10]]
    for kind in degradations.KINDS:
        for scale in (2, 4, 8):
            options = tasks.Options(sr_scale=scale, sr_degradation=kind)
            examples = [tasks.make_example("sr", r, np.random.default_rng([1234, i]), options=options, extras=True)
                        for i, r in enumerate(records)]
            inputs = tasks.to_uint8(np.stack([e["cond"] for e in examples]))
            lowres = np.stack([e["lowres"] for e in examples])
            per_image = sr.sr_scores(inputs, real, lowres, scale=scale)
            per_image["caption_colour_recall"] = recall(inputs)["colour_recall"]
            rows[f"{kind} x{scale}"] = stats.with_ci(per_image)
            print(kind, scale, {k: round(v, 3) for k, v in rows[f"{kind} x{scale}"].items() if not k.endswith("_ci")})
            if scale == 4:
                figure.append(inputs[:10])
    result = {"rows": rows, "meta": {
        "examples": args.examples, "split": args.split, "image_size": int(cfg.image_size),
        "notes": "Each row scores the SR condition itself (the degraded low-res input, bicubic-upsampled) against the "
                 "real scene; [lo, hi] bootstrap 95 % intervals. caption_colour_recall: the colour segmenter's share "
                 "of captioned colours found in the image.",
        "command": " ".join(["python benchmarks/sr_inputs.py"] + (argv if argv is not None else sys.argv[1:])),
        **provenance.commit(),
        "machine": f"{platform.node()}, {os.cpu_count()} CPU cores"}}
    with open(args.results, "w") as f:
        json.dump(result, f, indent=2)
    grid = np.concatenate([np.concatenate(list(r), 1) for r in figure], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.out)
    return result


if __name__ == "__main__":
    main()
