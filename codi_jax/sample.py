"""Inference: prompts (and a condition: depth map, low-res image, photo + mask, image to edit) -> images, from an export
folder, a run's workdir or any diffusers Stable Diffusion folder. One PNG per image in --out-dir.

    python -m codi_jax.sample --model=runs/depth-tiny --image=depth.png --prompt="a red sphere" --out-dir=out
    python -m codi_jax.sample --model=codi_jax/pretrained/scenes32 --prompt="a red sphere" --num-images=4 --out-dir=out

Python:
    pipe = Pipeline("runs/depth-tiny")                 # <workdir>/export or the export folder itself
    images = pipe(cond_images, prompts, steps=4)       # uint8 (N, H, W, 3)

One jitted function per (method, steps, batch shape); the batch is split over all local devices ('data' axis).
Nothing heavy is imported until it is needed, so that `--help` and a mistake on the command line answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

# JSON only: a teacher folder's scheduler is read before JAX loads (--help and input checks answer at once); the task
# table and its input readers are numpy and PIL.
from codi_jax import tasks
from codi_jax import teacher as teacher_lib
from codi_jax.tasks.inputs import FITS, read_depth  # noqa: F401 - read_depth is part of this module's API

# diffusion.METHODS, written out so that parsing the command line imports no JAX (tests/test_sample_cli.py checks).
METHODS = ("ddim", "dpmpp_2m", "euler", "codi")
# The conditional tasks' condition channels (the task table's).
TASK_CHANNELS = {name: t.channels for name, t in tasks.TABLE.items() if t.conditional}


def _meta_from_scheduler(path: str) -> dict:
    """schedule and prediction_type from a diffusers pipeline's scheduler/scheduler_config.json (any SD folder); {}
    without one, or with a schedule codi_jax does not implement."""
    try:
        found = teacher_lib.scheduler(path)
    except ValueError:
        return {}
    return {} if found is None else {"schedule": found[0], "prediction_type": found[1]}


def export_folder(path: str) -> str:
    """A run's <workdir>/export, or `path` itself when it is an export (or any diffusers pipeline folder)."""
    if os.path.isdir(os.path.join(path, "export")):
        path = os.path.join(path, "export")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path!r} is not a codi_jax export (no model_index.json); pass a workdir whose "
                                "training finished, or its export/ folder")
    return path


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.path.dirname(os.path.dirname(path))!r} holds no {what} ({path} is missing)")
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model folder takes and makes, read from its JSON files alone (no weights, no JAX)."""
    path: str  # the export folder
    task: str  # a task of the task table (codi_jax/tasks); 't2i' for a text-to-image model
    channels: int  # condition channels; 0 for text-to-image
    size: int  # the trained (square) image size
    multiple: int  # generated sizes are multiples of this: the VAE factor x the UNet's downsampling
    sr_scale: int  # sr: output / input size (model_index's sr_scale; else the data config's default, 4)


def model_spec(path: str, sr_scale: int | None = None) -> ModelSpec:
    """The ModelSpec of an export, a run's workdir or a diffusers SD folder; ValueError/FileNotFoundError naming the
    problem for anything else, so that a wrong model costs no weight loading."""
    path = export_folder(path)
    index = _read_json(os.path.join(path, "model_index.json"), "model_index.json")
    meta = index.get("_codi_jax", {})
    mode = meta.get("mode")
    if mode == "vae":
        raise ValueError(f"{path!r} holds an autoencoder (mode 'vae'), not a model that makes images from prompts")
    vae = _read_json(os.path.join(path, "vae", "config.json"), "VAE (vae/config.json)")
    factor = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    conditional_file = os.path.join(path, "conditional", "config.json")
    recorded = meta.get("task")
    if (recorded in tasks.TABLE and tasks.get(recorded).conditional) or os.path.isfile(conditional_file):
        config = _read_json(conditional_file, "exported conditional model (conditional/config.json)")
        unet, channels = config["unet"], int(config["control"]["conditioning_channels"])
        task = meta.get("task")
        if task is None:  # an export that predates the task record: the channels tell, unless sr and edit tie
            task = {c: t for t, c in TASK_CHANNELS.items() if c != 3}.get(channels)
            if task is None:
                raise ValueError(f"{path!r} records no task and takes {channels}-channel conditions (sr or edit); "
                                 "add \"task\" to model_index.json's _codi_jax")
        if TASK_CHANNELS.get(task) != channels:
            raise ValueError(f"{path!r}: task {task!r} with {channels}-channel conditions is not a task sample knows "
                             f"({TASK_CHANNELS})")
    else:
        if not os.path.isdir(os.path.join(path, "unet")):
            raise ValueError(f"{path!r} holds a {mode!r} model, neither a conditional nor a text-to-image one")
        unet, task, channels = _read_json(os.path.join(path, "unet", "config.json"), "UNet (unet/config.json)"), \
            tasks.TEXT_TO_IMAGE, 0
        if "schedule" not in meta and not _meta_from_scheduler(path):
            raise ValueError(f"{path!r} has neither codi_jax metadata nor a scheduler/scheduler_config.json with a "
                             "beta schedule: its noise schedule is unknown")
    multiple = factor * 2 ** (len(unet["block_out_channels"]) - 1)
    sample = unet.get("sample_size") or 64
    size = int(meta.get("image_size") or (sample if isinstance(sample, int) else sample[0]) * factor)
    return ModelSpec(path=path, task=task, channels=channels, size=size, multiple=multiple,
                     sr_scale=int(sr_scale or meta.get("sr_scale") or 4))


def condition_spec(path: str) -> tuple[int, int | None]:
    """(channels, trained size) of the condition images the conditional model at `path` takes, from its metadata
    alone, so that a wrong condition is refused before the weights load (seconds for an SD1.5-size model)."""
    spec = model_spec(path)
    if not tasks.get(spec.task).conditional:
        raise ValueError(f"{spec.path!r} holds a text-to-image model: it takes no condition image")
    return spec.channels, spec.size


to_uint8 = tasks.to_uint8  # [-1, 1] floats -> uint8, as the task table writes images


class Pipeline:
    """A trained conditional model with its VAE, text encoder and tokenizer, ready to sample; or a text-to-image one
    (a 'pretrain' export, e.g. the teacher: evaluation's "ignores the condition" reference, or any diffusers SD
    folder), whose condition images only set the batch and image size."""

    def __init__(self, path: str, *, schedule: dict | None = None, prediction_type: str | None = None):
        from codi_jax import diffusion, modes, weights
        from codi_jax.data import load_tokenizer

        path = export_folder(path)
        self.path = path
        with open(os.path.join(path, "model_index.json")) as f:
            self.meta = json.load(f).get("_codi_jax", {})
        mode = self.meta.get("mode")
        self.conditional = modes.is_conditional(mode)
        if not self.conditional and not os.path.isdir(os.path.join(path, "unet")):
            raise ValueError(f"{path!r} holds a {mode!r} model, neither a conditional nor a text-to-image one")
        if not self.conditional:  # a text-to-image pipeline, ours or any diffusers SD folder
            self.meta = {"mode": mode or "pretrain", "default_sampler": ["ddim", 50], **self.meta}
            self.meta = {**_meta_from_scheduler(path), **self.meta}
            if schedule is not None:
                self.meta["schedule"] = dict(schedule)
            if prediction_type is not None:
                self.meta["prediction_type"] = prediction_type
            missing = [k for k in ("schedule", "prediction_type") if k not in self.meta]
            if missing:
                raise ValueError(f"{path!r}: a text-to-image pipeline without codi_jax metadata needs {missing} "
                                 "(pass schedule= and prediction_type=)")
        if self.conditional:
            self.model, params = weights.load_conditional(path)
        else:
            self.model, params = weights.load_diffusers(path, "unet")
        self.vae, vae_params = weights.load_diffusers(path, "vae")
        self.text_encoder, text_params = weights.load_diffusers(path, "text_encoder")
        self.tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
        self.params = {"model": params, "vae": vae_params, "text": text_params}
        self.schedule = diffusion.make_schedule(**self.meta["schedule"])
        self.scale = float(self.vae.config.scaling_factor)
        self.max_length = int(self.meta.get("max_length") or self.tokenizer.model_max_length)
        self._compiled: dict = {}

    def default_sampler(self) -> tuple[str, int]:
        return tuple(self.meta.get("default_sampler", ("codi", 4)))

    def default_guidance(self) -> float:
        """The classifier-free guidance scale the model was made for (export.default_guidance); 1 for a folder that
        does not record one, e.g. Stable Diffusion's own."""
        return float(self.meta.get("guidance_scale", 1.0))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        factor = self.vae.config.downsample_factor
        return height // factor, width // factor, self.vae.config.latent_channels

    def _fn(self, method: str, steps: int, guidance_scale: float, stochastic: bool = False):
        import jax

        from codi_jax.inference import generate

        key = (method, steps, guidance_scale, stochastic)
        if key not in self._compiled:
            codi_kwargs = {k: self.meta[k] for k in ("distill_steps", "timestep_scaling", "sigma_data")
                           if k in self.meta}
            if stochastic:
                codi_kwargs["stochastic"] = True

            def run(params, cond, ids, null_ids, rng, z_T):
                text = self.text_encoder.apply({"params": params["text"]}, ids)
                text_null = self.text_encoder.apply({"params": params["text"]}, null_ids)
                b, h, w, _ = cond.shape
                if self.conditional:
                    apply = lambda p, z, t, x: self.model.apply({"params": p}, z, t, x["text"], x["cond"])  # noqa
                else:
                    apply = lambda p, z, t, x: self.model.apply({"params": p}, z, t, x["text"])  # noqa: E731
                decode = lambda lat: self.vae.apply({"params": params["vae"]}, lat / self.scale, method="decode")  # noqa
                return generate(apply, params["model"], decode, text=text, text_null=text_null, cond=cond,
                                latent_shape=(b, *self.latent_shape(h, w)), rng=rng,
                                method=method, num_steps=steps, schedule=self.schedule,
                                prediction_type=self.meta["prediction_type"], guidance_scale=guidance_scale,
                                codi_kwargs=codi_kwargs, timestep_spacing=self.meta.get("timestep_spacing", "leading"),
                                z_T=z_T)

            self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    def autoencode(self, images) -> np.ndarray:
        """VAE encode (posterior mode) then decode: float (N, H, W, 3) in [-1, 1] -> uint8; the ceiling of any latent
        model's fidelity."""
        import jax
        import jax.numpy as jnp

        if not hasattr(self, "_autoencode"):
            def run(params, x):
                posterior = self.vae.apply({"params": params}, x, method="encode")
                return jnp.clip(self.vae.apply({"params": params}, posterior.mode(), method="decode"), -1.0, 1.0)

            self._autoencode = jax.jit(run)
        return to_uint8(jax.device_get(self._autoencode(self.params["vae"], jnp.asarray(images, jnp.float32))))

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                                         truncation=True, return_tensors="np")["input_ids"], np.int32)

    def __call__(self, cond_images, prompts: Sequence[str], *, method: str | None = None, steps: int | None = None,
                 seed: int = 0, guidance_scale: float | None = None, latents=None, output_type: str = "uint8",
                 stochastic: bool = False) -> np.ndarray:
        """cond_images: float (N, H, W, C) in [-1, 1] as the task builds them. Returns uint8 (N, H, W, 3), or with
        output_type='float' float32 in [0, 1] (diffusers' output_type='np').

        guidance_scale: classifier-free guidance (1: none); default: the model's own (default_guidance()).
        latents: the initial noise (N, h, w, latent channels), e.g. to reproduce a diffusers run (transpose its NCHW
        latents); default: drawn from `seed`. stochastic: codi sampling re-noises with fresh noise between steps (CM
        multistep, as diffusers' LCMScheduler) instead of the model's own noise estimate."""
        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
        default_method, default_steps = self.default_sampler()
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        method, steps = method or default_method, int(default_steps if steps is None else steps)
        guidance_scale = self.default_guidance() if guidance_scale is None else float(guidance_scale)
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        cond = np.asarray(cond_images, np.float32)
        if self.conditional and (cond.ndim != 4 or cond.shape[-1] != self.model.config.control.conditioning_channels):
            raise ValueError(f"condition images must be (N, H, W, {self.model.config.control.conditioning_channels}), "
                             f"got {cond.shape}")
        if len(prompts) != cond.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {cond.shape[0]} condition images")
        import jax

        ids = self.tokenize(prompts)
        null = self.tokenize([""])
        mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
        n = cond.shape[0]
        pad = (-n) % len(jax.local_devices())
        if pad:
            cond = np.concatenate([cond, np.repeat(cond[-1:], pad, 0)])
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        latent_shape = (cond.shape[0], *self.latent_shape(cond.shape[1], cond.shape[2]))
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n,) + latent_shape[1:]:
                raise ValueError(f"latents must be (N, h, w, C) = {(n,) + latent_shape[1:]}, got {latents.shape}")
            if pad:
                latents = np.concatenate([latents, np.repeat(latents[-1:], pad, 0)])
            latents = jax.device_put(latents, sharding)
        out = self._fn(method, steps, guidance_scale, stochastic)(
            self.params, jax.device_put(cond, sharding), jax.device_put(ids, sharding), null,
            jax.random.PRNGKey(seed), latents)
        out = np.asarray(jax.device_get(out), np.float32)[:n]
        if output_type == "float":
            return (out + 1.0) / 2.0
        return to_uint8(out)


