"""A randomly initialised tiny Stable-Diffusion-layout pipeline folder, for tests and benchmarks.

It has exactly the layout of a real SD checkpoint (unet/, vae/, text_encoder/, tokenizer/, model_index.json), written by
our own exporters, so the code under test takes the same import path as with real weights.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import config as config_lib
from codi_jax import export, recipes, weights
from codi_jax.data import load_tokenizer
from codi_jax.models import clip, conditional, controlnet, unet, vae


def make_random_pipeline(path: str, *, max_length: int = 32, seed: int = 0, tokenizer: str = "builtin:scenes",
                         prediction_type: str = "epsilon") -> str:
    os.makedirs(path, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    keys = jax.random.split(jax.random.key(seed), 3)
    text_module = clip.CLIPTextEncoder(clip.CLIPTextConfig.preset(
        "tiny", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=max(77, max_length)))
    vae_module = vae.AutoencoderKL(vae.VAEConfig.preset("tiny"))
    unet_module = unet.UNet2DConditionModel(unet.UNetConfig.preset("tiny", cross_attention_dim=text_module.config.hidden_size))
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)
    ids = jnp.zeros((1, max_length), jnp.int32)
    z = jnp.zeros((1, 8, 8, 4), jnp.float32)
    ctx = jnp.zeros((1, max_length, text_module.config.hidden_size), jnp.float32)
    unbox = lambda tree: jax.tree.map(np.asarray, __import__("flax").linen.meta.unbox(tree))  # noqa: E731
    text_params = unbox(jax.jit(text_module.init)(keys[0], ids)["params"])
    vae_params = unbox(jax.jit(lambda k: vae_module.init(k, images, k))(keys[1])["params"])
    unet_params = unbox(jax.jit(unet_module.init)(keys[2], z, jnp.zeros((1,), jnp.int32), ctx)["params"])
    weights.save_diffusers(os.path.join(path, "text_encoder"), "text_encoder", text_module, text_params)
    weights.save_diffusers(os.path.join(path, "vae"), "vae", vae_module, vae_params)
    weights.save_diffusers(os.path.join(path, "unet"), "unet", unet_module, unet_params)
    tok.save_pretrained(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "prediction_type": prediction_type}, f, indent=2)
    return path


def tiny_config(name: str = "depth", teacher: str = "", *, finalize: bool = True, **overrides):
    """configs/<name>.py:tiny with no stages and no evaluation, starting from `teacher`; overrides are dotted keys
    ('model.prediction_type') written as keyword arguments through a dict. For tests and benchmarks."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"codi_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.stages = ()
    c.run_eval = False
    c.teacher = teacher
    c.vae_from = ""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_lib.finalize(c) if finalize else c


def export_untrained(config, workdir: str, transform=None) -> str:
    """<workdir>/export for `config` as training would write it, from the recipe's initial weights (optionally
    transformed, e.g. perturbed off their zero init) without a training step. Returns the export folder."""
    recipe = recipes.make(config, workdir)
    params = recipe.initial_params if transform is None else transform(recipe.initial_params)
    state = types.SimpleNamespace(ema_params=params, step=np.asarray(7))
    path = os.path.join(workdir, "export")
    export.export(recipe, state, recipe.frozen_host, path)
    return path


def make_torchvision_importable() -> None:
    """The PyPI torchvision for torch 2.13.0 (0.28.0) is a CUDA build: its C++ ops library links libtorch_cuda and
    cannot load beside the CPU torch, and its import then stops while registering fake kernels for the ops `nms` and
    `qnms`. The references we use (lpips' AlexNet/VGG, transformers, diffusers) need only torchvision's pure-Python
    parts. So, only when the library really cannot load, declare those two op schemas (no kernels: calling them
    would still fail) and torchvision imports unchanged. For the tests (tests/conftest.py) and benchmarks/gpu_peer.py;
    call it before importing transformers or diffusers."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    import torch  # a test-time dependency only (the PyTorch references), never needed by the package

    libs = glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "_C*.so"))
    try:
        torch.ops.load_library(libs[0])
    except (OSError, IndexError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP_ALIVE.append(lib)  # the schemas live as long as this object
    import torchvision  # noqa: F401 - only after the stand-in ops above are registered


_KEEP_ALIVE: list = []


def metadata_export(workdir: str, *, task: str = "depth", image_size: int = 32) -> str:
    """<workdir>/export as training writes it for a tiny one-channel conditional model, less the weights: what
    evaluate and sample read before loading any (the model index's metadata, the conditional model's config, DONE),
    in the real format. Returns the export folder."""
    path = os.path.join(workdir, "export")
    os.makedirs(os.path.join(path, "conditional"))
    unet_cfg = unet.UNetConfig.preset("tiny")
    config = conditional.ConditionalConfig(
        unet=unet_cfg, control=controlnet.ControlNetConfig.from_unet(unet_cfg, conditioning_channels=1))
    with open(os.path.join(path, "conditional", "config.json"), "w") as f:
        json.dump(weights.config_to_json(config), f)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_codi_jax": {"mode": "codi", "task": task, "image_size": image_size,
                                 "default_sampler": ["codi", 4]}}, f)
    open(os.path.join(path, "DONE"), "w").close()
    return path
