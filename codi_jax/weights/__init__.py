"""diffusers / transformers checkpoint import and export (safetensors only; pickle formats are refused).

    module, params = load_diffusers("path/to/sd15", "unet")      # a pipeline folder (model_index.json) ...
    module, params = load_diffusers("path/to/sd15/unet", "unet") # ... or the component folder itself
    save_diffusers("out/unet", "unet", module, params)           # config.json + diffusion_pytorch_model.safetensors

Each component's model file provides `from_diffusers_config(d) -> module` and `to_diffusers_config(module) -> dict`;
optional hooks: `init_inputs(module)` (dummy inputs for the parameter shapes), `prepare_state_dict(sd)` (rename legacy
checkpoint keys before conversion), `IGNORE_KEYS` (regexes of checkpoint tensors that are not weights).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.weights.conditional import (config_to_json, conditional_config_from_json, load_conditional,
                                          save_conditional)
from codi_jax.weights.convert import (LIST_CONTAINERS, WeightsMismatchError, flax_path_to_torch_key, flax_to_torch,
                                      read_safetensors, safetensors_files, torch_to_flax, write_safetensors)


@dataclasses.dataclass(frozen=True)
class Component:
    module_path: str  # the codi_jax model file, imported lazily
    weights_file: str  # file name save_diffusers writes
    torch_class: str  # the reference class (for messages and config.json)
    ignore: tuple = ()  # regexes of checkpoint tensors with no params here (e.g. non-persistent buffers)
    default_inputs: Callable[[Any, dict], tuple] | None = None  # when the model file has no init_inputs


def _vae_inputs(module, d):
    n_down = len(d.get("block_out_channels", (64,))) - 1
    s = 2 ** n_down
    images = jnp.zeros((1, s, s, d.get("in_channels", 3)), jnp.float32)
    return images, jax.random.key(0)


def _text_inputs(module, d):
    return (jnp.zeros((1, 2), jnp.int32),)


REGISTRY: dict[str, Component] = {
    "unet": Component("codi_jax.models.unet", "diffusion_pytorch_model.safetensors", "UNet2DConditionModel"),
    "controlnet": Component("codi_jax.models.controlnet", "diffusion_pytorch_model.safetensors", "ControlNetModel"),
    "vae": Component("codi_jax.models.vae", "diffusion_pytorch_model.safetensors", "AutoencoderKL",
                     default_inputs=_vae_inputs),
    "text_encoder": Component("codi_jax.models.clip", "model.safetensors", "CLIPTextModel",
                              ignore=(r"(^|\.)position_ids$",), default_inputs=_text_inputs),
}


def _component(component: str) -> Component:
    if component not in REGISTRY:
        raise ValueError(f"unknown component {component!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[component]


def _ignore(comp: Component, mod) -> tuple:
    return tuple(comp.ignore) + tuple(getattr(mod, "IGNORE_KEYS", ()))


def resolve_folder(path: str, component: str) -> str:
    """The component folder: `path` itself (config.json) or `path/component` of a pipeline (model_index.json)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a folder")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    sub = os.path.join(path, component)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        if os.path.isfile(os.path.join(sub, "config.json")):
            return sub
        raise FileNotFoundError(f"pipeline folder {path!r} has no {component}/config.json")
    raise FileNotFoundError(f"{path!r} has no config.json (a {component} folder) and no model_index.json (a pipeline)")


def read_config(path: str, component: str) -> tuple[str, dict]:
    """(component folder, its config.json) without reading any weights. A config.json that names its class
    (`_class_name`, as diffusers writes it) must name this component's class."""
    comp = _component(component)
    folder = resolve_folder(path, component)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    name = config.get("_class_name", comp.torch_class)
    if name != comp.torch_class:
        raise ValueError(f"{folder!r} holds a {name} (config.json _class_name), not a {comp.torch_class}")
    return folder, config


def param_shapes(module, component: str, config: dict | None = None):
    """Param ShapeDtypeStructs of `module` (logical-partitioning boxes unboxed) without allocating them."""
    comp = _component(component)
    mod = importlib.import_module(comp.module_path)
    if hasattr(mod, "init_inputs"):
        inputs = mod.init_inputs(module)
    elif comp.default_inputs is not None:
        inputs = comp.default_inputs(module, config if config is not None else mod.to_diffusers_config(module))
    else:
        raise ValueError(f"{comp.module_path} provides no init_inputs(module)")
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    return nn.meta.unbox(shapes)


def load_diffusers(path: str, component: str, **module_kw):
    """Load one component -> (module, params of float32 arrays).

    module_kw go to the model file's from_diffusers_config (e.g. dtype, remat)."""
    comp = _component(component)
    folder = resolve_folder(path, component)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    mod = importlib.import_module(comp.module_path)
    module = mod.from_diffusers_config(config, **module_kw)
    target = param_shapes(module, component, config)
    state = read_safetensors(folder)
    if hasattr(mod, "prepare_state_dict"):  # e.g. the VAE renames pre-0.14 diffusers attention keys
        state = mod.prepare_state_dict(state)
    try:
        params = torch_to_flax(state, target, ignore=_ignore(comp, mod))
    except WeightsMismatchError as e:
        raise WeightsMismatchError(f"{component} weights in {folder!r}: {e}") from None
    return module, jax.tree.map(jnp.asarray, params)


def save_diffusers(path: str, component: str, module, params) -> str:
    """Write config.json + safetensors that diffusers/transformers from_pretrained loads; returns the folder.

    A model_index.json already in `path` (a pipeline folder) is left untouched; the component then goes in
    path/component.
    """
    comp = _component(component)
    path = os.fspath(path)
    folder = os.path.join(path, component) if os.path.isfile(os.path.join(path, "model_index.json")) else path
    mod = importlib.import_module(comp.module_path)
    config = mod.to_diffusers_config(module)
    os.makedirs(folder, exist_ok=True)
    state = flax_to_torch(jax.device_get(params))
    # Cross-check before writing so a bad tree never produces a file the reference library rejects later.
    torch_to_flax(state, param_shapes(module, component, config), ignore=_ignore(comp, mod))
    write_safetensors(folder, state, comp.weights_file)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return folder


__all__ = ["LIST_CONTAINERS", "REGISTRY", "WeightsMismatchError", "conditional_config_from_json", "config_to_json",
           "flax_path_to_torch_key", "flax_to_torch", "load_conditional", "load_diffusers", "param_shapes",
           "read_config", "read_safetensors", "resolve_folder", "safetensors_files", "save_conditional",
           "save_diffusers", "torch_to_flax", "write_safetensors"]