# ---- the user's inputs -> conditions, as training builds them ----------------------------------------------------

@dataclasses.dataclass
class Job:
    """One input of a run: the condition at the size it is generated at, and the part of the output to keep."""
    name: str  # output file stem (the input's, or the prompt's for text-to-image)
    prompt: str
    cond: np.ndarray | None  # (H, W, C) in [-1, 1]; H, W multiples of ModelSpec.multiple. None: text-to-image
    box: tuple[int, int, int, int]  # (top, left, height, width) of the output that shows the input
    note: str  # what was done to the input, for the summary line


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0] or "image"


def _slug(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40] or "image"


def build_jobs(spec: ModelSpec, images: Sequence[str], prompts: Sequence[str], *, masks: Sequence[str] = (),
               fit_how: str | None = None, depth_kind: str = "disparity", convert: bool = False) -> list[Job]:
    """The run's inputs -> Jobs: each condition built by the task's builder (the task table's, the one training uses),
    from the user's file fitted to the model's size (sr: at sr_scale x its own size unless fit_how is given). Every
    problem is a ValueError naming the file and the flag, raised before any model loads."""
    task = tasks.get(spec.task)
    if not task.conditional:
        return [Job(_slug(p), p, None, (0, 0, spec.size, spec.size), "") for p in prompts]
    if len(masks) not in (0, 1, len(images)):
        raise ValueError(f"{len(masks)} --mask files for {len(images)} --image files: give one, or one per image")
    jobs = []
    for i, path in enumerate(images):
        prompt = prompts[0] if len(prompts) == 1 else prompts[i]
        item = tasks.SampleInput(path=path, size=spec.size, multiple=spec.multiple, sr_scale=spec.sr_scale,
                                 fit_how=fit_how, mask=masks[i if len(masks) > 1 else 0] if masks else None,
                                 depth_kind=depth_kind, convert=convert)
        cond, box, note = task.sample_condition(item)
        jobs.append(Job(_stem(path), prompt, np.asarray(cond, np.float32), box, f"{os.path.basename(path)} {note}"))
    return jobs


