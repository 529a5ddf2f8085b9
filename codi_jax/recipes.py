"""Recipes, one per model family: what trains, what stays frozen, how the networks are called, and what is exported.

`make(config, workdir)` returns the recipe of config.mode's family (the mode table, modes.py):
- `VAERecipe`: the KL autoencoder of the latent space (trained, then given its latent scale);
- `TextToImageRecipe`: a text-to-image UNet (the teacher), with the VAE and text encoder frozen;
- `ConditionalRecipe`: the UNet adapted to a condition (CoDi, PE-CoDi, fine-tuning, CM-II, GD-II), with its frozen
  teacher when the mode has one.
Each answers the same protocol (`Recipe`), which is all train.py, export.py and the benchmarks use:
- `init_fn(rng)` / `abstract_params`: the trainable tree (boxed, for shardings); `initial_params`: its host values when
  imported from a teacher or an earlier stage;
- `frozen_host` / `frozen_abstract`: the frozen parts (VAE, text encoder, a teacher, PE-CoDi's UNet), one dict that
  never enters the optimizer; `placed_frozen` completes them on the mesh with what exists only as a checkpoint;
- `loss(params, ema_params, frozen, batch, rng)` and `sample(params, frozen, batch, rng, ...)`, pure and jittable;
- `after_training(params, data_iter)`: what the finished model needs before export;
- `save_components(path, ema, frozen_host, meta)`: the family's diffusers components of the export.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from codi_jax import checkpoint, diffusion, export, inference, modes, weights
from codi_jax import config as config_lib
from codi_jax import teacher as teacher_lib
from codi_jax import data as data_lib
from codi_jax.diffusion import objectives
from codi_jax.models import clip as clip_lib
from codi_jax.models import conditional as cond_lib
from codi_jax.models import controlnet as cn_lib
from codi_jax.models import unet as unet_lib
from codi_jax.models import vae as vae_lib
from codi_jax.models import with_compute


PRETRAINED_DIR = teacher_lib.PRETRAINED_DIR


def resolve(path: str, workdir: str) -> str:
    """'@stage' names the export of an earlier stage of this run: <workdir>/<stage>/export; 'builtin:NAME' a pipeline
    shipped in the package (codi_jax/pretrained/NAME)."""
    return teacher_lib.folder(path, workdir)


def controlnet_source(path: str, task: str) -> tuple[str, dict]:
    """config.init_controlnet -> (the ControlNet folder, its diffusers config.json): every check that needs only the
    folder. It exists (never created), holds a diffusers ControlNetModel (or is a pipeline with controlnet/) in a form
    we implement, with safetensors weights, whose conditioning_channels are the task's. Reads no weights; each problem
    is one ValueError / FileNotFoundError line that starts with 'config.init_controlnet' and names the path."""

    where = f"config.init_controlnet={path!r}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: no such folder (a diffusers ControlNet folder, or a pipeline with "
                                "controlnet/)")
    try:
        folder, d = weights.read_config(path, "controlnet")
        weights.safetensors_files(folder)
        cn = cn_lib.ControlNetConfig.from_diffusers(d)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
    want = data_lib.cond_channels(task)
    if cn.conditioning_channels != want:
        raise ValueError(f"{where}: the ControlNet takes {cn.conditioning_channels}-channel conditions "
                         f"(conditioning_channels), task {task!r} has {want}")
    return folder, d


def _check_controlnet_fits(path: str, d: dict, teacher: str, vae_from: str, image_size: int) -> None:
    """The ControlNet's encoder mirrors the teacher UNet and its hint net fits the VAE's latent scale (config.json
    files only, read before any weights)."""

    where = f"config.init_controlnet={path!r}"
    if not teacher:
        raise ValueError(f"{where}: needs config.teacher, the pretrained UNet the ControlNet was made for")
    cn = cn_lib.ControlNetConfig.from_diffusers(d)
    unet = unet_lib.UNetConfig.from_diffusers(weights.read_config(teacher, "unet")[1])
    try:
        cond_lib.ConditionalConfig(unet=unet, control=cn, mode="controlnet")
    except ValueError as e:
        raise ValueError(f"{where} does not fit the teacher UNet {teacher!r}: {e}") from None
    vae = vae_lib.from_diffusers_config(weights.read_config(vae_from, "vae")[1]).config
    latent_factor = 2 ** (len(vae.block_out_channels) - 1)
    if cn.hint_factor != latent_factor:
        raise ValueError(f"{where}: its hint net (conditioning_embedding_out_channels="
                         f"{cn.conditioning_embedding_out_channels}) downsamples the condition {cn.hint_factor}x, "
                         f"but the images ({image_size}) are {latent_factor}x the VAE's latents")


# config.model.preset -> the preset name of each component family.
_PRESETS = {
    "sd15": {"vae": "sd", "text": "sd15", "unet": "sd15"},
    "sd21": {"vae": "sd", "text": "sd21", "unet": "sd21"},
    "tiny": {"vae": "tiny", "text": "tiny", "unet": "tiny"},
}


def _preset(component: str, name: str) -> str:
    if name not in _PRESETS:
        raise ValueError(f"config.model.preset={name!r} is not one of {sorted(_PRESETS)}")
    return _PRESETS[name][component]


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _import_controlnet(folder: str, abstract) -> dict:
    """The ControlNet's weights (all of them: encoder, hint net, zero convs) as host arrays in the tree of `abstract`,
    the conditional model's 'control' params."""

    _, params = weights.load_diffusers(folder, "controlnet")
    params = _to_numpy(params)
    want = nn.meta.unbox(abstract)
    if jax.tree.structure(params) != jax.tree.structure(want) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want))):
        raise ValueError(f"config.init_controlnet={folder!r}: its weights do not form the conditional encoder's tree")
    logging.info("conditional encoder (encoder, hint net, zero convs) from the ControlNet %s", folder)
    return params


