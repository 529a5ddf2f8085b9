"""VAE training options (config.vae): the chroma term sees hue and saturation but not brightness, and decoder-only
fine-tuning leaves the encoder (so the latents a teacher was trained on) untouched, scale included."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import config as config_lib
from codi_jax import recipes, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES32_VAE = os.path.join(REPO, "codi_jax", "pretrained", "scenes32", "vae")


def _vae_config(*overrides):
    spec = importlib.util.spec_from_file_location("vae_cfg", os.path.join(REPO, "configs", "vae.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.update_from_flattened_dict(dict(overrides))
    return config_lib.finalize(c)


def test_chroma_ignores_brightness_and_sees_hue():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-0.8, 0.8, (2, 4, 4, 3)), jnp.float32)
    brighter = images + 0.15  # the same colours, lighter: grey shifts alone
    np.testing.assert_allclose(recipes._chroma(brighter), recipes._chroma(images), atol=1e-6)
    grey = jnp.broadcast_to(images[..., :1], images.shape)
    np.testing.assert_allclose(recipes._chroma(grey), 0.0, atol=1e-7)
    # Red against orange (the scenes' palette, [-1, 1]): an RGB L1 of 0.24 per pixel, a chroma L1 of the same order.
    red = jnp.asarray([0.72, 0.06, 0.05]) * 2 - 1
    orange = jnp.asarray([0.9, 0.28, 0.03]) * 2 - 1
    assert float(jnp.mean(jnp.abs(recipes._chroma(red) - recipes._chroma(orange)))) > 0.1


def _after_warm_up_start(tx, grads, params):
    """The updates of the third step (the warm-up's learning rate is 0 at the first)."""
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
    return updates


def test_decoder_only_fine_tuning_moves_the_decoder_alone():
    config = _vae_config(("vae_from", SCENES32_VAE), ("vae.train", "decoder"))
    tx, _ = train.make_optimizer(config)
    params = {name: {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros((3,))}
              for name in ("encoder", "quant_conv", "decoder", "post_quant_conv")}
    grads = jax.tree.map(jnp.ones_like, params)
    updates = _after_warm_up_start(tx, grads, params)
    for name in recipes.VAE_ENCODER_PARTS:
        assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates[name])), name
    for name in ("decoder", "post_quant_conv"):
        assert all(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(updates[name])), name
    # The default trains everything.
    tx, _ = train.make_optimizer(_vae_config())
    updates = _after_warm_up_start(tx, grads, params)
    assert float(jnp.abs(updates["encoder"]["kernel"]).max()) > 0.0


def test_decoder_only_fine_tuning_keeps_the_latent_scale(tmp_path):
    config = _vae_config(("vae_from", SCENES32_VAE), ("vae.train", "decoder"))
    recipe = recipes.make(config, str(tmp_path))
    before = recipe.vae_scale
    recipe.after_training(recipe.vae_params, iter(()))  # never reads the data: the source's scale stays
    assert recipe.vae_scale == before and recipe.vae.config.scaling_factor == before


@pytest.mark.parametrize("overrides, message", [
    ((("vae.train", "decoder"),), "config.vae.train: 'decoder' fine-tunes the decoder of an existing VAE"),
    ((("vae.train", "encoder"),), "config.vae.train: 'encoder' is not all or decoder"),
    ((("vae.chroma_weight", -1.0),), "config.vae.chroma_weight: must be >= 0"),
])
def test_bad_vae_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _vae_config(*overrides)