# ---- the command line --------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """A mistake is one line: argparse's usage block before it would bury the line that names the problem."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the arguments)\n")


def _epilog() -> str:
    lines = ["inputs by task (the export's model_index.json says which task it was trained for):"]
    for name, task in sorted(tasks.TABLE.items(), key=lambda kv: kv[1].conditional):
        label = "text-to-image" if not task.conditional else name
        for j, line in enumerate(task.sample_help.splitlines()):
            lines.append(f"  {label if j == 0 else '':<14} {line}")
    lines += ["Each output is <out-dir>/<input or prompt>_s<seed>.png, its noise drawn from <seed> alone (the same file "
              "whatever", "the batch); existing files are never overwritten unless --overwrite."]
    return "\n".join(lines)


def _parser() -> _Parser:
    parser = _Parser(prog="python -m codi_jax.sample", description=__doc__.split("\n\n")[0], epilog=_epilog(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="workdir of a finished run, its export/ folder, or any "
                        "diffusers Stable Diffusion folder")
    parser.add_argument("--image", "--cond", dest="image", nargs="+", default=[], metavar="FILE",
                        help="input image(s): depth map, low-res image, photo to inpaint, image to edit")
    parser.add_argument("--mask", nargs="+", default=[], metavar="FILE",
                        help="inpaint: mask(s), white = fill (one, or one per --image)")
    parser.add_argument("--prompt", required=True, nargs="+",
                        help="one prompt, or one per --image (text-to-image: one image set per prompt)")
    parser.add_argument("--num-images", type=_positive_int, default=1, help="images per input, seeds seed, seed+1, ...")
    parser.add_argument("--out-dir", default=None, help="folder for the images, one PNG each (created if missing)")
    parser.add_argument("--out", default=None, help="also (or only) write all the images side by side in one file")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    parser.add_argument("--fit", choices=FITS, default=None,
                        help="an input of another size or aspect: crop (default: centre square, as training reads "
                             "images), pad (whole input, output cropped back to its aspect) or resize (squash)")
    parser.add_argument("--depth-kind", choices=("disparity", "depth"), default=None,
                        help="depth: disparity (default, near = bright, as prepare_depth writes) or depth (metric, "
                             "larger = farther)")
    parser.add_argument("--convert", action="store_true",
                        help="depth: take the luminance of a colour or transparent file")
    parser.add_argument("--sr-scale", type=_positive_int, default=None,
                        help="sr: the model's scale (default: the export's record, else 4)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--method", default=None, choices=METHODS, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's own, 1 unless distilled with it)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per model call")
    return parser


def _task_flags(args) -> dict[str, tuple[str, object]]:
    """flag -> (the task it is for, its value) for every task-only flag of the task table."""
    values = {"--mask": args.mask, "--depth-kind": args.depth_kind, "--convert": args.convert,
              "--sr-scale": args.sr_scale}
    return {flag: (name, values[flag]) for name, t in tasks.TABLE.items() for flag in t.sample_flags}


def _check_flags(parser: _Parser, args, spec: ModelSpec) -> None:
    """What the task makes of the flags, before any file is read."""
    task = tasks.get(spec.task)
    if not task.conditional:
        given = [("--image", args.image), ("--fit", args.fit)] + [(f, v) for f, (_, v) in _task_flags(args).items()]
        for flag, value in given:
            if value:
                parser.error(f"{flag}: {spec.path!r} holds a text-to-image model, which takes no input image; "
                             "drop it, or pass a conditional model")
        return
    if not args.image:
        parser.error(f"--image is required: {spec.path!r} is a {spec.task} model ({task.sample_input})")
    if len(args.prompt) not in (1, len(args.image)):
        parser.error(f"{len(args.prompt)} prompts for {len(args.image)} --image files: give one, or one per image")
    for flag, (owner, value) in _task_flags(args).items():
        if value and flag not in task.sample_flags:
            parser.error(f"{flag} is for {owner} models; {spec.path!r} is a {spec.task} model")


def _plan(jobs: list[Job], seeds: range, out_dir: str | None) -> list[tuple[Job, int, str | None]]:
    """(job, seed, output path) per image; names made unique within the run."""
    items, used = [], set()
    for job in jobs:
        stem = job.name
        for k in range(2, len(jobs) + 2):
            if stem not in used:
                break
            stem = f"{job.name}-{k}"
        used.add(stem)
        items += [(job, s, os.path.join(out_dir, f"{stem}_s{s}.png") if out_dir else None) for s in seeds]
    return items


def _save(image: np.ndarray, path: str) -> None:
    """Written whole or not at all: a temporary file beside it, renamed into place."""
    fmt = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        Image.fromarray(image).save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _generate(pipe: Pipeline, items, args) -> list[np.ndarray]:
    """Every item's image, cropped to its box: items of one condition shape share a batch (one compile), the last
    batch padded to the others' size; each image's noise comes from its own seed."""
    import jax

    outputs: list[np.ndarray | None] = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    for i, (job, _, _) in enumerate(items):
        shape = job.cond.shape if job.cond is not None else (job.box[2], job.box[3], 3)
        groups.setdefault(shape, []).append(i)
    for shape, index in groups.items():
        batch = min(args.batch_size, len(index))
        latent_shape = pipe.latent_shape(shape[0], shape[1])
        for start in range(0, len(index), batch):
            chunk = index[start:start + batch]
            chunk = chunk + [chunk[-1]] * (batch - len(chunk))
            cond = np.stack([items[i][0].cond if items[i][0].cond is not None else np.zeros(shape, np.float32)
                             for i in chunk])
            latents = np.stack([np.asarray(jax.random.normal(jax.random.PRNGKey(items[i][1]), latent_shape))
                                for i in chunk])
            images = pipe(cond, [items[i][0].prompt for i in chunk], method=args.method, steps=args.steps,
                          guidance_scale=args.guidance, latents=latents)
            for i, image in zip(chunk, images):
                top, left, h, w = items[i][0].box
                outputs[i] = image[top:top + h, left:left + w]
    return outputs


def _grid(images: list[np.ndarray]) -> np.ndarray:
    height = max(im.shape[0] for im in images)
    return np.concatenate([np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0))) for im in images], axis=1)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Everything that can be wrong with the request is checked before the model loads and compiles, so that the
    # mistake costs seconds, not a sampling run that then cannot save its images.
    if not args.out_dir and not args.out:
        parser.error("say where the images go: --out-dir=DIR (one PNG per image) and/or --out=FILE (all side by side)")
    if args.out:
        out_parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_parent):
            parser.error(f"--out={args.out}: the folder {out_parent!r} does not exist")
        if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
            parser.error(f"--out={args.out}: not an image file name (e.g. out.png)")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"--out-dir={args.out_dir} is a file, not a folder")
    try:
        spec = model_spec(args.model, args.sr_scale)
        _check_flags(parser, args, spec)
        jobs = build_jobs(spec, args.image, args.prompt, masks=args.mask, fit_how=args.fit,
                          depth_kind=args.depth_kind or "disparity", convert=args.convert)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    items = _plan(jobs, range(args.seed, args.seed + args.num_images), args.out_dir)
    targets = [p for _, _, p in items if p] + ([args.out] if args.out else [])
    existing = [p for p in targets if os.path.exists(p)]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 1} more output file(s) already exist" if len(existing) > 1 else " already exists"
        parser.exit(2, f"error: {existing[0]!r}{more}: nothing is overwritten unless --overwrite; or pass another "
                    "--out-dir/--out or --seed\n")
    try:
        pipe = Pipeline(args.model)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    images = _generate(pipe, items, args)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        for (_, _, path), image in zip(items, images):
            _save(image, path)
    if args.out:
        _save(_grid(images), args.out)
    method, steps = args.method or pipe.default_sampler()[0], args.steps or pipe.default_sampler()[1]
    guidance = pipe.default_guidance() if args.guidance is None else args.guidance
    where = [f"{args.out_dir}/ ({os.path.basename(items[0][2])}{', ...' if len(items) > 1 else ''})"] \
        if args.out_dir else []
    where += [f"{args.out} (side by side)"] if args.out else []
    notes = "; ".join(job.note for job in jobs if job.note)
    print(f"wrote {len(images)} image(s) to {' and '.join(where)}: {spec.task}, {method} sampler, {steps} "
          f"step{'s' if steps > 1 else ''}, guidance {guidance:g}" + (f"; inputs: {notes}" if notes else ""))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