class Recipe:
    """The protocol every family answers, and what all families share: the config, the mode's row, the noise
    schedule and the VAE (trained by VAERecipe, frozen by the others)."""

    def __init__(self, config, workdir: str, *, abstract: bool = False):
        """abstract=True reads no weights and materialises nothing (presets only): for ahead-of-time compiles of
        large models, e.g. the TPU pod plan in benchmarks/aot_tpu.py."""

        # The teacher's settings (image size, tokenizer, schedule...), for every caller alike.
        config_lib.resolve_for_plan(config) if abstract else config_lib.resolve(config)
        self.config = config
        self.mode = config.mode
        self.spec = modes.get(config.mode)
        self.abstract = abstract
        self.dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
        self.schedule = diffusion.make_schedule(**config.schedule.to_dict())
        self.image_size = int(config.data.image_size)
        self.frozen_host: dict[str, Any] = {}
        self.frozen_abstract: dict[str, Any] = {}
        self.initial_params = None  # host values of the trainable tree when imported
        self.teacher_kind = None  # 'unet' (pretrained text-to-image) | 'conditional' (fine-tuned, cm/gd) | None
        self.freeze_unet = False
        self._paths(workdir)
        if self.vae_from:
            vae, self.vae_params = weights.load_diffusers(self.vae_from, "vae")
            logging.info("VAE from %s", self.vae_from)
        else:
            vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.preset(_preset("vae", config.model.preset)))
            self.vae_params = None
        self.vae = with_compute(vae, self.dtype, False)
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.latent_size = self.image_size // (2 ** (len(self.vae.config.block_out_channels) - 1))
        self.latent_channels = int(self.vae.config.latent_channels)
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        self.vae_init = lambda r: self.vae.init(r, images, r)["params"]  # encoder and decoder
        self.vae_abstract = jax.eval_shape(self.vae_init, jax.random.key(0))

    def _paths(self, workdir: str) -> None:
        c = self.config
        self.teacher = resolve(c.teacher, workdir)
        self.vae_from = resolve(c.vae_from, workdir) or self.teacher
        self.text_from = resolve(c.text_encoder_from, workdir) or self.teacher
        if self.abstract:
            self.vae_from = self.text_from = self.teacher = ""

    # --- the protocol -----------------------------------------------------------------------------------------------
    model: nn.Module  # the trained network
    abstract_params: Any  # the trainable tree's abstract value (boxed)
    init_fn: Any  # rng -> the trainable tree, boxed

    def loss(self, params, ema_params, frozen, batch, rng):
        raise NotImplementedError

    def sample(self, params, frozen, batch, rng, *, method: str, num_steps: int, guidance_scale: float = 1.0):
        """Images in [-1, 1] for a batch (VAE reconstructions; generations of the diffusion families)."""
        raise NotImplementedError

    def placed_frozen(self, frozen: dict, abstract_params) -> dict:
        """The frozen parts on the mesh, completed with what exists only as a checkpoint (none by default)."""
        return frozen

    def after_training(self, params, data_iter, batches: int = 8) -> None:
        """What the finished model needs before export (nothing by default)."""

    def save_components(self, path: str, ema, frozen_host: dict, meta: dict) -> tuple[dict, str]:
        """Writes the family's diffusers components under path; returns (model_index entries, pipeline class) and
        adds what the export's metadata needs to `meta`."""
        raise NotImplementedError

    def default_sampler(self) -> tuple[str, int]:
        return self.spec.default_sampler(self.config.objective)


