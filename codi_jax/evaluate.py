"""Offline evaluation of a run and of the baselines beside it.

    python -m codi_jax.evaluate --config=configs/depth.py:tiny --workdir=runs/depth-tiny [--steps=1,2,4,8]

Methods: the run's own model (<workdir>/export) and every conditional baseline exported under <workdir>/<name>/export.
Each is sampled on the same held-out set and scored against the ground truth: FID and KID (InceptionV3), PSNR, SSIM,
LPIPS and CLIP score. A metric whose network weights are not available is reported as unavailable, with the reason,
never estimated. Writes <workdir>/eval/report.json ({method: {steps: {metric: value}}, "meta": {...}}), report.md,
one PNG plot per metric against the number of steps (as the paper's Figures 2 and 7), and a sample grid
(condition | methods | ground truth).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

LOWER_IS_BETTER = {"fid": True, "kid": True, "lpips": True, "psnr": False, "ssim": False, "clip_score": False}


def discover(workdir: str, main_mode: str) -> dict[str, str]:
    """name -> export folder of every finished conditional model in the workdir (the run's own first)."""
    found = {}

    def conditional(export):
        index = os.path.join(export, "model_index.json")
        if not (os.path.isfile(index) and os.path.isfile(os.path.join(export, "DONE"))):
            return None
        with open(index) as f:
            return json.load(f).get("_codi_jax", {}).get("mode") in ("finetune", "codi", "pe_codi", "cm", "gd")

    if conditional(os.path.join(workdir, "export")):
        found[main_mode] = os.path.join(workdir, "export")
    for name in sorted(os.listdir(workdir)):
        export = os.path.join(workdir, name, "export")
        if name not in found and os.path.isdir(export) and conditional(export):
            found[name] = export
    return found


def samplers_for(mode: str, steps: tuple[int, ...], teacher_steps: int) -> list[tuple[str, str, int]]:
    """(row label suffix, sampler, steps) to evaluate for a model of this mode (the paper's Table 2 rows)."""
    if mode in ("codi", "pe_codi", "cm"):
        return [("", "codi", s) for s in steps]
    if mode == "gd":
        return [("", "ddim", s) for s in steps]
    rows = [(" ddim", "ddim", s) for s in sorted(set(steps) | {teacher_steps})]
    return rows + [(" dpm++", "dpmpp_2m", s) for s in steps]


class Scorer:
    """Loads each metric network once; absent weights make that metric unavailable with a reason."""

    def __init__(self, config, real_uint8: np.ndarray, captions: list[str]):
        from codi_jax.metrics import MetricUnavailable
        from codi_jax.metrics import clip_score as clip_lib
        from codi_jax.metrics import fid, lpips

        self.unavailable: dict[str, str] = {}
        self.real = real_uint8
        self.captions = captions
        try:
            self.inception = fid.load_inception(config.eval.inception or None)
            self.real_features = fid.inception_features(self.inception, real_uint8)
        except (MetricUnavailable, FileNotFoundError) as e:
            self.inception = None
            self.unavailable["fid"] = self.unavailable["kid"] = str(e)
        try:
            self.lpips = lpips.load_lpips(config.eval.lpips or None, net=config.eval.lpips_net)
        except (MetricUnavailable, FileNotFoundError) as e:
            self.lpips = None
            self.unavailable["lpips"] = str(e)
        try:
            self.clip = clip_lib.load_clip(config.eval.clip or None)
        except (MetricUnavailable, FileNotFoundError) as e:
            self.clip = None
            self.unavailable["clip_score"] = str(e)

    def __call__(self, fake_uint8: np.ndarray) -> dict[str, float]:
        from codi_jax.metrics import clip_score as clip_lib
        from codi_jax.metrics import fid, image, lpips

        real = self.real.astype(np.float32) / 255.0
        fake = fake_uint8.astype(np.float32) / 255.0
        out = {"psnr": float(np.mean(image.psnr(fake, real))), "ssim": float(np.mean(image.ssim(fake, real)))}
        if self.inception is not None:
            features = fid.inception_features(self.inception, fake_uint8)
            out["fid"] = fid.fid_from_features(self.real_features, features)
            size = min(len(features), 1000)
            out["kid"] = float(fid.kid_from_features(self.real_features, features, subsets=50, subset_size=size).mean)
        if self.lpips is not None:
            out["lpips"] = float(np.mean(lpips.lpips_distance(self.lpips, fake_uint8, self.real)))
        if self.clip is not None:
            model, params, tokenizer = self.clip
            out["clip_score"] = clip_lib.clip_score(model, params, tokenizer, fake, self.captions).cosine
        return out


def _grid(columns: list[np.ndarray], n: int) -> np.ndarray:
    """Rows = examples, columns = condition | methods | ground truth (uint8)."""
    def rgb(x):
        return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]

    rows = [np.concatenate([rgb(c[i]) for c in columns], axis=1) for i in range(n)]
    return np.concatenate(rows, axis=0)


