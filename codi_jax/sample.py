"""Inference: condition images + prompts -> images in 1-4 steps, from an export folder or a run's workdir.

    python -m codi_jax.sample --model=runs/depth-tiny --cond=depth.png --prompt="a red sphere left of a blue box" \\
        --steps=4 --out=out.png

Python:
    pipe = Pipeline.load("runs/depth-tiny")            # <workdir>/export or the export folder itself
    images = pipe(cond_images, prompts, steps=4)       # uint8 (N, H, W, 3)

One jitted function per (method, steps, batch shape); the batch is split over all local devices ('data' axis).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from codi_jax import diffusion, modes, weights
from codi_jax.data import load_tokenizer
from codi_jax.inference import generate, sample_latents  # noqa: F401 - sample_latents: part of this module's API


def _meta_from_scheduler(path: str) -> dict:
    """schedule and prediction_type from a diffusers pipeline's scheduler/scheduler_config.json (any SD folder)."""
    config_file = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config_file):
        return {}
    with open(config_file) as f:
        c = json.load(f)
    kinds = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    if c.get("beta_schedule", "scaled_linear") not in kinds or c.get("trained_betas"):
        return {}
    return {"schedule": {"kind": kinds[c.get("beta_schedule", "scaled_linear")],
                         "beta_start": float(c.get("beta_start", 0.00085)),
                         "beta_end": float(c.get("beta_end", 0.012)),
                         "num_train_timesteps": int(c.get("num_train_timesteps", 1000))},
            "prediction_type": c.get("prediction_type", "epsilon")}


def export_folder(path: str) -> str:
    """A run's <workdir>/export, or `path` itself when it is an export (or any diffusers pipeline folder)."""
    if os.path.isdir(os.path.join(path, "export")):
        path = os.path.join(path, "export")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path!r} is not a codi_jax export (no model_index.json); pass a workdir whose "
                                "training finished, or its export/ folder")
    return path


def condition_spec(path: str) -> tuple[int, int | None]:
    """(channels, trained size or None) of the condition images the model at `path` takes, from its metadata alone,
    so that a wrong condition is refused before the weights load (seconds for an SD1.5-size model)."""
    path = export_folder(path)
    with open(os.path.join(path, "model_index.json")) as f:
        meta = json.load(f).get("_codi_jax", {})
    if not modes.is_conditional(meta.get("mode")):
        raise ValueError(f"{path!r} holds a text-to-image model ({meta.get('mode') or 'no codi_jax mode'}): it takes "
                         "no condition image")
    config_file = os.path.join(path, "conditional", "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} holds no exported conditional model (conditional/config.json is missing)")
    with open(config_file) as f:
        control = weights.conditional_config_from_json(json.load(f)).control
    return int(control.conditioning_channels), int(meta.get("image_size", 0)) or None


def to_uint8(images) -> np.ndarray:
    return np.asarray(((np.asarray(images, np.float32) + 1.0) * 127.5).round().clip(0, 255), np.uint8)


class Pipeline:
    """A trained conditional model with its VAE, text encoder and tokenizer, ready to sample; or a text-to-image one
    (a 'pretrain' export, e.g. the teacher: evaluation's "ignores the condition" reference), whose condition images
    only set the batch and image size."""

    def __init__(self, path: str, *, schedule: dict | None = None, prediction_type: str | None = None):
        path = export_folder(path)
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

    @classmethod
    def load(cls, path: str, **kw) -> "Pipeline":
        return cls(path, **kw)

    def default_sampler(self) -> tuple[str, int]:
        return tuple(self.meta.get("default_sampler", ("codi", 4)))

    def default_guidance(self) -> float:
        """The classifier-free guidance scale the model was made for (export.default_guidance); 1 for a folder that
        does not record one, e.g. Stable Diffusion's own."""
        return float(self.meta.get("guidance_scale", 1.0))

    def _fn(self, method: str, steps: int, guidance_scale: float, stochastic: bool = False):
        key = (method, steps, guidance_scale, stochastic)
        if key not in self._compiled:
            codi_kwargs = {k: self.meta[k] for k in ("distill_steps", "timestep_scaling", "sigma_data")
                           if k in self.meta}
            if stochastic:
                codi_kwargs["stochastic"] = True
            factor = self.vae.config.downsample_factor

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
                                latent_shape=(b, h // factor, w // factor, self.vae.config.latent_channels), rng=rng,
                                method=method, num_steps=steps, schedule=self.schedule,
                                prediction_type=self.meta["prediction_type"], guidance_scale=guidance_scale,
                                codi_kwargs=codi_kwargs, timestep_spacing=self.meta.get("timestep_spacing", "leading"),
                                z_T=z_T)

            self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    def autoencode(self, images) -> np.ndarray:
        """VAE encode (posterior mode) then decode: float (N, H, W, 3) in [-1, 1] -> uint8; the ceiling of any latent
        model's fidelity."""
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
        ids = self.tokenize(prompts)
        null = self.tokenize([""])
        mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
        n = cond.shape[0]
        pad = (-n) % len(jax.local_devices())
        if pad:
            cond = np.concatenate([cond, np.repeat(cond[-1:], pad, 0)])
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        factor = self.vae.config.downsample_factor
        latent_shape = (cond.shape[0], cond.shape[1] // factor, cond.shape[2] // factor,
                        self.vae.config.latent_channels)
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


