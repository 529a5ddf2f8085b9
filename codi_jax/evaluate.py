"""Offline evaluation of a run and of the baselines beside it.

    python -m codi_jax.evaluate --workdir=runs/depth-tiny [--steps=1,2,4,8] [--config.eval.split=validation] [--no-cache]

The config is the one the run saved with its newest checkpoint (its data, image size, task and evaluation settings),
with the --config.key=value flags typed here on top; --config=<file> is needed only for a workdir without a saved config
(a Table 2 workdir of sub-runs, or one holding only exports). The held-out split is config.eval.split: 'test' (default)
for the numbers that are reported, 'validation' for choosing settings.

Methods: the run's own model (<workdir>/export) and every conditional baseline exported under <workdir>/<name>/export.
Each is sampled on the same held-out set and scored against the ground truth: FID and KID (InceptionV3), PSNR, SSIM,
LPIPS, CLIP score and, for depth, controllability: the depth error between what a depth estimator reads from the
generated image and the conditioning map (codi_jax/metrics/depth.py; as ControlNet++ measures it). Reference rows:
- ground truth: the estimator's floor on the real images; its FID/KID are those of a second, disjoint held-out set
  of the same size, i.e. the noise floor of FID/KID at this sample size;
- ground truth through the VAE: the ceiling for PSNR, SSIM and FID of any latent model;
- the text-to-image teacher at eval.teacher_steps DDIM steps, from the caption alone: what "ignores the condition"
  scores.
On the procedural scenes every row also gets caption following (codi_jax/metrics/captions.py): whether a colour
segmenter finds the caption's colours, and the caption's left/right relations, in each image (order: the relations
whose two objects were both found, i.e. are found objects in place; 0.5 is chance).
Reference rows and the real images' InceptionV3 features are cached, keyed by the content of everything that
determines them (codi_jax/eval_cache.py; a hit is logged with its key); --no-cache recomputes them. Progress (images
sampled, images/s, ETA) is logged as training's is.
KID and the depth error carry bootstrap 95 % intervals (`*_ci`); a method is better than another only outside them.
A metric whose network weights are not available is reported as unavailable, with the reason, never estimated.
Writes <workdir>/eval/report.json ({row: {steps: {metric: value}}, "meta": {...}}), report.md, one PNG plot per metric
against the number of steps (as the paper's Figures 2 and 7) and a sample grid (condition | methods | ground truth).
"""

from __future__ import annotations

import copy
import json
import logging as std_logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from codi_jax import checkpoint, cli, eval_cache, modes, tasks
from codi_jax import teacher as teacher_lib
from codi_jax import config as config_lib
from codi_jax import data as data_lib
from codi_jax import export as export_lib
from codi_jax.data import pipeline
from codi_jax.metrics import MetricUnavailable, convert_inception, dense, fid, image, lpips, stats
from codi_jax.metrics import captions as caption_metric
from codi_jax.metrics import clip_score as clip_lib
from codi_jax.models.dense_unet import DenseUNetConfig
from codi_jax.sample import Pipeline, to_uint8

# The report's columns in order: FID/KID, every task's own metrics (the task table's), then those of every task.
LOWER_IS_BETTER = {"fid": True, "kid": True, **tasks.lower_is_better(),
                   "caption_colour_recall": False, "caption_colour_exact": False, "caption_relation": False,
                   "caption_order": False, "lpips": True, "psnr": False, "ssim": False, "clip_score": False}
with_ci = stats.with_ci
FLAGS = flags.FLAGS  # the command line's; its flags are defined under __main__ and by flags_parser
GROUND_TRUTH, VAE_CEILING, TEACHER = "ground truth", "ground truth via VAE", "teacher (text only)"


def discover(workdir: str) -> dict[str, str]:
    """name -> export folder of every finished conditional model in the workdir: the run's own first, named by the
    mode its export records, then each <name>/export (e.g. the methods of a Table 2 run) by its folder."""
    found = {}

    def conditional_mode(export):
        index = os.path.join(export, "model_index.json")
        if not (os.path.isfile(index) and export_lib.is_finished(export)):
            return None
        with open(index) as f:
            mode = json.load(f).get("_codi_jax", {}).get("mode")
        return mode if modes.is_conditional(mode) else None

    own = conditional_mode(os.path.join(workdir, "export"))
    if own:
        found[own] = os.path.join(workdir, "export")
    for name in sorted(os.listdir(workdir)):
        export = os.path.join(workdir, name, "export")
        if name not in found and os.path.isdir(export) and conditional_mode(export):
            found[name] = export
    return found


class WorkdirMismatch(ValueError):
    """The workdir's models were trained for another task than the config's."""