def _plots(report: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for name, rows in report.items() if name != "meta" for r in rows.values() for m in r
                      if m in LOWER_IS_BETTER})
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, rows in report.items():
            if name == "meta":
                continue
            pts = sorted((int(s), r[metric]) for s, r in rows.items() if metric in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(metric + (" (lower is better)" if LOWER_IS_BETTER[metric] else " (higher is better)"))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{metric}_vs_steps.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(report: dict) -> str:
    metrics = [m for m in LOWER_IS_BETTER if any(m in r for name, rows in report.items() if name != "meta"
                                                 for r in rows.values())]
    lines = ["| method | steps | " + " | ".join(metrics) + " | s/image |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    for name, rows in report.items():
        if name == "meta":
            continue
        for steps, r in sorted(rows.items(), key=lambda kv: int(kv[0])):
            cells = [f"{r[m]:.4g}" if m in r else "n/a" for m in metrics]
            lines.append(f"| {name} | {steps} | " + " | ".join(cells) + f" | {r.get('seconds_per_image', 0):.4f} |")
    meta = report.get("meta", {})
    for metric, reason in meta.get("unavailable", {}).items():
        lines.append(f"\n{metric}: unavailable ({reason})")
    return "\n".join(lines) + "\n"


def run(config, workdir: str, steps: tuple[int, ...] | None = None) -> dict:
    from PIL import Image

    from codi_jax import data as data_lib
    from codi_jax.sample import Pipeline, to_uint8

    steps = tuple(int(s) for s in (steps or config.eval.steps))
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    methods = discover(workdir, config.mode)
    if not methods:
        raise FileNotFoundError(f"no finished conditional model in {workdir!r} (looked for export/ and */export/)")
    batches = data_lib.make_eval_batches(config.data, batch_size=int(config.eval.batch_size),
                                         num_examples=int(config.eval.num_examples), seed=int(config.eval.seed))
    real = np.concatenate([to_uint8(b["image"]) for b in batches])
    cond = np.concatenate([b["cond"] for b in batches])
    captions = [c for b in batches for c in b["caption"]]
    scorer = Scorer(config, real, captions)
    report: dict[str, Any] = {}
    grid_columns = [to_uint8(cond[:8])]
    for name, export in methods.items():
        pipe = Pipeline.load(export)
        for suffix, sampler, n in samplers_for(pipe.meta["mode"], steps, int(config.eval.teacher_steps)):
            label = name + suffix
            outputs, times = [], []
            for i, b in enumerate(batches):
                t0 = time.time()
                outputs.append(pipe(b["cond"], b["caption"], method=sampler, steps=n, seed=int(config.eval.seed) + i,
                                    guidance_scale=float(config.eval.guidance_scale)))
                times.append((time.time() - t0) / len(b["cond"]))
            fake = np.concatenate(outputs)
            # The first batch pays the compile; sampling speed is the median of the others.
            seconds = float(np.median(times[1:] if len(times) > 1 else times))
            scores = scorer(fake)
            scores.update(seconds_per_image=seconds, sampler=sampler)
            report.setdefault(label, {})[str(n)] = scores
            logging.info("eval %s @ %d steps (%s): %s", label, n, sampler, scores)
            if n == 4 or (n == max(steps) and 4 not in steps):
                grid_columns.append(fake[:8])
    grid_columns.append(real[:8])
    report["meta"] = {
        "num_examples": int(len(real)), "seed": int(config.eval.seed), "image_size": int(config.data.image_size),
        "task": config.task, "steps": list(steps), "methods": {k: v for k, v in methods.items()},
        "unavailable": scorer.unavailable,
        "grid_columns": ["condition"] + [n for n in report if n != "meta"][: len(grid_columns) - 2] + ["ground truth"],
    }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    Image.fromarray(_grid(grid_columns, min(8, len(real)))).save(os.path.join(out_dir, "samples.png"))
    report["meta"]["plots"] = _plots(report, out_dir)
    logging.info("evaluation written to %s:\n%s", out_dir, markdown(report))
    return report


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    steps = tuple(int(s) for s in FLAGS.steps.split(",")) if FLAGS.steps else None
    from codi_jax import config as config_lib

    run(config_lib.finalize(FLAGS.config), FLAGS.workdir, steps)


if __name__ == "__main__":
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Task config file, e.g. configs/depth.py:tiny", lock_config=True)
    flags.DEFINE_string("workdir", None, "The run folder to evaluate")
    flags.DEFINE_string("steps", "", "Comma-separated step counts (default: config.eval.steps)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
