"""Configs: every task file and variant loads and validates; bad values fail with one clear message naming the field;
mesh shapes resolve or explain why not; logical axis rules map to mesh axes once per array."""

import importlib.util
import os

import jax
import pytest
from jax.sharding import PartitionSpec as P

from codi_jax import config as config_lib
from codi_jax import modes
from codi_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name", ["depth", "sr", "inpaint", "edit", "pretrain", "vae"])
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_config_and_variant_validates(name, arg):
    c = get_config(name, arg)
    config_lib.validate(c)
    assert c.mode in modes.TABLE


def test_variants_set_modes_and_architecture():
    assert get_config("depth", "pe").mode == "pe_codi"
    pe = get_config("depth", "tiny,pe")
    assert pe.model.cond_mode == "controlnet" and pe.model.freeze_unet
    codi = get_config("depth", "tiny")
    assert codi.model.cond_mode == "mu" and not codi.model.freeze_unet
    assert codi.stages == () and codi.teacher == "builtin:scenes32"  # the shipped pretrained teacher
    scratch = get_config("depth", "tiny,scratch")
    assert scratch.stages == ("vae", "pretrain") and scratch.teacher == "@pretrain" and scratch.vae_from == "@vae"
    # configs/vae.py:tiny and configs/pretrain.py:tiny are the commands that trained the shipped teacher
    teacher = get_config("pretrain", "tiny")
    assert (teacher.total_steps, teacher.optimizer.learning_rate, teacher.ema_decay) == (
        teacher.stage_steps.pretrain, teacher.stage_learning_rate.pretrain, 0.999)
    vae = get_config("vae", "tiny")
    assert (vae.total_steps, vae.vae.chroma_weight) == (vae.stage_steps.vae, 3.0)
    assert config_lib.stage_config(scratch, "vae").vae.chroma_weight == 3.0  # the scratch route trains the same VAE
    # Flaw 4: CM-II (frozen) can be configured; the default baselines train the UNet (the same size as CoDi).
    cm = get_config("depth", "tiny,mode=cm")
    assert cm.model.cond_mode == "controlnet" and not cm.model.freeze_unet
    cm.model.freeze_unet = True
    assert config_lib.finalize(cm).model.freeze_unet
    ft = get_config("sr", "tiny,mode=finetune,steps=7,batch=16")
    assert (ft.mode, ft.total_steps, ft.batch_size, ft.model.cond_mode) == ("finetune", 7, 16, "controlnet")
    assert get_config("depth").model.preset == "sd15" and get_config("depth").dtype == "bfloat16"


@pytest.mark.parametrize("field,value,match", [
    ("mode", "distill", "config.mode"),
    ("batch_size", 0, "config.batch_size"),
    ("dtype", "float16", "config.dtype"),
    ("ema_decay", 1.5, "config.ema_decay"),
    ("optimizer.grad_accum_steps", 3, "grad_accum_steps"),
    ("model.prediction_type", "score", "prediction_type"),
    ("optimizer.schedule", "linear", "optimizer.schedule"),
    ("target_ema_decay", 1.0, "config.target_ema_decay"),
    ("optimizer.mu_learning_rate", -1.0, "mu_learning_rate"),
    ("optimizer.weight_decay_mask", "biases", "weight_decay_mask"),
])
def test_bad_values_name_the_field(field, value, match):
    c = get_config("depth", "tiny")
    node = c
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c)


def test_unknown_variant_and_locked_typos():
    with pytest.raises(ValueError, match="unknown config variant"):
        get_config("depth", "tinyy")
    c = get_config("depth", "tiny")
    c.lock()
    with pytest.raises(AttributeError):
        c.bacth_size = 3  # what --config.bacth_size=3 does: a locked config refuses new keys


def test_overrides_after_get_config_are_rederived_and_validated():
    c = get_config("depth", "tiny")
    c.mode = "pe_codi"  # what --config.mode=pe_codi does after get_config
    c = config_lib.finalize(c)
    assert c.model.cond_mode == "controlnet" and c.model.freeze_unet
    c.batch_size = -4
    with pytest.raises(ValueError, match="config.batch_size"):
        config_lib.finalize(c)


def test_mesh_shapes():
    assert parallel.mesh_shape({"data": -1, "fsdp": 4}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parallel.mesh_shape({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="do not divide"):
        parallel.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.mesh_shape({"data": 4, "fsdp": 4}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        parallel.mesh_shape({"model": 2}, 8)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_rules_use_each_mesh_axis_once_and_fit_odd_sizes():
    rules = parallel.DEFAULT_RULES
    assert parallel.logical_to_mesh_spec(P("embed", "embed"), rules) == P("fsdp", None)
    assert parallel.logical_to_mesh_spec(P(None, None, "conv_in", "conv_out"), rules) == P(None, None, "fsdp", "tensor")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    # 3 RGB channels do not divide over fsdp=4: replicated instead of an error.
    assert parallel.fit_spec(P(None, None, "fsdp", None), (3, 3, 3, 32), mesh) == P(None, None, None, None)
    assert parallel.fit_spec(P(None, None, "fsdp", None), (3, 3, 64, 32), mesh) == P(None, None, "fsdp", None)
