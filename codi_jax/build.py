"""What each mode trains, what stays frozen, and how the networks are called.

`Recipe(config, workdir)` is everything mode-specific the loop in train.py needs:
- the trainable parameter tree (boxed abstract value for shardings; host values when imported from a teacher or stage),
- the frozen parts (VAE, text encoder, a teacher, the PE-CoDi backbone) as one dict that never enters the optimizer,
- `loss(params, ema_params, frozen, batch, rng)` and `sample(params, frozen, batch, rng, ...)`, both pure and jittable.
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

from codi_jax import checkpoint, diffusion, inference, modes
from codi_jax.diffusion import objectives
from codi_jax.models import with_compute


PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def resolve(path: str, workdir: str) -> str:
    """'@stage' names the export of an earlier stage of this run: <workdir>/<stage>/export; 'builtin:NAME' a pipeline
    shipped in the package (codi_jax/pretrained/NAME)."""
    if path.startswith("@"):
        return os.path.join(workdir, path[1:], "export")
    if path.startswith("builtin:"):
        found = os.path.join(PRETRAINED_DIR, path[len("builtin:"):])
        if not os.path.isdir(found):
            raise FileNotFoundError(f"{path!r}: no pretrained pipeline {found!r} in this installation "
                                    f"(shipped: {sorted(os.listdir(PRETRAINED_DIR)) if os.path.isdir(PRETRAINED_DIR) else []})")
        return found
    return path


def controlnet_source(path: str, task: str) -> tuple[str, dict]:
    """config.init_controlnet -> (the ControlNet folder, its diffusers config.json): every check that needs only the
    folder. It exists (never created), holds a diffusers ControlNetModel (or is a pipeline with controlnet/) in a form
    we implement, with safetensors weights, whose conditioning_channels are the task's. Reads no weights; each problem
    is one ValueError / FileNotFoundError line that starts with 'config.init_controlnet' and names the path."""
    from codi_jax import data as data_lib
    from codi_jax import weights
    from codi_jax.models import controlnet as cn_lib

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
    from codi_jax import weights
    from codi_jax.models import conditional as cond_lib
    from codi_jax.models import controlnet as cn_lib
    from codi_jax.models import unet as unet_lib
    from codi_jax.models import vae as vae_lib

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
    from codi_jax import weights

    _, params = weights.load_diffusers(folder, "controlnet")
    params = _to_numpy(params)
    want = nn.meta.unbox(abstract)
    if jax.tree.structure(params) != jax.tree.structure(want) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want))):
        raise ValueError(f"config.init_controlnet={folder!r}: its weights do not form the conditional encoder's tree")
    logging.info("conditional encoder (encoder, hint net, zero convs) from the ControlNet %s", folder)
    return params


class Recipe:
    def __init__(self, config, workdir: str, *, abstract: bool = False):
        """abstract=True reads no weights and materialises nothing (presets only): for ahead-of-time compiles of
        large models, e.g. the TPU pod plan in benchmarks/aot_tpu.py."""
        from codi_jax import data as data_lib
        from codi_jax import weights
        from codi_jax.models import clip as clip_lib
        from codi_jax.models import unet as unet_lib
        from codi_jax.models import vae as vae_lib

        self.config = config
        self.mode = config.mode
        self.spec = modes.get(config.mode)
        self.dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
        self.schedule = diffusion.make_schedule(**config.schedule.to_dict())
        self.image_size = int(config.data.image_size)
        teacher = resolve(config.teacher, workdir)
        vae_from = resolve(config.vae_from, workdir) or teacher
        text_from = resolve(config.text_encoder_from, workdir) or teacher
        self.frozen_host: dict[str, Any] = {}
        self.frozen_abstract: dict[str, Any] = {}
        self.initial_params = None  # host values of the trainable tree when imported
        self.teacher_kind = None  # 'unet' (pretrained text-to-image) | 'conditional' (fine-tuned, cm/gd) | None
        self.freeze_unet = False
        # config.init_controlnet: every check (folder, task, teacher, latent scale) before any weights are read.
        controlnet = None  # (folder, diffusers config)
        if config.init_controlnet and not abstract:
            controlnet = controlnet_source(config.init_controlnet, config.task)
            _check_controlnet_fits(config.init_controlnet, controlnet[1], teacher, vae_from or teacher,
                                   self.image_size)

        # --- autoencoder --------------------------------------------------------------------------------------------
        if abstract:
            vae_from = text_from = teacher = ""
        if vae_from:
            vae, vae_params = weights.load_diffusers(vae_from, "vae")
            logging.info("VAE from %s", vae_from)
        else:
            vae, vae_params = vae_lib.AutoencoderKL(vae_lib.VAEConfig.preset(_preset("vae", config.model.preset))), None
        self.vae = with_compute(vae, self.dtype, False)
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.latent_size = self.image_size // (2 ** (len(self.vae.config.block_out_channels) - 1))
        self.latent_channels = int(self.vae.config.latent_channels)
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        vae_init = lambda r: self.vae.init(r, images, r)["params"]  # noqa: E731 - encoder and decoder
        vae_abstract = jax.eval_shape(vae_init, jax.random.key(0))

        if self.spec.family == "vae":
            self.model = self.vae
            self.abstract_params = vae_abstract
            self.init_fn = vae_init
            self.initial_params = vae_params
            return
        if vae_params is None and not abstract:
            raise ValueError(
                f"mode {self.mode!r} needs a trained VAE: set config.teacher or config.vae_from (a diffusers vae folder)"
            )
        if vae_params is not None:
            self.frozen_host["vae"] = vae_params
        self.frozen_abstract["vae"] = vae_abstract

        # --- text encoder and the null prompt ------------------------------------------------------------------------
        tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
        if text_from:
            text, text_params = weights.load_diffusers(text_from, "text_encoder")
            logging.info("text encoder from %s", text_from)
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
        if text_params is None and not abstract:
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

        # --- the denoiser --------------------------------------------------------------------------------------------
        if teacher:
            unet, unet_params = weights.load_diffusers(teacher, "unet")
            logging.info("teacher UNet from %s", teacher)
        else:
            unet_cfg = unet_lib.UNetConfig.preset(_preset("unet", config.model.preset),
                                                  cross_attention_dim=int(self.text_encoder.config.hidden_size))
            unet, unet_params = unet_lib.UNet2DConditionModel(unet_cfg), None
        self.unet = with_compute(unet, self.dtype, config.remat)
        z = jnp.zeros((1, self.latent_size, self.latent_size, self.latent_channels), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        ctx = jnp.zeros((1, int(config.data.max_length), self.unet.config.cross_attention_dim), jnp.float32)

        if self.spec.family == "t2i":
            self.model = self.unet
            self.abstract_params = jax.eval_shape(self.unet.init, jax.random.key(0), z, t, ctx)["params"]
            self.init_fn = lambda rng: self.unet.init(rng, z, t, ctx)["params"]
            self.initial_params = unet_params
            self._apply = lambda p, f, z_, t_, b: self.unet.apply({"params": p}, z_, t_, b["text"])
            self.objective = objectives.OBJECTIVES[self.spec.objective]
            return

        if self.spec.teacher == "conditional" and not config.init_from and not abstract:
            raise ValueError(f"config.init_from: mode {self.mode!r} distils a fine-tuned teacher: set it to the "
                             "workdir of a finished finetune run")
        # Conditional modes: the adapted UNet (paper 4.1 / 4.4).
        from codi_jax.models import conditional as cond_lib

        cond_channels = data_lib.cond_channels(config.data)
        control_cfg = None
        if controlnet is not None:  # the imported encoder keeps its own options (hint net, channel order, pooling)
            from codi_jax.models import controlnet as cn_lib

            control_cfg = cn_lib.ControlNetConfig.from_diffusers(controlnet[1], dtype=self.unet.config.dtype,
                                                                 remat=self.unet.config.remat)
            hint = tuple(control_cfg.conditioning_embedding_out_channels)
            logging.info("hint net from the ControlNet %s: conditioning_embedding_out_channels=%s replaces "
                         "config.model.hint_channels=%s", controlnet[0], hint, tuple(config.model.hint_channels))
            config.model.hint_channels = hint
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
            if controlnet is not None:
                full_init["control"] = _import_controlnet(controlnet[0], full_abstract["control"])
        else:
            full_init = None
        self.freeze_unet = bool(config.model.freeze_unet)
        if self.freeze_unet:
            self.abstract_params = {k: v for k, v in full_abstract.items() if k != "unet"}
            self.frozen_abstract["unet"] = full_abstract["unet"]
            if abstract:
                pass
            elif full_init is None:
                raise ValueError("PE-CoDi needs the pretrained UNet: set config.teacher")
            else:
                self.frozen_host["unet"] = full_init["unet"]
                self.initial_params = {k: v for k, v in full_init.items() if k != "unet"}
        else:
            self.abstract_params = full_abstract
            self.initial_params = full_init

        def init_fn(rng):
            params = self.model.init(rng, z, t, ctx, cond)["params"]
            return {k: v for k, v in params.items() if not (self.freeze_unet and k == "unet")}

        self.init_fn = init_fn
        self._apply = lambda p, f, z_, t_, b: self.model.apply(
            {"params": self._merge(p, f)}, z_, t_, b["text"], b["cond"]
        )
        self.objective = objectives.OBJECTIVES[self.spec.objective]
        # Frozen teachers: the pretrained text-to-image UNet (CoDi's 'teacher' PF-ODE ablation), or the fine-tuned
        # conditional model itself for CM-II / GD-II (restored from init_from by the loop).
        if self.spec.pf_ode_teacher:
            if config.objective.pf_ode == "teacher":
                if unet_params is None and not abstract:
                    raise ValueError("objective.pf_ode='teacher' needs the pretrained UNet: set config.teacher")
                if unet_params is not None:
                    self.frozen_host["teacher"] = unet_params
                self.frozen_abstract["teacher"] = full_abstract["unet"]
                self.teacher_kind = "unet"
        elif self.spec.teacher == "conditional":
            self.frozen_abstract["teacher"] = full_abstract
            self.teacher_kind = "conditional"

    # ---------------------------------------------------------------------------------------------------------------
    def _merge(self, params, frozen):
        if self.spec.conditional and self.freeze_unet:
            return {**params, "unet": frozen["unet"]}
        return params

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
        teacher = None
        if self.teacher_kind == "unet":
            teacher = lambda z, t, b: self.unet.apply({"params": frozen["teacher"]}, z, t, b["text"])  # noqa: E731
        elif self.teacher_kind == "conditional":
            teacher = lambda z, t, b: self.model.apply(  # noqa: E731
                {"params": frozen["teacher"]}, z, t, b["text"], b["cond"])
        decode = lambda lat: self.vae.apply({"params": frozen["vae"]}, lat / self.vae_scale, method="decode")  # noqa
        return objectives.Networks(
            apply=lambda p, z, t, b: self._apply(p, frozen, z, t, b), teacher=teacher, decode=decode
        )

    def loss(self, params, ema_params, frozen, batch, rng):
        if self.spec.family == "vae":
            return self._vae_loss(params, batch, rng)
        rng_vae, rng_obj = jax.random.split(rng)
        inputs = self.encode(frozen, batch, rng_vae)
        return self.objective(
            params, inputs, rng_obj, nets=self.networks(frozen), schedule=self.schedule, cfg=self.config.objective,
            ema_params=ema_params,
        )

    def _vae_loss(self, params, batch, rng):
        images = batch["image"]
        recon, posterior = self.vae.apply({"params": params}, images, rng, sample_posterior=True)
        recon = recon.astype(jnp.float32)
        l1 = jnp.mean(jnp.abs(recon - images))
        l2 = jnp.mean(jnp.square(recon - images))
        kl = jnp.mean(posterior.kl())
        w = self.config.vae
        loss = w.l1_weight * l1 + w.l2_weight * l2 + w.kl_weight * kl
        return loss, {"loss": loss, "l1": l1, "l2": l2, "kl": kl}

    def sample(self, params, frozen, batch, rng, *, method: str, num_steps: int, guidance_scale: float = 1.0):
        """Images in [-1, 1] for a batch of conditions/prompts (or VAE reconstructions in mode 'vae')."""
        if self.spec.family == "vae":
            posterior = self.vae.apply({"params": params}, batch["image"], method="encode")
            return self.vae.apply({"params": params}, posterior.mode(), method="decode")
        rng_vae, rng_s = jax.random.split(rng)
        inputs = self.encode(frozen, batch, rng_vae)
        nets = self.networks(frozen)
        return inference.generate(
            nets.apply, params, nets.decode, text=inputs["text"], text_null=inputs["text_null"],
            cond=inputs.get("cond"), latent_shape=inputs["latents"].shape, rng=rng_s, method=method,
            num_steps=num_steps, schedule=self.schedule, prediction_type=self.config.model.prediction_type,
            guidance_scale=guidance_scale, codi_kwargs=self.codi_sampler_kwargs(),
            timestep_spacing=self.timestep_spacing())

    def placed_frozen(self, frozen: dict, abstract_params) -> dict:
        """The frozen parts on the mesh, completed with what only exists as a checkpoint: CM-II / GD-II's teacher, the
        fine-tuned model's EMA from config.init_from (restored with the trainable params' shardings), which shares
        the frozen pretrained UNet when that is frozen too."""
        if self.teacher_kind != "conditional":
            return frozen
        teacher = checkpoint.restore_params(self.config.init_from, abstract_params)[1]
        if self.freeze_unet:
            teacher = {**teacher, "unet": frozen["unet"]}
        return {**frozen, "teacher": teacher}

    def after_training(self, params, data_iter, batches: int = 8) -> None:
        """What the finished model needs before export. The VAE: SD's latent scale, scaling_factor = 1 / std of its
        latents over `batches` training batches, so the diffusion model sees unit-variance data."""
        if self.spec.family != "vae":
            return
        encode = jax.jit(lambda p, x, r: self.vae.apply({"params": p}, x, method="encode").sample(r))
        params = jax.device_get(params)
        latents = [np.asarray(encode(params, next(data_iter)["image"], jax.random.PRNGKey(i))) for i in range(batches)]
        scale = float(1.0 / np.std(np.concatenate(latents)))
        self.vae = type(self.vae)(dataclasses.replace(self.vae.config, scaling_factor=scale))
        self.vae_scale = scale
        logging.info("VAE latent scaling factor: %.5f (1 / std over %d batches)", scale, batches)

    def codi_sampler_kwargs(self) -> dict:
        o = self.config.objective
        return {"distill_steps": int(o.distill_steps), "timestep_scaling": float(o.timestep_scaling),
                "sigma_data": float(o.sigma_data)}

    def timestep_spacing(self) -> str:
        return self.spec.spacing

    def default_sampler(self) -> tuple[str, int]:
        return self.spec.default_sampler(self.config.objective)
