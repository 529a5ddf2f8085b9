"""The mode table (codi_jax/modes.py) is what config.finalize, the recipe, export and evaluation read: each row's
settings reach each of them, and a new row (here CM-II with the UNet frozen) needs nothing else."""

import dataclasses
import os
import tempfile

import pytest

from codi_jax import config as config_lib, export, modes, recipes
from codi_jax.testing import tiny_config

# The paper's Table 2 rows per mode, as evaluation produced them before the table existed (eval steps 1, 2, 4; the
# teacher's DDIM 50): the table must reproduce them exactly.
EXPECTED_ROWS = {
    "finetune": [(" ddim", "ddim", 1), (" ddim", "ddim", 2), (" ddim", "ddim", 4), (" ddim", "ddim", 50),
                 (" dpm++", "dpmpp_2m", 1), (" dpm++", "dpmpp_2m", 2), (" dpm++", "dpmpp_2m", 4)],
    "codi": [("", "codi", 1), ("", "codi", 2), ("", "codi", 4)],
    "pe_codi": [("", "codi", 1), ("", "codi", 2), ("", "codi", 4)],
    "cm": [("", "codi", 1), ("", "codi", 2), ("", "codi", 4)],
    "cm_frozen": [("", "codi", 1), ("", "codi", 2), ("", "codi", 4)],
    "gd": [("", "ddim", 1), ("", "ddim", 2), ("", "ddim", 4)],
}
EXPECTED = {  # mode: (cond_mode, freeze_unet after finalize with the user's False, sampler, spacing, teacher kind)
    # codi and pe_codi keep the pretrained UNet frozen for the teacher's PF-ODE (pf_ode 'auto' in x space).
    "finetune": ("controlnet", False, ("ddim", 50), "leading", None),
    "codi": ("mu", False, ("codi", 4), "leading", "unet"),
    "pe_codi": ("controlnet", True, ("codi", 4), "leading", "unet"),
    "cm": ("controlnet", False, ("codi", 4), "leading", "conditional"),
    "cm_frozen": ("controlnet", True, ("codi", 4), "leading", "conditional"),
    "gd": ("controlnet", False, ("ddim", 4), "trailing", "conditional"),
}


def _config(mode, **overrides):
    c = tiny_config("depth")
    c.mode = mode
    c.teacher = "builtin:scenes32"
    c.init_from = "/nonexistent-only-read-by-the-loop" if modes.get(mode).teacher == "conditional" else ""
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return config_lib.finalize(c)


def test_rows_of_table_2():
    assert modes.MODES == ("vae", "pretrain", "finetune", "codi", "pe_codi", "cm", "cm_frozen", "gd")
    assert [m for m in modes.MODES if modes.is_conditional(m)] == list(EXPECTED_ROWS)
    for mode, rows in EXPECTED_ROWS.items():
        assert modes.get(mode).eval_rows((1, 2, 4), 50) == rows
    assert not modes.is_conditional(None) and not modes.is_conditional("pretrain")
    with pytest.raises(ValueError, match="mode 'codi2' is not one of"):
        modes.get("codi2")


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_each_row_reaches_config_recipe_and_export(mode):
    cond_mode, freeze, sampler, spacing, teacher = EXPECTED[mode]
    c = _config(mode, **{"model.freeze_unet": False})
    assert (c.model.cond_mode, c.model.freeze_unet) == (cond_mode, freeze)
    recipe = recipes.make(c, tempfile.gettempdir(), abstract=True)
    assert recipe.default_sampler() == sampler and recipe.timestep_spacing() == spacing
    assert recipe.teacher_kind == teacher
    index = {"_class_name": "StableDiffusionControlNetPipeline", "controlnet": ["diffusers", "ControlNetModel"],
             "_codi_jax": {"mode": mode, "task": "depth", "default_sampler": list(sampler),
                           "prediction_type": "v_prediction"}}
    card = export.model_card(index, c)
    assert ("consistency-distillation" in card) == (sampler[0] == "codi")
    # The card says what the objective's 'auto' settings meant for the run (x space: the teacher, one t per example).
    as_trained = "pf_ode = teacher, timestep_sampling = sample."
    assert (as_trained in card) == (mode in ("codi", "pe_codi")), mode
    assert f"base_model: \"{c.init_from if teacher == 'conditional' else c.teacher}\"" in card