def _check_tasks(config, methods: dict[str, str]) -> None:
    for name, export in methods.items():
        with open(os.path.join(export, "model_index.json")) as f:
            meta = json.load(f).get("_codi_jax", {})
        # Exports written before the task was recorded say nothing: those are let through, as before.
        if meta.get("task") not in (None, config.task):
            raise WorkdirMismatch(
                f"{export} holds a model for task {meta.get('task')!r} (mode {meta.get('mode')!r}), but this config is "
                f"for task {config.task!r}: evaluate it with that task's config (e.g. configs/{meta.get('task')}.py)")


class EvalConfigError(ValueError):
    """An evaluation that cannot work as configured (no config, a held-out split too small for the request, a metric
    reader trained for another image size): one line naming the fields to change, raised before anything is sampled
    or written; the command line exits with status 2."""


def saved_config(workdir: str) -> tuple[int, dict] | None:
    """(step, config as JSON) saved with the newest checkpoint in workdir that has one, or None: a workdir without
    checkpoints/ (sub-runs, exports only) is read without creating anything in it."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    # Orbax logs some twenty lines to open a manager and read one item. Quieted on absl's Python logger, not with
    # logging.set_verbosity: that would set the --verbosity flag and hide this module's own INFO lines.
    absl_logger = std_logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(std_logging.WARNING)
    checkpointer = checkpoint.Checkpointer(workdir, async_save=False)
    try:
        return checkpointer.saved_config()
    finally:
        checkpointer.close()
        absl_logger.setLevel(level)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _overlay(config: ml_collections.ConfigDict, values: dict, prefix: str = "") -> list[str]:
    """Sets each field of `config` to the saved value (JSON: tuples come back as lists); returns the saved keys that
    this version has no field of that kind for (a config saved by another version), which are left out."""
    left_out = []
    for key, value in values.items():
        current = config[key] if key in config else None
        if key not in config or isinstance(current, ml_collections.ConfigDict) != isinstance(value, dict):
            left_out.append(prefix + key)
        elif isinstance(current, ml_collections.ConfigDict):
            left_out += _overlay(current, value, f"{prefix}{key}.")
        else:
            try:
                config[key] = _tuples(value) if isinstance(current, tuple) else value
            except TypeError:  # the field changed type between versions
                left_out.append(prefix + key)
    return left_out


def _get(config: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _saved_run(workdir: str, file_config=None, file_spec: str = "--config"):
    """(config, line) from the workdir's saved config, before any flag and unfinalized, or None without one. The line
    says where it came from; `file_config` must be for the run's task and gives only fields the saved config lacks."""
    saved = saved_config(workdir) if os.path.isdir(workdir) else None
    if saved is None:
        return None
    step, values = saved
    task, mode = values.get("task"), values.get("mode")
    line = f"evaluate: the config saved with checkpoint {step} in {workdir}"
    if task not in config_lib.TASKS:
        raise EvalConfigError(f"the config saved with checkpoint {step} in {workdir} names no known task ({task!r}); "
                              "pass --config with the run's config")
    if file_config is not None:
        if file_config.task != task:
            raise WorkdirMismatch(
                f"{file_spec} is for task {file_config.task!r}, but {workdir} holds a run of task {task!r} (mode "
                f"{mode!r}, checkpoint {step}): leave --config out to evaluate it with its saved config")
        if file_config.mode != mode:
            line += f" ({file_spec} is for mode {file_config.mode!r}: the run's saved mode {mode!r} is used)"
    config = copy.deepcopy(file_config) if file_config is not None else config_lib.base(task)
    left_out = _overlay(config, values)
    if left_out:
        line += f" (saved fields this version does not have, left out: {', '.join(left_out)})"
    return config, line


def _config_needed(workdir: str) -> EvalConfigError:
    return EvalConfigError(f"--config is needed: {workdir} has no saved config (no checkpoint with one); pass the "
                           "config it was trained with, e.g. --config=configs/depth.py:tiny")


def config_for(workdir: str, file_config: ml_collections.ConfigDict | None = None,
               overrides: dict[str, Any] | None = None, file_spec: str = "--config") -> tuple[Any, str]:
    """The config to evaluate `workdir` with, and one line saying which it is and what the flags changed.

    With a saved config (the newest checkpoint's): that config, with `overrides` ({dotted key: value}: the
    --config.key=value flags the user typed) on top, finalized. `file_config` (--config), if given, must be for the
    run's task (else WorkdirMismatch) and supplies only the fields the saved config predates. Without a saved config:
    `file_config` as it is (the flags are already in it), or EvalConfigError when there is none either.
    """
    overrides = dict(overrides or {})
    saved = _saved_run(workdir, file_config, file_spec)
    if saved is None:
        if file_config is None:
            raise _config_needed(workdir)
        typed = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        return file_config, (f"evaluate: config {file_spec} ({workdir} has no saved config)"
                             + (f"; flags set {typed}" if typed else ""))
    config, line = saved
    before = {key: _get(config, key) for key in overrides}
    config.update_from_flattened_dict(overrides)
    config_lib.finalize(config)
    changed = ", ".join(f"{k} {before[k]!r} -> {v!r}" for k, v in overrides.items() if before[k] != v)
    return config, line + (f"; flags changed {changed}" if changed else "; no flag changed it")