# Image modes a condition of N channels may come in as it is; anything else is converted only when asked.
_CONDITION_MODES = {1: ("L", "I;16", "I;16B", "I"), 3: ("RGB",), 4: ("RGBA",)}


def load_condition(path: str, size: int | None, channels: int, *, convert: bool = False,
                   resize: bool = False) -> np.ndarray:
    """A condition image file -> float32 (H, W, channels) in [-1, 1], as the task builds it (depth: one grey channel,
    near = bright; inpaint: RGBA, the alpha the hole mask). A mode or size the model was not trained on is an error
    naming what the file is and what the model takes, unless convert / resize ask for the conversion."""
    try:
        image = Image.open(path)
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files.
        raise ValueError(f"cannot read condition image {path!r}: {e}") from e
    accepted = _CONDITION_MODES[channels]
    wrong_mode, wrong_size = image.mode not in accepted, bool(size) and image.size != (size, size)
    # Both mismatches in the one line, so that a user fixes the file (or picks the flags) once.
    needed = [flag for flag, wrong, asked in (("--convert", wrong_mode, convert), ("--resize", wrong_size, resize))
              if wrong and not asked]
    if needed:
        wanted = f"{size}x{size}, " if size else ""
        raise ValueError(
            f"condition image {path!r} is {image.size[0]}x{image.size[1]}, {image.mode} ({len(image.getbands())} "
            f"channel(s)); the model takes {wanted}{channels} channel(s) ({' or '.join(accepted)}): prepare it so, or "
            f"pass {' '.join(needed)}")
    if wrong_mode:
        image = image.convert(accepted[0])
    if wrong_size:
        image = image.resize((size, size), Image.BICUBIC)
    x = np.asarray(image, np.float32)
    x = x / (65535.0 if image.mode.startswith("I") else 255.0) * 2.0 - 1.0
    return x[..., None] if x.ndim == 2 else x


class _Parser(argparse.ArgumentParser):
    """A mistake is one line: argparse's usage block before it would bury the line that names the problem."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the arguments)\n")


def main(argv=None) -> int:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="workdir of a finished run, or its export/ folder")
    parser.add_argument("--cond", required=True, nargs="+", help="condition image(s) (depth map, low-res image, ...)")
    parser.add_argument("--prompt", required=True, nargs="+", help="one prompt, or one per condition image")
    parser.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--method", default=None, choices=diffusion.METHODS, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's own, 1 unless distilled with it)")
    parser.add_argument("--out", required=True, help="output PNG (several images are written side by side)")
    parser.add_argument("--resize", action="store_true", help="resize condition images to the model's trained size")
    parser.add_argument("--convert", action="store_true",
                        help="convert condition images to the model's channels (e.g. RGB to grey for depth)")
    args = parser.parse_args(argv)
    # Everything that can be wrong with the request is checked before the model loads and compiles, so that the
    # mistake costs seconds, not a sampling run that then cannot save its image.
    if len(args.prompt) not in (1, len(args.cond)):
        parser.error(f"{len(args.prompt)} prompts for {len(args.cond)} condition images: give one, or one per image")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.error(f"--out={args.out}: the folder {out_dir!r} does not exist")
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        parser.error(f"--out={args.out}: not an image file name (e.g. out.png)")
    try:
        channels, size = condition_spec(args.model)
        cond = np.stack([load_condition(p, size, channels, convert=args.convert, resize=args.resize)
                         for p in args.cond])
        pipe = Pipeline.load(args.model)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    prompts = args.prompt * len(args.cond) if len(args.prompt) == 1 else args.prompt
    images = pipe(cond, prompts, method=args.method, steps=args.steps, seed=args.seed, guidance_scale=args.guidance)
    Image.fromarray(np.concatenate(list(images), axis=1)).save(args.out)
    print(f"wrote {args.out} ({len(images)} images)")
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
