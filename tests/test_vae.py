"""AutoencoderKL: parity with diffusers, weight import/export round trip, posterior maths, presets, options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from codi_jax.models import vae
from codi_jax.weights import flax_to_torch, load_diffusers, save_diffusers

CHANNELS = (16, 32, 64)  # 4x down, as the embedded default
ALLOWED_AXES = {"embed", "mlp", "heads", "conv_in", "conv_out", "norm", None}


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.manual_seed(0)
    # The reference is built from our tiny preset's exported config, so the parity tests also run the tiny VAE.
    tiny = vae.AutoencoderKL(vae.VAEConfig.preset("tiny", sample_size=16, scaling_factor=0.5))
    ref = TorchAutoencoderKL.from_config(vae.to_diffusers_config(tiny)).eval()
    assert tuple(ref.config.block_out_channels) == CHANNELS
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder, safe_serialization=True)
    module, params = load_diffusers(str(folder), "vae")
    assert module.config == tiny.config
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(nchw(images))).latent_dist
        decoded = ref.decode(torch.from_numpy(nchw(latents))).sample
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    return dict(ref=ref, module=module, params=params, images=images, latents=latents, post=post,
                decoded=nhwc(decoded), encode=encode, decode=decode, tmp=tmp_path_factory)


def test_encode_parity(loaded):
    post = loaded["encode"](loaded["params"], loaded["images"])
    assert post.mean.shape == (2, 4, 4, 4)
    assert np.abs(post.mean - nhwc(loaded["post"].mean)).max() <= 1e-4
    assert np.abs(post.logvar - nhwc(loaded["post"].logvar)).max() <= 1e-4
    np.testing.assert_allclose(post.kl(), loaded["post"].kl().numpy(), rtol=1e-4)
    np.testing.assert_array_equal(post.mode(), post.mean)


def test_decode_parity(loaded):
    out = loaded["decode"](loaded["params"], loaded["latents"])
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    assert np.abs(out - loaded["decoded"]).max() <= 1e-4


def test_round_trip_save_load(loaded):
    folder = loaded["tmp"].mktemp("vae_export")
    save_diffusers(str(folder), "vae", loaded["module"], loaded["params"])
    back = TorchAutoencoderKL.from_pretrained(str(folder)).eval()
    assert back.config.scaling_factor == 0.5 and tuple(back.config.block_out_channels) == CHANNELS
    with torch.no_grad():
        post = back.encode(torch.from_numpy(nchw(loaded["images"]))).latent_dist
        decoded = back.decode(torch.from_numpy(nchw(loaded["latents"]))).sample
    assert np.abs(nhwc(post.mean) - nhwc(loaded["post"].mean)).max() <= 1e-6
    assert np.abs(nhwc(decoded) - loaded["decoded"]).max() <= 1e-6


def test_training_call(loaded):
    module, params, images = loaded["module"], loaded["params"], loaded["images"]
    call = jax.jit(lambda p, x, r: module.apply({"params": p}, x, r))
    recon, post = call(params, images, jax.random.key(3))
    eps = jax.random.normal(jax.random.key(3), post.mean.shape)
    expected = loaded["decode"](params, post.mean + jnp.exp(0.5 * post.logvar) * eps)
    np.testing.assert_allclose(recon, expected, atol=1e-5)


def test_posterior_maths():
    mean = jnp.array([[[[0.5, -1.0]]]])
    post = vae.DiagonalGaussian.from_moments(jnp.concatenate([mean, jnp.array([[[[-50.0, 25.0]]]])], -1))
    np.testing.assert_array_equal(post.logvar, [[[[-30.0, 20.0]]]])  # diffusers' clamp
    # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2), summed.
    expected = 0.5 * sum(m * m + np.exp(lv) - 1 - lv for m, lv in ((0.5, -30.0), (-1.0, 20.0)))
    np.testing.assert_allclose(post.kl(), [expected], rtol=1e-6)
    np.testing.assert_allclose(post.kl(post), [0.0], atol=1e-6)
    key = jax.random.key(0)
    np.testing.assert_allclose(post.sample(key), mean + jnp.exp(0.5 * post.logvar) * jax.random.normal(key, mean.shape))


def test_deprecated_attention_names_are_renamed(loaded):
    ours = flax_to_torch(loaded["params"])
    legacy = {}
    for k, v in ours.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k, v = k.replace(f".{new}.", f".{old}."), (v[:, :, None, None] if v.ndim == 2 else v)
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    prepared = vae.prepare_state_dict(legacy)
    assert set(prepared) == set(ours) and all(np.array_equal(prepared[k], ours[k]) for k in ours)


def test_logical_axes_on_every_param(loaded):
    module = loaded["module"]
    boxed = jax.eval_shape(module.init, jax.random.key(0), *vae.init_inputs(module))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert set(leaf.names) <= ALLOWED_AXES and len(leaf.names) == leaf.value.ndim


def test_bf16_and_remat_options(loaded):
    cfg = loaded["module"].config
    params, latents = loaded["params"], loaded["latents"]
    # remat only changes what the backward pass stores; check the blocks are wrapped (tracing, no compile).
    remat = vae.AutoencoderKL(vae.VAEConfig(**{**cfg.__dict__, "remat": True}))
    jaxpr = lambda m: str(jax.make_jaxpr(jax.grad(
        lambda p: jnp.mean(m.apply({"params": p}, latents, method="decode") ** 2)))(params))
    assert jaxpr(remat).count("remat") > jaxpr(loaded["module"]).count("remat") == 0
    bf16 = vae.AutoencoderKL(vae.VAEConfig(**{**cfg.__dict__, "dtype": jnp.bfloat16}))
    out = jax.jit(lambda p, z: bf16.apply({"params": p}, z, method="decode"))(params, latents)
    assert np.abs(np.asarray(out) - loaded["decoded"]).max() < 0.1


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        vae.from_diffusers_config({"_class_name": "AutoencoderTiny"})
    with pytest.raises(ValueError, match="down_block_types"):
        vae.from_diffusers_config({"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D"] * 2})
    with pytest.raises(ValueError, match="norm_num_groups"):
        vae.VAEConfig(block_out_channels=(24, 48), norm_num_groups=32)
    # The SD 1.x/2.x VAE: 83,653,863 parameters, 8x down.
    sd = vae.AutoencoderKL(vae.VAEConfig.preset("sd"))
    shapes = jax.eval_shape(sd.init, jax.random.key(0), *vae.init_inputs(sd))["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes))) == 83_653_863
    assert sd.config.downsample_factor == 8
    assert vae.from_diffusers_config(vae.to_diffusers_config(sd)).config == sd.config
    with pytest.raises(ValueError, match="divisible by 8"):
        jax.eval_shape(sd.init, jax.random.key(0), jnp.zeros((1, 12, 12, 3)))


@pytest.mark.parametrize("preset, factor", [("tiny", 4), ("tiny2x", 2)])
def test_tiny_preset_shapes(preset, factor):
    # The tiny preset's forward runs (on CPU) in the parity tests above; here only the shapes of both sizes.
    module = vae.AutoencoderKL(vae.VAEConfig.preset(preset))
    images = jnp.zeros((2, 16, 16, 3))
    (recon, post), _ = jax.eval_shape(module.init_with_output, jax.random.key(0), images)
    assert recon.shape == images.shape and post.mean.shape == (2, 16 // factor, 16 // factor, 4)