def check_held_out(config) -> None:
    """EvalConfigError when the held-out split (eval.split) has fewer records than the evaluation needs:
    eval.num_examples, twice that with eval.noise_floor (FID's floor is a second, disjoint set of the same size)."""
    split, n, floor = config.eval.split, int(config.eval.num_examples), bool(config.eval.noise_floor)
    need = 2 * n if floor else n
    try:
        have = len(data_lib.make_source(config.data, split))
    except ValueError as e:  # e.g. a folder with no image in this split
        raise EvalConfigError(f"eval.split={split!r}: {e}") from e
    if need <= have:
        return
    fits = have // 2 if floor else have
    fixes = [f"--config.eval.num_examples={fits}"] if fits else []
    if floor:
        fixes.append(f"--config.eval.noise_floor=False (then up to {have})")
    fixes.append(f"a larger {split} split ({pipeline.split_size_fields(config.data, split)})")
    raise EvalConfigError(
        f"eval.num_examples={n}{' with eval.noise_floor=True' if floor else ''} needs {need} held-out records, and "
        f"the {split} split (eval.split) has {have}: set {', or '.join(fixes)}")


def _readers(config) -> dict[str, tuple[str, Path, str]]:
    """The image readers of this evaluation: {config.eval field: (what, folder, the command that trains one)}: the
    task's (the task table's), and the colour segmenter of caption following."""
    out = {r.field: (r.what, Path(config.eval[r.field] or r.default_path()), r.command)
           for r in tasks.get(config.task).readers}
    if _reads_captions(config):
        out["segmenter"] = ("colour segmenter", Path(config.eval.segmenter or caption_metric.DEFAULT_PATH),
                            "python -m codi_jax.metrics.train_segmenter")
    return out


def _reads_captions(config) -> bool:
    # Caption following reads the scene grammar's captions: procedural scenes, and a task whose caption describes the
    # target (not edit's instructions).
    return config.data.dataset == "scenes" and tasks.get(config.task).reads_captions


def _reader_misfit(config, field: str, size: int | None) -> str | None:
    """One line when the reader of config.eval.<field> reads another image size than the data have, else None."""
    what, path, command = _readers(config)[field]
    s = int(config.data.image_size)
    if size is None or int(size) == s:
        return None
    return (f"config.eval.{field}: the {what} {path} reads {size}x{size} images, and the data are {s}x{s} "
            f"(data.image_size): pass one trained at {s} px (`{command} --image_size {s} --out DIR`, then "
            f"--config.eval.{field}=DIR)")


def check_readers(config) -> None:
    """EvalConfigError for a reader set in config.eval that reads another image size than the data, from its
    config.json alone (before the held-out set is built). The shipped default at another size is no refusal: its metric
    is reported unavailable (Scorer), as when no reader exists."""
    for field, (_, path, _) in _readers(config).items():
        file = path.expanduser() / dense.CONFIG_FILE
        if config.eval[field] and file.is_file():
            problem = _reader_misfit(config, field, DenseUNetConfig.from_dict(json.loads(file.read_text())).image_size)
            if problem:
                raise EvalConfigError(problem)


def samplers_for(mode: str, steps: tuple[int, ...], teacher_steps: int) -> list[tuple[str, str, int]]:
    """(row label suffix, sampler, steps) to evaluate for a model of this mode (the paper's Table 2 rows)."""
    return modes.get(mode).eval_rows(steps, teacher_steps)