def _chroma(images: jax.Array) -> jax.Array:
    """Each pixel's colour less its grey level: hue and saturation, without brightness."""
    return images - jnp.mean(images, axis=-1, keepdims=True)


# The parts of the VAE that make its latents; 'decoder' fine-tuning leaves them as they are.
VAE_ENCODER_PARTS = ("encoder", "quant_conv")


class VAERecipe(Recipe):
    """The autoencoder: trained on reconstructions, then given SD's latent scale."""

    def __init__(self, config, workdir: str, *, abstract: bool = False):
        super().__init__(config, workdir, abstract=abstract)
        self.model = self.vae
        self.abstract_params = self.vae_abstract
        self.init_fn = self.vae_init
        self.initial_params = self.vae_params

    def loss(self, params, ema_params, frozen, batch, rng):
        images = batch["image"]
        recon, posterior = self.vae.apply({"params": params}, images, rng, sample_posterior=True)
        recon = recon.astype(jnp.float32)
        l1 = jnp.mean(jnp.abs(recon - images))
        l2 = jnp.mean(jnp.square(recon - images))
        chroma = jnp.mean(jnp.abs(_chroma(recon) - _chroma(images)))
        kl = jnp.mean(posterior.kl())
        w = self.config.vae
        loss = w.l1_weight * l1 + w.l2_weight * l2 + w.chroma_weight * chroma + w.kl_weight * kl
        return loss, {"loss": loss, "l1": l1, "l2": l2, "chroma": chroma, "kl": kl}

    def sample(self, params, frozen, batch, rng, *, method: str, num_steps: int, guidance_scale: float = 1.0):
        posterior = self.vae.apply({"params": params}, batch["image"], method="encode")
        return self.vae.apply({"params": params}, posterior.mode(), method="decode")

    def after_training(self, params, data_iter, batches: int = 8) -> None:
        """SD's latent scale: scaling_factor = 1 / std of the latents over `batches` training batches, so the
        diffusion model sees unit-variance data. A decoder-only fine-tune keeps its source's latents and their scale."""
        if self.config.vae.train == "decoder":
            logging.info("VAE latent scaling factor kept from %s: %.5f (encoder frozen)", self.vae_from, self.vae_scale)
            return
        encode = jax.jit(lambda p, x, r: self.vae.apply({"params": p}, x, method="encode").sample(r))
        params = jax.device_get(params)
        latents = [np.asarray(encode(params, next(data_iter)["image"], jax.random.PRNGKey(i))) for i in range(batches)]
        scale = float(1.0 / np.std(np.concatenate(latents)))
        self.vae = type(self.vae)(dataclasses.replace(self.vae.config, scaling_factor=scale))
        self.model = self.vae
        self.vae_scale = scale
        logging.info("VAE latent scaling factor: %.5f (1 / std over %d batches)", scale, batches)

    def save_components(self, path: str, ema, frozen_host: dict, meta: dict) -> tuple[dict, str]:

        meta["timestep_spacing"] = "leading"
        weights.save_diffusers(os.path.join(path, "vae"), "vae", export.float32(self.vae), ema)
        # A VAE alone is no pipeline: the index names the class diffusers loads from vae/ (the model card says how).
        return {"vae": ["diffusers", "AutoencoderKL"]}, "AutoencoderKL"


