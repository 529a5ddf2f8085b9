"""codi_jax's own format for the conditional model (conditional/ in an export): config.json, the ConditionalConfig
as JSON, and model.safetensors, the Flax params tree with '/'-joined keys. No diffusers class is this network (full
CoDi's mu mixing); diffusers gets the same weights as ControlNets (export.diffusers_controlnets).

    save_conditional("export/conditional", module, params)
    module, params = load_conditional("export")          # the export folder or conditional/ itself
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from codi_jax.models import conditional as cond_lib
from codi_jax.models.conditional import ConditionalConfig
from codi_jax.models.controlnet import ControlNetConfig
from codi_jax.models.unet import UNetConfig


def flatten(tree: dict) -> dict[str, np.ndarray]:
    """A params tree as safetensors wants it: 'a/b/kernel' -> float32 (other dtypes kept), C-contiguous, owned."""
    out = {}
    for key, v in traverse_util.flatten_dict(tree, sep="/").items():
        v = np.asarray(v)
        # np.array keeps 0-d scalars such as mu 0-d (np.ascontiguousarray would promote them to shape (1,)).
        out[key] = np.array(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype, order="C", copy=True)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def config_to_json(cfg) -> dict:
    """A (nested) model config dataclass as JSON values; dtypes by name."""
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


def save_conditional(path: str, module, params: dict) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_json(module.config), f, indent=2)
    save_file(flatten(params), os.path.join(path, "model.safetensors"))


def conditional_config_from_json(d: dict):
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
    if os.path.isdir(os.path.join(path, "conditional")):
        path = os.path.join(path, "conditional")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} holds no exported conditional model (config.json is missing)")
    with open(config_file) as f:
        cfg = conditional_config_from_json(json.load(f))
    return cond_lib.ConditionalUNet(cfg), unflatten(load_file(os.path.join(path, "model.safetensors")))