class Scorer:
    """Loads each metric network once; absent weights make that metric unavailable with a reason.

    real_uint8 / cond are the held-out ground truth and conditions that every row is scored against; extras what the
    task's metrics need beside them (held_out's batches: sr's low-resolution inputs)."""

    def __init__(self, config, real_uint8: np.ndarray, captions: list[str], cond: np.ndarray | None = None,
                 extras: dict[str, np.ndarray] | None = None, cache: eval_cache.Cache | None = None,
                 held: dict | None = None):
        self.unavailable: dict[str, str] = {}
        # The content of every metric network's weights: part of each cached row's key.
        self.reader_hashes: dict[str, str | None] = {
            "inception": None,  # hashed once loaded: loading converts it on first use
            "lpips": eval_cache.content_hash(config.eval.lpips), "lpips_net": config.eval.lpips_net,
            "clip": eval_cache.content_hash(config.eval.clip),
            **{field: eval_cache.content_hash(path) for field, (_, path, _) in _readers(config).items()}}
        self.real = real_uint8
        self.captions = captions
        self.cond = cond
        self.extras = dict(extras or {})
        self.task = tasks.get(config.task)
        self.seed = int(config.eval.seed)
        try:
            self.inception = fid.load_inception(config.eval.inception or None)
            compute = lambda: fid.inception_features(self.inception, real_uint8)  # noqa: E731
            if cache is None:
                self.real_features = compute()
            else:
                self.reader_hashes["inception"] = eval_cache.content_hash(
                    config.eval.inception or convert_inception.default_path())
                self.real_features = cache.array("the real images' InceptionV3 features", cache.key(
                    what="real_features", held=held, inception=self.reader_hashes["inception"]), compute)
        except (MetricUnavailable, FileNotFoundError) as e:
            self.inception = None
            self.unavailable["fid"] = self.unavailable["kid"] = str(e)
        self.readers: dict[str, Any] = {}  # config.eval field -> the task's loaded reader
        for reader in self.task.readers:
            try:
                self.readers[reader.field] = self._reader(config, reader.field, reader.load)
            except (MetricUnavailable, FileNotFoundError) as e:
                for m in reader.metrics:
                    self.unavailable[m] = str(e)
        self.segmenter = None
        if _reads_captions(config):
            try:
                self.segmenter = self._reader(config, "segmenter", caption_metric.load_segmenter)
            except (MetricUnavailable, FileNotFoundError) as e:
                for m in ("caption_colour_recall", "caption_colour_exact", "caption_relation", "caption_order",
                          *self.task.segmenter_metrics):
                    self.unavailable[m] = str(e)
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

    @staticmethod
    def _reader(config, field: str, load):
        """A dense reader (config.eval.<field>, else the shipped one) that reads the data's image size. One the user
        named at another size is refused (EvalConfigError); the shipped one at another size is unavailable."""
        model = load(config.eval[field] or None)
        problem = _reader_misfit(config, field, model[0].config.image_size)
        if problem and config.eval[field]:
            raise EvalConfigError(problem)
        if problem:
            logging.warning("%s", problem)
            raise MetricUnavailable(problem)
        return model

    def distribution(self, images_uint8: np.ndarray) -> dict[str, Any]:
        """FID and KID (with a bootstrap interval) of a set of images against the held-out ground truth."""
        if self.inception is None:
            return {}
        features = fid.inception_features(self.inception, images_uint8)
        kid = fid.kid_bootstrap(self.real_features, features, seed=self.seed)
        return {"fid": fid.fid_from_features(self.real_features, features), "kid": kid.kid,
                "kid_ci": [kid.low, kid.high]}

    def task_metrics(self, images_uint8: np.ndarray) -> dict[str, Any]:
        """The task's own metrics (the task table's: depth error for depth, PSNR/SSIM on Y and LR consistency for sr,
        PSNR of the known region and of the hole, SSIM and segmenter label agreement in the hole for inpaint), with
        intervals where per-image."""
        return {} if self.task.metrics is None else self.task.metrics(self, images_uint8)

    def caption_following(self, images_uint8: np.ndarray) -> dict[str, Any]:
        """Are the caption's objects there in the caption's colours and left/right places (codi_jax.metrics.captions)?"""
        if self.segmenter is None:
            return {}
        labels = caption_metric.segment(self.segmenter, images_uint8)
        return with_ci(caption_metric.caption_following(labels, self.captions), "caption_", self.seed)

    def pixels(self, fake_uint8: np.ndarray) -> dict[str, Any]:
        """Agreement with the ground truth image: PSNR, SSIM (whole image, RGB), LPIPS, CLIP score."""
        real = self.real.astype(np.float32) / 255.0
        fake = fake_uint8.astype(np.float32) / 255.0
        out = {"psnr": float(np.mean(image.psnr(fake, real))), "ssim": float(np.mean(image.ssim(fake, real)))}
        if self.lpips is not None:
            out["lpips"] = float(np.mean(lpips.lpips_distance(self.lpips, fake_uint8, self.real)))
        if self.clip is not None:
            model, params, tokenizer = self.clip
            out["clip_score"] = clip_lib.clip_score(model, params, tokenizer, fake, self.captions).cosine
        return out

    def __call__(self, fake_uint8: np.ndarray) -> dict[str, Any]:
        return {**self.pixels(fake_uint8), **self.distribution(fake_uint8), **self.task_metrics(fake_uint8),
                **self.caption_following(fake_uint8)}