class TextToImageRecipe(Recipe):
    """A text-to-image UNet trained with a diffusion objective; the VAE and the text encoder are frozen."""

    def __init__(self, config, workdir: str, *, abstract: bool = False):
        super().__init__(config, workdir, abstract=abstract)
        if self.vae_params is None and not abstract:
            raise ValueError(
                f"mode {self.mode!r} needs a trained VAE: set config.teacher or config.vae_from (a diffusers vae folder)"
            )
        if self.vae_params is not None:
            self.frozen_host["vae"] = self.vae_params
        self.frozen_abstract["vae"] = self.vae_abstract
        self._text_encoder()
        unet_params = self._unet()
        self.objective = objectives.OBJECTIVES[self.spec.objective]
        self._denoiser(unet_params)

    def _text_encoder(self) -> None:
        """The frozen text encoder and the null prompt's token ids (for classifier-free guidance)."""

        config = self.config
        tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
        if self.text_from:
            text, text_params = weights.load_diffusers(self.text_from, "text_encoder")
            logging.info("text encoder from %s", self.text_from)
        else:
            # The tiny preset takes its vocabulary from the tokenizer in use (the builtin scenes one by default).
            vocab = {} if config.model.preset != "tiny" else dict(
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                max_position_embeddings=max(77, int(config.data.max_length)))
            text = clip_lib.CLIPTextEncoder(clip_lib.CLIPTextConfig.preset(_preset("text", config.model.preset),
                                                                           **vocab))
            text_params = None
        self.text_encoder = with_compute(text, self.dtype, False)
        ids = jnp.zeros((1, int(config.data.max_length)), jnp.int32)
        self.frozen_abstract["text_encoder"] = jax.eval_shape(self.text_encoder.init, jax.random.key(0), ids)["params"]
        if text_params is None and not self.abstract:
            # A teacher trained here from scratch conditions on a fixed random text encoder: its features are an
            # injective function of the caption, which is all the UNet needs; it is exported with the teacher.
            text_params = _to_numpy(nn.meta.unbox(jax.jit(self.text_encoder.init)(  # jit: op by op took ~20 s on CPU
                jax.random.key(config.seed + 17), ids)["params"]))
            logging.info("text encoder: fixed random initialisation (no pretrained one given)")
        if text_params is not None:
            self.frozen_host["text_encoder"] = text_params
        null = tokenizer([""], padding="max_length", max_length=int(config.data.max_length), truncation=True,
                         return_tensors="np")["input_ids"]
        self.frozen_host["null_ids"] = np.asarray(null, np.int32)
        self.frozen_abstract["null_ids"] = jax.ShapeDtypeStruct(null.shape, jnp.int32)
        self.tokenizer = tokenizer

    def _unet(self):
        """The UNet (pretrained from config.teacher, or a preset); returns its host weights or None."""

        config = self.config
        if self.teacher:
            unet, unet_params = weights.load_diffusers(self.teacher, "unet")
            logging.info("teacher UNet from %s", self.teacher)
        else:
            unet_cfg = unet_lib.UNetConfig.preset(_preset("unet", config.model.preset),
                                                  cross_attention_dim=int(self.text_encoder.config.hidden_size))
            unet, unet_params = unet_lib.UNet2DConditionModel(unet_cfg), None
        self.unet = with_compute(unet, self.dtype, config.remat)
        self._z = jnp.zeros((1, self.latent_size, self.latent_size, self.latent_channels), jnp.float32)
        self._t = jnp.zeros((1,), jnp.int32)
        self._ctx = jnp.zeros((1, int(config.data.max_length), self.unet.config.cross_attention_dim), jnp.float32)
        return unet_params

    def _denoiser(self, unet_params) -> None:
        """The trained network: here the UNet itself."""
        z, t, ctx = self._z, self._t, self._ctx
        self.model = self.unet
        self.abstract_params = jax.eval_shape(self.unet.init, jax.random.key(0), z, t, ctx)["params"]
        self.init_fn = lambda rng: self.unet.init(rng, z, t, ctx)["params"]
        self.initial_params = unet_params

    def _apply(self, params, frozen, z, t, batch):
        return self.unet.apply({"params": params}, z, t, batch["text"])

    def _teacher(self, frozen):
        return None

    def encode(self, frozen, batch, rng):
        """Pixels and token ids -> what the objectives see: latents (x), text, text_null, cond."""
        posterior = self.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
        latents = posterior.sample(rng) * self.vae_scale
        text = self.text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"])
        text_null = self.text_encoder.apply({"params": frozen["text_encoder"]}, frozen["null_ids"])
        out = {"latents": latents.astype(jnp.float32), "text": text.astype(jnp.float32),
               "text_null": text_null.astype(jnp.float32)}
        if "cond" in batch:
            out["cond"] = batch["cond"]
        return jax.lax.stop_gradient(out)

    def networks(self, frozen):
        decode = lambda lat: self.vae.apply({"params": frozen["vae"]}, lat / self.vae_scale, method="decode")  # noqa
        return objectives.Networks(
            apply=lambda p, z, t, b: self._apply(p, frozen, z, t, b), teacher=self._teacher(frozen), decode=decode
        )

    def loss(self, params, ema_params, frozen, batch, rng):
        rng_vae, rng_obj = jax.random.split(rng)
        inputs = self.encode(frozen, batch, rng_vae)
        return self.objective(
            params, inputs, rng_obj, nets=self.networks(frozen), schedule=self.schedule, cfg=self.config.objective,
            ema_params=ema_params,
        )

    def sample(self, params, frozen, batch, rng, *, method: str, num_steps: int, guidance_scale: float = 1.0):
        rng_vae, rng_s = jax.random.split(rng)
        inputs = self.encode(frozen, batch, rng_vae)
        nets = self.networks(frozen)
        return inference.generate(
            nets.apply, params, nets.decode, text=inputs["text"], text_null=inputs["text_null"],
            cond=inputs.get("cond"), latent_shape=inputs["latents"].shape, rng=rng_s, method=method,
            num_steps=num_steps, schedule=self.schedule, prediction_type=self.config.model.prediction_type,
            guidance_scale=guidance_scale, codi_kwargs=self.codi_sampler_kwargs(),
            timestep_spacing=self.timestep_spacing())

    def codi_sampler_kwargs(self) -> dict:
        o = self.config.objective
        return {"distill_steps": int(o.distill_steps), "timestep_scaling": float(o.timestep_scaling),
                "sigma_data": float(o.sigma_data)}

    def timestep_spacing(self) -> str:
        return self.spec.spacing

    def save_components(self, path: str, ema, frozen_host: dict, meta: dict) -> tuple[dict, str]:

        meta.update(timestep_spacing=self.timestep_spacing(), **self.codi_sampler_kwargs())
        weights.save_diffusers(os.path.join(path, "vae"), "vae", export.float32(self.vae), frozen_host["vae"])
        weights.save_diffusers(os.path.join(path, "text_encoder"), "text_encoder", export.float32(self.text_encoder),
                               frozen_host["text_encoder"])
        export.save_tokenizer(self.tokenizer, os.path.join(path, "tokenizer"), meta["max_length"])
        components = dict(vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
                          tokenizer=["transformers", "CLIPTokenizer"])
        pipeline_class = self._save_denoiser(path, ema, frozen_host, meta, components)
        components["scheduler"] = ["diffusers", export.save_scheduler(path, meta)]
        # Listed as absent, so from_pretrained needs no extra argument (the SD pipelines' optional components).
        components.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                          requires_safety_checker=False)
        return components, pipeline_class

    def _save_denoiser(self, path: str, ema, frozen_host: dict, meta: dict, components: dict) -> str:

        weights.save_diffusers(os.path.join(path, "unet"), "unet", export.float32(self.unet), ema)
        components["unet"] = ["diffusers", "UNet2DConditionModel"]
        return "StableDiffusionPipeline"


