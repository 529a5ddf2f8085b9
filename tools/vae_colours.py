"""Does a pipeline's VAE keep the scenes' colours? The caption metric's segmenter reads real held-out scenes and their
VAE reconstructions; the script prints the colour recall of both, the most frequent colour confusions on object
pixels, and writes a figure: real | reconstruction | real's labels | reconstruction's labels (labels in the palette
colours, background black).

    python tools/vae_colours.py [--pipeline builtin:scenes32] [--examples 100] [--out docs/vae_colours.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codi_jax import evaluate  # noqa: E402
from codi_jax import recipes  # noqa: E402
from codi_jax.data import scenes  # noqa: E402
from codi_jax.metrics import captions  # noqa: E402
from codi_jax.sample import Pipeline  # noqa: E402
from codi_jax.testing import tiny_config  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="builtin:scenes32", help="text-to-image pipeline folder (diffusers layout)")
    p.add_argument("--examples", type=int, default=100, help="held-out scenes (the evaluation's first ones)")
    p.add_argument("--rows", type=int, default=10, help="scenes shown in the figure")
    p.add_argument("--out", default="vae_colours.png")
    args = p.parse_args(argv)

    cfg = tiny_config("depth", args.pipeline)
    batches, real, _, texts = evaluate.held_out(cfg, args.examples)
    pipe = Pipeline(recipes.resolve(args.pipeline, os.getcwd()), schedule=cfg.schedule.to_dict(),
                         prediction_type=cfg.model.prediction_type)
    recon = np.concatenate([pipe.autoencode(b["image"]) for b in batches])
    segmenter = captions.load_segmenter()
    real_labels, recon_labels = captions.segment(segmenter, real), captions.segment(segmenter, recon)
    objects = real_labels > 0
    confusions = Counter((captions.CLASSES[a], captions.CLASSES[b])
                         for a, b in zip(real_labels[objects], recon_labels[objects]) if a != b)
    result = {
        "examples": len(real),
        "colour_recall_real": float(captions.caption_following(real_labels, texts)["colour_recall"].mean()),
        "colour_recall_vae": float(captions.caption_following(recon_labels, texts)["colour_recall"].mean()),
        "object_pixels_same_label": float(np.mean(real_labels[objects] == recon_labels[objects])),
        "top_confusions (real -> vae: pixels)": [f"{a} -> {b}: {n}" for (a, b), n in confusions.most_common(8)],
    }
    # Labels drawn in their palette colour (sRGB), background black.
    palette = np.array([[0, 0, 0]] + [np.asarray(scenes.PALETTE[c]) ** (1 / 2.2) * 255 for c in scenes.COLOURS])
    n = min(args.rows, len(real))
    rows = [np.concatenate([real[i], recon[i], palette[real_labels[i]].astype(np.uint8),
                            palette[recon_labels[i]].astype(np.uint8)], axis=1) for i in range(n)]
    zoom = max(1, 128 // real.shape[1])
    Image.fromarray(np.concatenate(rows, axis=0).repeat(zoom, 0).repeat(zoom, 1)).save(args.out)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