def _grid(columns: list[np.ndarray], n: int, zoom: int = 1) -> np.ndarray:
    """Rows = examples, columns = condition | methods | ground truth (uint8), each tile enlarged `zoom` times
    (nearest neighbour, so 32 px scenes stay readable) with a 1-pixel white gutter between columns."""
    def rgb(x):
        x = tasks.condition_rgb(x)
        return np.pad(x.repeat(zoom, 0).repeat(zoom, 1), ((0, 1), (0, 1), (0, 0)), constant_values=255)

    rows = [np.concatenate([rgb(c[i]) for c in columns], axis=1) for i in range(n)]
    return np.concatenate(rows, axis=0)


def _rows(report: dict):
    """(name, steps, metrics) of every row, methods in report order, steps ascending ('-': a reference row)."""
    for name, rows in report.items():
        if name == "meta":
            continue
        for steps, r in sorted(rows.items(), key=lambda kv: -1 if kv[0] == "-" else int(kv[0])):
            yield name, steps, r


def _plots(report: dict, out_dir: str) -> list[str]:
    """One plot per metric against the number of steps; the reference rows (ground truth, VAE, teacher) are drawn
    as horizontal lines, and intervals, where a metric has one, as error bars."""
    import matplotlib  # here, not at the top: the headless backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for _, _, r in _rows(report) for m in r if m in LOWER_IS_BETTER})
    references = {GROUND_TRUTH: "k", VAE_CEILING: "tab:gray", TEACHER: "tab:red"}
    references.update({name: "tab:olive" for name, rows in report.items() if name != "meta" and "-" in rows})
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, rows in report.items():
            if name == "meta":
                continue
            if name in references:
                for r in rows.values():
                    if metric in r:
                        ax.axhline(r[metric], ls="--", lw=1, color=references[name], label=name)
                continue
            pts = sorted((int(s), r[metric], r.get(metric + "_ci")) for s, r in rows.items() if metric in r)
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if all(p[2] for p in pts):
                err = np.abs(np.array([[p[2][0] for p in pts], [p[2][1] for p in pts]]) - np.array(ys))
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
            else:
                ax.plot(xs, ys, marker="o", label=name)
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


def _cell(r: dict, metric: str) -> str:
    if metric not in r:
        return "n/a"
    ci = r.get(metric + "_ci")
    return f"{r[metric]:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else f"{r[metric]:.4g}"