FAMILY_PARTS = {  # family: (recipe class, frozen parts, top-level trainable trees) in abstract form, tiny presets
    "vae": (recipes.VAERecipe, set(), {"encoder", "decoder", "quant_conv", "post_quant_conv"}),
    "pretrain": (recipes.TextToImageRecipe, {"vae", "text_encoder", "null_ids"}, None),
    "codi": (recipes.ConditionalRecipe, {"vae", "text_encoder", "null_ids", "teacher"}, {"unet", "control", "mu"}),
    # PE-CoDi's frozen UNet is its PF-ODE teacher too: one copy, not two.
    "pe_codi": (recipes.ConditionalRecipe, {"vae", "text_encoder", "null_ids", "unet"}, {"control"}),
    "cm": (recipes.ConditionalRecipe, {"vae", "text_encoder", "null_ids", "teacher"}, {"unet", "control"}),
}


@pytest.mark.parametrize("mode", list(FAMILY_PARTS))
def test_each_family_has_its_recipe(mode):
    """recipes.make picks the row's family; each family's recipe says what trains and what is frozen."""
    cls, frozen, trainable = FAMILY_PARTS[mode]
    c = tiny_config("depth", mode=mode, init_from="/only-read-by-the-loop" if mode == "cm" else "")
    recipe = recipes.make(c, tempfile.gettempdir(), abstract=True)
    assert type(recipe) is cls and recipe.spec.family == modes.get(mode).family
    assert set(recipe.frozen_abstract) == frozen
    if trainable is not None:
        assert set(recipe.abstract_params) == trainable
    # The protocol: the same methods on every family, the defaults only where the family needs nothing.
    assert (type(recipe).after_training is recipes.Recipe.after_training) == (mode != "vae")
    assert (type(recipe).placed_frozen is recipes.Recipe.placed_frozen) == (mode in ("vae", "pretrain"))


def test_a_new_row_is_all_a_new_mode_needs(monkeypatch):
    # A row added at run time, as a contributor's would be: CM-II (frozen) again under another name. The config, the
    # recipe and evaluation take it with nothing else changed (the objective exists).
    row = dataclasses.replace(modes.get("cm"), name="cm_frozen_copy", freeze_unet=True)
    monkeypatch.setitem(modes.TABLE, "cm_frozen_copy", row)
    c = _config("cm_frozen_copy")
    assert c.model.cond_mode == "controlnet" and c.model.freeze_unet
    recipe = recipes.make(c, tempfile.gettempdir(), abstract=True)
    assert recipe.teacher_kind == "conditional" and recipe.default_sampler() == ("codi", 4)
    assert "unet" in recipe.frozen_abstract and "unet" not in recipe.abstract_params
    assert modes.is_conditional("cm_frozen_copy") and row.eval_rows((4,), 50) == [("", "codi", 4)]
    typo = tiny_config("depth")
    typo.mode = "cm_frozen2"
    with pytest.raises(ValueError, match=r"config.mode: 'cm_frozen2' is not one of .*'cm_frozen_copy'\)"):
        config_lib.finalize(typo)


@pytest.mark.slow
def test_cm_frozen_distils_a_frozen_finetune_run(tmp_path):
    """The walk-through of docs/adding.md, in miniature: finetune with the UNet frozen, then cm_frozen from it. The
    frozen teacher is the finetune run's EMA (restored from init_from) and shares the pretrained UNet."""
    import jax
    import numpy as np

    from codi_jax import train
    from codi_jax.testing import make_random_pipeline, tiny_config

    teacher = make_random_pipeline(str(tmp_path / "teacher"))
    small = {"batch_size": 8, "total_steps": 2, "checkpoint_every": 2, "log_every": 1}
    ft = train.train(tiny_config("depth", teacher, mode="finetune", **{"model.freeze_unet": True}, **small),
                     str(tmp_path / "ft"))
    assert ft.finished and os.path.isfile(tmp_path / "ft" / "export" / "DONE")
    cm = train.setup(tiny_config("depth", teacher, mode="cm_frozen", init_from=str(tmp_path / "ft"), **small),
                     str(tmp_path / "cm"))
    try:
        got, want = jax.device_get(cm.frozen["teacher"]), jax.device_get(ft.state.ema_params)
        assert set(got) == set(want) | {"unet"} and "unet" not in cm.state.params
        for a, b in zip(jax.tree.leaves(got["control"]), jax.tree.leaves(want["control"])):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(got["unet"]), jax.tree.leaves(jax.device_get(cm.frozen["unet"]))):
            np.testing.assert_array_equal(a, b)
    finally:
        cm.checkpointer.close()
