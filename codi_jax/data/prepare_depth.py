"""Precompute depth maps of an image folder with a local transformers depth-estimation model.

    python -m codi_jax.data.prepare_depth --images DIR --model /path/to/dpt-or-depth-anything [--out DIR/depth]

Writes <out>/<relative stem>.png, 16-bit, MiDaS-style disparity (near = bright), min-max normalised per image, at the
image's own size; FolderSource reads them for task 'depth'. The model folder must hold safetensors weights (no pickle).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from absl import logging
from PIL import Image

from codi_jax.data import sources

# Models whose 'predicted_depth' is metric depth (larger = farther); DPT/MiDaS/Depth Anything predict disparity.
_METRIC_MODEL_TYPES = ("glpn", "zoedepth", "depth_pro")


def _hide_broken_torchvision() -> None:
    """transformers imports torchvision when it is installed; a build that does not match torch must look absent."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 -- any failure means it is unusable here
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision"] = None  # importlib then reports "not installed"
        iu = sys.modules.get("transformers.utils.import_utils")
        if iu is not None:  # transformers already imported: forget its cached "torchvision is available"
            for name in ("is_torchvision_available", "is_torchvision_v2_available"):
                fn = getattr(iu, name, None)
                if hasattr(fn, "cache_clear"):
                    fn.cache_clear()


def _is_metric(model_dir: str) -> bool:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("model_type") in _METRIC_MODEL_TYPES or cfg.get("depth_estimation_type") == "metric"


def to_disparity_u16(pred: np.ndarray, metric: bool) -> np.ndarray:
    pred = np.asarray(pred, np.float64)
    disp = 1.0 / np.maximum(pred, 1e-6) if metric else pred
    lo, hi = disp.min(), disp.max()
    norm = (disp - lo) / (hi - lo) if hi > lo else np.zeros_like(disp)
    return np.round(norm * 65535).astype(np.uint16)


def prepare_depth(images: str, model: str | None, out: str | None = None, output_kind: str = "auto",
                  device: str = "cpu") -> dict[str, int]:
    """Writes depth maps for every image under `images`; returns {'written': n, 'skipped': m}."""
    if not model:
        raise ValueError("--model is required: a local folder with a transformers depth-estimation model (config.json, "
                         "preprocessor_config.json, model.safetensors), e.g. a downloaded Intel/dpt-hybrid-midas; "
                         "nothing is ever downloaded")
    if not os.path.isdir(model):
        raise ValueError(f"--model {model!r} is not a local folder")
    if not any(f.endswith(".safetensors") for f in os.listdir(model)):
        raise ValueError(f"--model {model!r} has no .safetensors weights (pickled checkpoints are never loaded)")
    if not os.path.isdir(images):
        raise ValueError(f"--images {images!r} is not a folder")
    if output_kind not in ("auto", "disparity", "depth"):
        raise ValueError(f"--output_kind must be auto, disparity or depth, got {output_kind!r}")
    files = sources._list_images(images, (sources.DEPTH_DIR,))  # pylint: disable=protected-access
    if not files:
        raise ValueError(f"--images {images!r} holds no images ({', '.join(sources.IMAGE_EXTS)})")
    out = out or os.path.join(images, sources.DEPTH_DIR)
    metric = _is_metric(model) if output_kind == "auto" else output_kind == "depth"

    _hide_broken_torchvision()
    from transformers import AutoImageProcessor, pipeline  # optional (torch): only this labelling tool needs it

    # The PIL preprocessing backend needs no torchvision and matches the reference preprocessing.
    processor = AutoImageProcessor.from_pretrained(model, backend="pil", local_files_only=True)
    pipe = pipeline("depth-estimation", model=model, image_processor=processor, device=device,
                    model_kwargs={"use_safetensors": True})
    written = skipped = 0
    for rel in files:
        try:
            with Image.open(os.path.join(images, rel)) as im:
                im.load()
                img = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 -- skip-and-count, as the training sources do
            skipped += 1
            logging.warning("prepare_depth: skipping unreadable image %s: %s", rel, e)
            continue
        pred = pipe(img)["predicted_depth"]
        pred = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred).squeeze()
        if pred.shape != (img.height, img.width):  # older pipelines return the model's resolution
            pred = np.asarray(Image.fromarray(pred.astype(np.float32), mode="F").resize(
                img.size, Image.Resampling.BICUBIC))
        dst = os.path.join(out, os.path.splitext(rel)[0] + ".png")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        Image.fromarray(to_disparity_u16(pred, metric)).save(dst)
        written += 1
    logging.info("prepare_depth: wrote %d depth maps to %s, skipped %d", written, out, skipped)
    return {"written": written, "skipped": skipped}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="image folder (recursive)")
    p.add_argument("--model", default=None, help="local transformers depth-estimation model folder (safetensors)")
    p.add_argument("--out", default=None, help="output folder (default: <images>/depth)")
    p.add_argument("--output_kind", default="auto", help="auto | disparity | depth: what the model predicts")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        stats = prepare_depth(a.images, a.model, a.out, a.output_kind, a.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['written']} depth maps, skipped {stats['skipped']} unreadable images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