def markdown(report: dict) -> str:
    metrics = [m for m in LOWER_IS_BETTER if any(m in r for _, _, r in _rows(report))]
    lines = ["| method | steps | " + " | ".join(metrics) + " | s/image |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    for name, steps, r in _rows(report):
        seconds = f"{r['seconds_per_image']:.4f}" if "seconds_per_image" in r else "-"
        lines.append(f"| {name} | {steps} | " + " | ".join(_cell(r, m) for m in metrics) + f" | {seconds} |")
    meta = report.get("meta", {})
    lines.append("\n[lo, hi]: bootstrap 95 % interval. " + meta.get("notes", ""))
    for metric, reason in meta.get("unavailable", {}).items():
        lines.append(f"\n{metric}: unavailable ({reason})")
    return "\n".join(lines) + "\n"


def held_out(config, num_examples: int):
    """The evaluation's held-out set, from config.eval.split: (batches, real images uint8, conditions or None,
    captions), the same examples and per-batch noise seeds for every caller, so rows scored on it compare with the
    evaluation's (of the same split) to the digit. The batches also hold what the task's metrics need beside the
    condition (batch_extras)."""
    batches = data_lib.make_eval_batches(config.data, batch_size=int(config.eval.batch_size),
                                         num_examples=num_examples, seed=int(config.eval.seed),
                                         split=config.eval.split, extras=True)
    real = np.concatenate([to_uint8(b["image"]) for b in batches])
    cond = np.concatenate([b["cond"] for b in batches]) if "cond" in batches[0] else None
    return batches, real, cond, [c for b in batches for c in b["caption"]]


def batch_extras(batches) -> dict[str, np.ndarray]:
    """What the task's metrics need beside the condition (sr: 'lowres'), over all held-out batches."""
    keys = [k for k in batches[0] if k not in ("image", "caption", "input_ids", "cond")]
    return {k: np.concatenate([b[k] for b in batches]) for k in keys}


class Progress:
    """The evaluation's progress in the log, as training's: images sampled of all, and an ETA (every ~15 s).

    Sampling and scoring are timed apart, because their costs scale differently: sampling with images x steps (a
    teacher row at 50 steps costs 12x a CoDi row at 4), scoring with images only (InceptionV3 at 299 px, which at tiny
    scale costs more per image than all of CoDi's steps). The ETA is the work left of each kind at its measured rate;
    work is added as rows are about to be computed, so a row read from the cache costs nothing."""

    def __init__(self, every_s: float = 15.0):
        self.every_s, self.last = every_s, time.time()
        self.todo = {"sample": 0, "score": 0}  # image-steps, images
        self.done = {"sample": 0, "score": 0}
        self.spent = {"sample": 0.0, "score": 0.0}
        self.images_todo = self.images_done = 0

    def add(self, images: int, steps: int = 0) -> None:
        """A row to compute: `images` scored and, when steps > 0, sampled at `steps` steps each."""
        self.todo["score"] += int(images)
        if steps:
            self.todo["sample"] += int(images) * int(steps)
            self.images_todo += int(images)

    def eta_s(self) -> float | None:
        """Seconds left at the rates measured so far; None until both kinds of work that remain have a rate."""
        left = 0.0
        for kind in self.todo:
            remaining = self.todo[kind] - self.done[kind]
            if remaining <= 0:
                continue
            if not self.done[kind] or self.spent[kind] <= 0:
                return None
            left += remaining * self.spent[kind] / self.done[kind]
        return left

    def sampled(self, images: int, steps: int, seconds: float, what: str) -> None:
        self.done["sample"] += int(images) * int(steps)
        self.spent["sample"] += seconds
        self.images_done += int(images)
        now = time.time()
        if now - self.last < self.every_s and self.images_done < self.images_todo:
            return
        self.last = now
        eta = self.eta_s()
        logging.info("eval: %s: %d/%d images sampled (%.1f images/s in this row's batches), ETA %s", what,
                     self.images_done, self.images_todo, images / max(seconds, 1e-9),
                     "?" if eta is None else f"{eta / 60:.1f} min")

    def score(self, scorer, images: np.ndarray) -> dict:
        """scorer(images), timed as scoring work."""
        t0 = time.time()
        scores = scorer(images)
        self.scored(len(images), time.time() - t0)
        return scores

    def scored(self, images: int, seconds: float) -> None:
        self.done["score"] += int(images)
        self.spent["score"] += seconds


def sample_rows(pipe, label_prefix: str, samplers, batches, config, scorer, report: dict, grid: dict,
                progress: Progress | None = None) -> None:
    """Samples every (suffix, sampler, steps) of one model on the held-out batches and scores it."""
    # eval.guidance_scale 0: each model at its own scale (1 unless it was distilled for another).
    guidance = float(config.eval.guidance_scale) or pipe.default_guidance()
    for suffix, sampler, n in samplers:
        label = label_prefix + suffix
        outputs, times = [], []
        for i, b in enumerate(batches):
            t0 = time.time()
            outputs.append(pipe(b["cond"] if "cond" in b else b["image"], b["caption"], method=sampler, steps=n,
                                seed=int(config.eval.seed) + i, guidance_scale=guidance))
            times.append((time.time() - t0) / len(b["caption"]))
            if progress is not None:
                progress.sampled(len(b["caption"]), n, time.time() - t0, f"{label} @ {n} steps")
        fake = np.concatenate(outputs)
        scores = scorer(fake) if progress is None else progress.score(scorer, fake)
        # The first batch pays the compile; sampling speed is the median of the others.
        scores.update(seconds_per_image=float(np.median(times[1:] if len(times) > 1 else times)), sampler=sampler,
                      guidance_scale=guidance)
        report.setdefault(label, {})[str(n)] = scores
        logging.info("eval %s @ %d steps (%s, guidance %g): %s", label, n, sampler, guidance, scores)
        grid.setdefault(label, {})[n] = fake[:8]


def run(config, workdir: str, steps: tuple[int, ...] | None = None, only: tuple[str, ...] | None = None) -> dict:
    """Evaluates every finished model in `workdir` (discover), or the ones named in `only`, beside the reference rows."""
    steps = tuple(int(s) for s in (steps or config.eval.steps))
    # Checked before anything is written: a mistyped workdir must not gain an eval/ folder.
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir!r} does not exist")
    methods = discover(workdir)
    if only is not None:
        missing = [m for m in only if m not in methods]
        if missing:
            raise FileNotFoundError(f"no finished model {missing} in {workdir!r} (finished: {sorted(methods)})")
        methods = {m: methods[m] for m in only}
    if not methods:
        raise FileNotFoundError(f"no finished conditional model in {workdir!r} (looked for export/ and */export/)")
    _check_tasks(config, methods)
    check_held_out(config)
    check_readers(config)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    n_eval, bs, seed = int(config.eval.num_examples), int(config.eval.batch_size), int(config.eval.seed)
    t0 = time.time()
    batches, real, cond, captions = held_out(config, n_eval)
    logging.info("eval: held-out set of %d %s examples (%s) prepared in %.0f s", len(real), config.eval.split,
                 config.data.dataset, time.time() - t0)
    t0 = time.time()
    cache = eval_cache.Cache(config.eval.cache_dir or None, enabled=bool(config.eval.cache))
    extras = batch_extras(batches)
    # The held-out set by its content: every reference row is a function of it, the networks and the settings.
    held = {"split": config.eval.split, "seed": seed, "batch_size": bs, "task": config.task,
            "data": eval_cache.array_hash(real, *([] if cond is None else [cond]), *(extras[k] for k in sorted(extras)),
                                          "\n".join(captions))}
    scorer = Scorer(config, real, captions, cond, extras, cache=cache, held=held)
    base = {"held": held, "readers": scorer.reader_hashes}
    report: dict[str, Any] = {}
    grid: dict[str, dict[int, np.ndarray]] = {}
    pipes = {name: Pipeline(export) for name, export in methods.items()}  # each export read once
    progress = Progress()
    for p in pipes.values():  # known up front, so the ETA counts them from the first reference row on
        for _, _, n in samplers_for(p.meta["mode"], steps, int(config.eval.teacher_steps)):
            progress.add(len(real), n)

    def scored(images):  # a reference row that is computed, not read from the cache
        progress.add(len(images))
        return progress.score(scorer, images)

    # Reference rows first: what the metrics read at their floor and ceiling, and for a model that ignores the
    # condition. Each is read back from the cache when nothing it depends on has changed.
    reference = None
    if config.eval.noise_floor:
        reference = np.concatenate([to_uint8(b["image"]) for b in data_lib.make_eval_batches(
            config.data, batch_size=bs, num_examples=n_eval, seed=seed, offset=n_eval, split=config.eval.split)])

    def truth_row():
        truth = {**scorer.task_metrics(real), **scorer.caption_following(real)}
        if reference is not None:
            truth.update(scorer.distribution(reference))
        return truth

    report[GROUND_TRUTH] = {"-": cache.row(GROUND_TRUTH, cache.key(what="ground_truth", **base, noise_floor=(
        None if reference is None else eval_cache.array_hash(reference))), truth_row)}
    main = next(iter(pipes.values()))
    report[VAE_CEILING] = {"-": cache.row(VAE_CEILING, cache.key(
        what="vae", **base, vae=eval_cache.content_hash(os.path.join(main.path, "vae"))),
        lambda: scored(np.concatenate([main.autoencode(b["image"]) for b in batches])))}
    if cond is not None and tasks.get(config.task).references is not None:  # the task's (sr: bicubic upsampling)
        for label, images in tasks.get(config.task).references(real, cond, scorer.extras).items():
            report[label] = {"-": cache.row(label, cache.key(what="task_reference", label=label, **base,
                                                             images=eval_cache.array_hash(images)),
                                            lambda: scored(images))}
            grid.setdefault(label, {})[0] = images[:8]
    teacher = teacher_lib.folder(config.teacher, workdir) if config.eval.teacher_steps else ""
    if teacher:
        n_teacher = int(config.eval.teacher_steps)
        key = cache.key(what="teacher", **base, teacher=eval_cache.content_hash(teacher), steps=n_teacher,
                        guidance=float(config.eval.guidance_scale), schedule=config.schedule.to_dict(),
                        prediction_type=config.model.prediction_type)

        def teacher_row():
            pipe = Pipeline(teacher, schedule=config.schedule.to_dict(), prediction_type=config.model.prediction_type)
            sub_report, sub_grid = {}, {}
            progress.add(len(real), n_teacher)
            sample_rows(pipe, TEACHER, [("", "ddim", n_teacher)], batches, config, scorer, sub_report, sub_grid,
                        progress)
            return sub_report[TEACHER][str(n_teacher)], sub_grid[TEACHER][n_teacher]

        row, images = cache.row_with_images(TEACHER, key, teacher_row)
        report[TEACHER] = {str(n_teacher): row}
        grid[TEACHER] = {n_teacher: images}
    logging.info("eval references in %.0f s: %s", time.time() - t0, {k: report[k] for k in report})

    for name, pipe in pipes.items():
        sample_rows(pipe, name, samplers_for(pipe.meta["mode"], steps, int(config.eval.teacher_steps)), batches,
                     config, scorer, report, grid, progress)
    shown = tasks.get(config.task).show(cond[:8], {k: v[:8] for k, v in scorer.extras.items()}) \
        if cond is not None else real[:8]
    columns, names = [shown], ["condition"]
    for label, by_steps in grid.items():
        n = 4 if 4 in by_steps else max(by_steps)
        columns.append(by_steps[n])
        names.append(f"{label} @ {n}" if n else label)  # 0: a reference row's images (sr: bicubic)
    columns.append(real[:8])
    names.append("ground truth")
    report["meta"] = {
        "num_examples": int(len(real)), "split": config.eval.split, "seed": seed,
        "image_size": int(config.data.image_size),
        "task": config.task, "steps": list(steps), "teacher": config.teacher,
        # Relative to the workdir, as given for the teacher: a report must not record the machine it ran on.
        "methods": {k: os.path.relpath(v, workdir) for k, v in methods.items()},
        "unavailable": scorer.unavailable, "grid_columns": names, "seconds": round(time.time() - t0, 1),
        "cache": {"dir": str(cache.root) if cache.enabled else None, "read_back": cache.hits,
                  "computed": cache.misses},
        "notes": (f"Held-out {config.eval.split} split ({int(len(real))} examples). "
                  f"{GROUND_TRUTH}: depth errors and caption following of the real images (the readers' floor and "
                  f"ceiling); its FID/KID are those of "
                  f"a disjoint held-out set of the same size (the noise floor). {VAE_CEILING}: encode-decode of the "
                  f"real images. {TEACHER}: the text-to-image teacher from the caption alone."),
    }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    zoom = max(1, 128 // int(config.data.image_size))
    Image.fromarray(_grid(columns, min(8, len(real)), zoom)).save(os.path.join(out_dir, "samples.png"))
    report["meta"]["plots"] = [os.path.relpath(p, workdir) for p in _plots(report, out_dir)]
    _update_model_cards(report, methods)
    logging.info("evaluation written to %s:\n%s", out_dir, markdown(report))
    return report


def _update_model_cards(report: dict, methods: dict[str, str]) -> None:
    """Each export's model card gets its own rows and the reference rows."""
    for name, path in methods.items():
        # its own rows and every reference row: ground truth, the VAE, the teacher and the task's (sr: bicubic)
        own = {k: v for k, v in report.items()
               if k in (TEACHER, "meta") or set(v) == {"-"} or k == name or k.startswith(name + " ")}
        if not export_lib.update_model_card(path, markdown(own)):
            logging.warning("%s has no codi_jax model card: its metrics are only in the eval report", path)


def flags_parser(argv):
    """cli.flags_parser, after defining --config: a config file when one is given; otherwise the workdir's saved
    config, against which the --config.key=value flags are then read (their types and typos are its own)."""
    workdir = cli.flag_value(argv, "workdir")
    asks_help = any(a.split("=")[0] in ("--help", "-h", "--helpfull", "--helpshort", "-?") for a in argv)
    if cli._config_arg(argv) is None and workdir and not asks_help:
        if not os.path.isdir(workdir):
            print(f"error: --workdir={workdir!r} does not exist", file=sys.stderr)
            raise SystemExit(1)
        try:
            saved = _saved_run(workdir)
        except EvalConfigError as e:
            cli.fail(str(e))
        if saved is None:
            cli.fail(str(_config_needed(workdir)))
        saved = saved[0]  # unfinalized: a saved field this version refuses can still be set right by a flag
        for key, value in cli._overrides(argv):
            problem = cli.override_problem(saved, key, value, root="the saved config")
            if problem:
                cli.fail(problem)
        config_flags.DEFINE_config_dict("config", saved, "The run's config: by default the one saved in --workdir",
                                        lock_config=True)
    else:
        config_flags.DEFINE_config_file("config", None, "Task config file, e.g. configs/depth.py:tiny; needed only "
                                        "for a workdir without a saved config", lock_config=True)
    return cli.flags_parser(argv)


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    try:
        steps = tuple(int(s) for s in FLAGS.steps.split(",")) if FLAGS.steps else None
    except ValueError:
        cli.fail(f"--steps={FLAGS.steps}: comma-separated step counts, e.g. 1,2,4")
    spec = cli._config_arg(sys.argv)
    file_config = cli.config(FLAGS) if spec else None
    if not os.path.isdir(FLAGS.workdir):  # before the config line: a mistyped workdir is the whole story
        print(f"error: --workdir={FLAGS.workdir!r} does not exist", file=sys.stderr)
        raise SystemExit(1)
    try:
        config, line = config_for(FLAGS.workdir, file_config, FLAGS["config"].override_values,
                                  file_spec=f"--config={spec}")
    except WorkdirMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except ValueError as e:  # EvalConfigError, or an override that the saved config does not validate with
        cli.fail(str(e))
    logging.info("%s", line)
    try:
        run(config, FLAGS.workdir, steps)
    except EvalConfigError as e:
        cli.fail(str(e))
    except (FileNotFoundError, WorkdirMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The run folder to evaluate")
    flags.DEFINE_string("steps", "", "Comma-separated step counts (default: config.eval.steps)")
    flags.mark_flags_as_required(["workdir"])
    # --no-cache: recompute every reference row (config.eval.cache=False; codi_jax/eval_cache.py). In sys.argv
    # itself: config_flags reads the --config.* overrides from there.
    sys.argv = ["--config.eval.cache=False" if a == "--no-cache" else a for a in sys.argv]
    app.run(main, flags_parser=flags_parser)