class ConditionalRecipe(TextToImageRecipe):
    """The pretrained UNet adapted to a condition (paper 4.1 / 4.4): mu-mixed duplicated encoder or ControlNet form,
    the UNet trained or frozen, with the mode's frozen teacher."""

    def __init__(self, config, workdir: str, *, abstract: bool = False):
        # config.init_controlnet: every check (folder, task, teacher, latent scale) before any weights are read.
        self.controlnet = None  # (folder, diffusers config)
        if config.init_controlnet and not abstract:
            teacher = resolve(config.teacher, workdir)
            vae_from = resolve(config.vae_from, workdir) or teacher
            self.controlnet = controlnet_source(config.init_controlnet, config.task)
            _check_controlnet_fits(config.init_controlnet, self.controlnet[1], teacher, vae_from, int(
                config.data.image_size))
        super().__init__(config, workdir, abstract=abstract)

    def _denoiser(self, unet_params) -> None:

        config, abstract = self.config, self.abstract
        z, t, ctx = self._z, self._t, self._ctx
        if self.spec.teacher == "conditional" and not config.init_from and not abstract:
            raise ValueError(f"config.init_from: mode {self.mode!r} distils a fine-tuned teacher: set it to the "
                             "workdir of a finished finetune run")
        cond_channels = data_lib.cond_channels(config.data)
        control_cfg = None
        if self.controlnet is not None:  # the imported encoder keeps its own options (hint net, order, pooling)

            control_cfg = cn_lib.ControlNetConfig.from_diffusers(self.controlnet[1], dtype=self.unet.config.dtype,
                                                                 remat=self.unet.config.remat)
            # config.resolve already set model.hint_channels to this hint net (it is the one in the saved config).
            logging.info("hint net from the ControlNet %s: conditioning_embedding_out_channels=%s", self.controlnet[0],
                         tuple(control_cfg.conditioning_embedding_out_channels))
        hint = tuple(config.model.hint_channels)
        if 2 ** (len(hint) - 1) * self.latent_size != self.image_size:
            raise ValueError(
                f"config.model.hint_channels={hint} downsamples the condition {2 ** (len(hint) - 1)}x, but the images "
                f"({self.image_size}) are {self.image_size // self.latent_size}x the latents: use "
                f"{int(np.log2(self.image_size // self.latent_size)) + 1} entries"
            )
        if control_cfg is not None:
            cond_cfg = cond_lib.ConditionalConfig(unet=self.unet.config, control=control_cfg,
                                                  mode=config.model.cond_mode)
        else:
            cond_cfg = cond_lib.ConditionalConfig.create(
                self.unet.config, config.model.cond_mode, conditioning_channels=cond_channels,
                conditioning_embedding_out_channels=hint,
            )
        self.model = cond_lib.ConditionalUNet(cond_cfg)
        cond = jnp.zeros((1, self.image_size, self.image_size, cond_channels), jnp.float32)
        full_abstract = jax.eval_shape(self.model.init, jax.random.key(0), z, t, ctx, cond)["params"]
        if unet_params is None and not config.init_from and not abstract:
            raise ValueError(
                f"mode {self.mode!r} adapts a pretrained text-to-image model: set config.teacher (diffusers folder) "
                "or config.init_from (a codi_jax run)"
            )
        if unet_params is not None:
            _, full_init = cond_lib.init_from_unet(jax.random.key(config.seed + 1), cond_cfg, unet_params)
            full_init = _to_numpy(full_init)
            if self.controlnet is not None:
                full_init["control"] = _import_controlnet(self.controlnet[0], full_abstract["control"])
        else:
            full_init = None
        self.freeze_unet = bool(config.model.freeze_unet)
        if self.freeze_unet:
            self.abstract_params = {k: v for k, v in full_abstract.items() if k != "unet"}
            self.frozen_abstract["unet"] = full_abstract["unet"]
            if not abstract:  # the plan (abstract) needs only shapes
                if full_init is None:
                    raise ValueError("PE-CoDi needs the pretrained UNet: set config.teacher")
                self.frozen_host["unet"] = full_init["unet"]
                self.initial_params = {k: v for k, v in full_init.items() if k != "unet"}
        else:
            self.abstract_params = full_abstract
            self.initial_params = full_init

        def init_fn(rng):
            params = self.model.init(rng, z, t, ctx, cond)["params"]
            return {k: v for k, v in params.items() if not (self.freeze_unet and k == "unet")}

        self.init_fn = init_fn
        # Frozen teachers: the pretrained text-to-image UNet (the teacher's PF-ODE, the x-space default), or the
        # fine-tuned conditional model itself for CM-II / GD-II (restored from init_from by placed_frozen).
        if self.spec.pf_ode_teacher:
            if objectives.resolved_pf_ode(config.objective) == "teacher":
                if unet_params is None and not abstract:
                    raise ValueError("objective.pf_ode='teacher' (and 'auto' in x space) needs the pretrained UNet: "
                                     "set config.teacher, or objective.pf_ode='online'")
                # A frozen UNet (PE-CoDi) is the pretrained one: the teacher reads it, no second copy on device.
                if not self.freeze_unet:
                    if unet_params is not None:
                        self.frozen_host["teacher"] = unet_params
                    self.frozen_abstract["teacher"] = full_abstract["unet"]
                self.teacher_kind = "unet"
        elif self.spec.teacher == "conditional":
            self.frozen_abstract["teacher"] = full_abstract
            self.teacher_kind = "conditional"

    def _merge(self, params, frozen):
        return {**params, "unet": frozen["unet"]} if self.freeze_unet else params

    def _apply(self, params, frozen, z, t, batch):
        return self.model.apply({"params": self._merge(params, frozen)}, z, t, batch["text"], batch["cond"])

    def _teacher(self, frozen):
        if self.teacher_kind == "unet":
            unet = frozen["unet"] if self.freeze_unet else frozen["teacher"]
            return lambda z, t, b: self.unet.apply({"params": unet}, z, t, b["text"])
        if self.teacher_kind == "conditional":
            return lambda z, t, b: self.model.apply({"params": frozen["teacher"]}, z, t, b["text"], b["cond"])
        return None

    def placed_frozen(self, frozen: dict, abstract_params) -> dict:
        """CM-II / GD-II's teacher: the fine-tuned model's EMA from config.init_from (restored with the trainable
        params' shardings), which shares the frozen pretrained UNet when that is frozen too."""
        if self.teacher_kind != "conditional":
            return frozen
        teacher = checkpoint.restore_params(self.config.init_from, abstract_params)[1]
        if self.freeze_unet:
            teacher = {**teacher, "unet": frozen["unet"]}
        return {**frozen, "teacher": teacher}

    def _save_denoiser(self, path: str, ema, frozen_host: dict, meta: dict, components: dict) -> str:
        """The conditional model in its own format (conditional/), its UNet, and its encoder as diffusers
        ControlNet(s) (one for the ControlNet form; full CoDi's mu form needs two, a MultiControlNet)."""

        full = {**ema, "unet": frozen_host["unet"]} if "unet" not in ema else ema
        model = export.float32(self.model)
        weights.save_conditional(os.path.join(path, "conditional"), model, full)
        weights.save_diffusers(os.path.join(path, "unet"), "unet", export.float32(self.unet), full["unet"])
        components["unet"] = ["diffusers", "UNet2DConditionModel"]
        nets = export.diffusers_controlnets(model.config, full)
        for i, (module, params) in enumerate(nets):
            weights.save_diffusers(os.path.join(path, "controlnet" + (f"_{i}" if i else "")), "controlnet",
                                   module, params)
        components["controlnet"] = ["diffusers", "ControlNetModel" if len(nets) == 1 else "MultiControlNetModel"]
        meta["controlnets"] = len(nets)
        if "mu" in full:
            meta["mu"] = float(np.asarray(full["mu"]))
        return "StableDiffusionControlNetPipeline"


FAMILIES: dict[str, type[Recipe]] = {"vae": VAERecipe, "t2i": TextToImageRecipe, "conditional": ConditionalRecipe}


def make(config, workdir: str, *, abstract: bool = False) -> Recipe:
    """The recipe of config.mode's family. abstract=True: presets only, no weights read (ahead-of-time compiles)."""
    return FAMILIES[modes.get(config.mode).family](config, workdir, abstract=abstract)
