"""Export of trained EMA weights for inference and for later stages.

<workdir>/export/ is a diffusers-style pipeline folder: vae/, text_encoder/, unet/ (safetensors + config.json) and,
for conditional modes, conditional/ (our adapted UNet: config.json + model.safetensors, flat '/'-joined names) and,
in ControlNet form, controlnet/ + unet/ that diffusers' ControlNetModel / UNet2DConditionModel load directly.
A DONE file is written last, so a half-written export is never mistaken for a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file


def _host(tree: Any) -> Any:
    """Global (possibly multi-host sharded) arrays -> full numpy arrays on every process."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _float32(module):
    from codi_jax.build import with_compute

    return with_compute(module, jnp.float32, False)


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            v = np.asarray(v)
            # np.array keeps 0-d scalars such as mu 0-d (np.ascontiguousarray would promote them to shape (1,)).
            out[key] = np.array(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype, order="C", copy=True)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _config_to_json(cfg) -> dict:
    def convert(x):
        if dataclasses.is_dataclass(x):
            return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (tuple, list)):
            return [convert(v) for v in x]
        if isinstance(x, type) or "dtype" in type(x).__name__.lower() or hasattr(x, "dtype") and not isinstance(
                x, (int, float)):
            return str(jnp.dtype(x))
        return x

    return convert(cfg)


def export(recipe, state, frozen: dict, path: str) -> None:
    from codi_jax import weights

    ema = _host(state.ema_params)
    frozen_host = _host({k: v for k, v in frozen.items() if k in ("vae", "text_encoder", "unet")})
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    done = os.path.join(path, "DONE")
    if os.path.exists(done):
        os.remove(done)
    components = {}
    if recipe.mode == "vae":
        weights.save_diffusers(os.path.join(path, "vae"), "vae", _float32(recipe.vae), ema)
        components["vae"] = ["diffusers", "AutoencoderKL"]
    else:
        weights.save_diffusers(os.path.join(path, "vae"), "vae", _float32(recipe.vae), frozen_host["vae"])
        weights.save_diffusers(os.path.join(path, "text_encoder"), "text_encoder", _float32(recipe.text_encoder),
                               frozen_host["text_encoder"])
        recipe.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        components.update(vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
                          tokenizer=["transformers", "CLIPTokenizer"])
        if recipe.mode == "pretrain":
            weights.save_diffusers(os.path.join(path, "unet"), "unet", _float32(recipe.unet), ema)
            components["unet"] = ["diffusers", "UNet2DConditionModel"]
        else:
            full = {**ema, "unet": frozen_host["unet"]} if "unet" not in ema else ema
            save_conditional(os.path.join(path, "conditional"), _float32(recipe.model), full)
            weights.save_diffusers(os.path.join(path, "unet"), "unet", _float32(recipe.unet), full["unet"])
            components["unet"] = ["diffusers", "UNet2DConditionModel"]
    config = recipe.config
    meta = {"mode": recipe.mode, "task": config.task, "prediction_type": config.model.prediction_type,
            "schedule": config.schedule.to_dict(), "image_size": int(config.data.image_size),
            "max_length": int(config.data.max_length), "default_sampler": list(recipe.default_sampler()),
            "timestep_spacing": recipe.timestep_spacing() if recipe.mode != "vae" else "leading",
            **(recipe.codi_kw() if recipe.mode != "vae" else {})}
    index = {"_class_name": "StableDiffusionPipeline", "_codi_jax": meta, **components}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(done, "w") as f:
        f.write("ok\n")
    logging.info("exported EMA weights (%s) to %s", recipe.mode, path)


def save_conditional(path: str, module, params: dict) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_config_to_json(module.config), f, indent=2)
    save_file(flatten(params), os.path.join(path, "model.safetensors"))


def conditional_config_from_json(d: dict):
    from codi_jax.models.conditional import ConditionalConfig
    from codi_jax.models.controlnet import ControlNetConfig
    from codi_jax.models.unet import UNetConfig

    def fields(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
        if "dtype" in out:
            out["dtype"] = jnp.dtype(out["dtype"]).type
        return out

    return ConditionalConfig(unet=UNetConfig(**fields(UNetConfig, d["unet"])),
                             control=ControlNetConfig(**fields(ControlNetConfig, d["control"])), mode=d["mode"])


def load_conditional(path: str):
    """(module, params) of an exported conditional model (folder conditional/ or the export folder holding it)."""
    from codi_jax.models import conditional as cond_lib

    if os.path.isdir(os.path.join(path, "conditional")):
        path = os.path.join(path, "conditional")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} holds no exported conditional model (config.json is missing)")
    with open(config_file) as f:
        cfg = conditional_config_from_json(json.load(f))
    return cond_lib.ConditionalUNet(cfg), unflatten(load_file(os.path.join(path, "model.safetensors")))
