"""The adapted network (paper 4.1 / 4.4): equals the pretrained UNet at initialisation in both modes, gradients reach
mu and the conditional encoder, bf16 + remat runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from codi_jax.models import conditional as cond_lib
from codi_jax.models import unet as unet_lib


def _abs_sum(tree):
    return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))


def random_params(module, *inputs, seed=0):
    """Generic random weights from eval_shape (no init compile): fan-in scaled kernels, perturbed norms and biases."""
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    r = np.random.RandomState(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            return jnp.asarray(r.randn(*s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1])))
        base = 1.0 if "scale" in name else 0.0
        return jnp.asarray(base + 0.05 * r.randn(*s.shape).astype(np.float32))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def setup():
    ucfg = unet_lib.UNetConfig.preset("tiny")
    unet = unet_lib.UNet2DConditionModel(ucfg)
    k = jax.random.split(jax.random.key(0), 4)
    z = jax.random.normal(k[0], (2, 8, 8, 4))
    t = jnp.array([5, 730])
    ctx = jax.random.normal(k[1], (2, 3, 32))
    cond = jax.random.uniform(k[2], (2, 32, 32, 3))
    params = random_params(unet, z, t, ctx)
    plain = jax.jit(unet.apply)({"params": params}, z, t, ctx)
    target = jax.random.normal(k[3], plain.shape)
    return ucfg, params, (z, t, ctx, cond), plain, target


def loss_and_grad(module, frozen=None):
    """jit(value_and_grad) of an MSE, with the prediction as aux; `frozen` = top-level keys held fixed."""
    def loss(trainable, fixed, inputs, target):
        out = module.apply({"params": {**trainable, **fixed}}, *inputs)
        return jnp.mean((out - target) ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def split(params, frozen):
    return ({k: v for k, v in params.items() if k not in frozen}, {k: v for k, v in params.items() if k in frozen})


def test_init_from_unet_copies(setup):
    ucfg, params, *_ = setup
    cfg = cond_lib.ConditionalConfig.tiny("mu")
    module, p = cond_lib.init_from_unet(jax.random.key(1), cfg, params)
    assert set(p) == {"unet", "control", "mu"} and float(p["mu"]) == 0.0 and p["mu"].shape == ()
    for name in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
        for a, b in zip(jax.tree.leaves(p["control"][name]), jax.tree.leaves(params[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hint = p["control"]["controlnet_cond_embedding"]
    assert _abs_sum(hint["conv_out"]) == 0.0
    k_in = np.asarray(hint["conv_in"]["kernel"])  # lecun-normal scale: std * sqrt(fan_in) ~ 1
    assert k_in.shape == (3, 3, 3, 8) and 0.6 < k_in.std() * np.sqrt(27) < 1.4
    assert np.abs(k_in).max() <= 2 / np.sqrt(27) / 0.8796 + 1e-6  # truncated at 2 sigma
    assert not np.array_equal(k_in, np.asarray(hint["blocks_0"]["kernel"])[:, :, :3])
    assert not any(k.startswith("controlnet_down_blocks") for k in p["control"])  # mu form: no zero convs
    _, pc = cond_lib.init_from_unet(jax.random.key(1), cond_lib.ConditionalConfig.tiny("controlnet"), params)
    assert "mu" not in pc and _abs_sum({k: v for k, v in pc["control"].items() if k.startswith("controlnet_")
                                        and k != "controlnet_cond_embedding"}) == 0.0
    with pytest.raises(ValueError, match="mode"):
        cond_lib.ConditionalConfig.create(ucfg, "lora")
    with pytest.raises(ValueError, match="block_out_channels"):
        cond_lib.ConditionalConfig(unet=ucfg, control=cond_lib.ControlNetConfig.from_unet(
            unet_lib.UNetConfig.preset("tiny", block_out_channels=(16, 32))))


def test_mu_mode(setup):
    """Full CoDi: equals the UNet at init; gradients reach mu and the whole encoder.

    At the exact init h_eta == h_theta (the encoder is a copy and the hint's last conv is zero), so d/dmu = <dL/dh',
    h_eta - h_theta> = 0 and mu gates the encoder's gradient: only the UNet learns at step 0. One UNet update breaks
    the tie, then mu gets a gradient, and once mu != 0 the encoder (and the hint's last conv) do.
    """
    ucfg, params, inputs, plain, target = setup
    module, p = cond_lib.init_from_unet(jax.random.key(1), cond_lib.ConditionalConfig.tiny("mu"), params)
    vg = loss_and_grad(module)
    (loss0, out0), g0 = vg(p, {}, inputs, target)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(plain))  # (1 - 0) h + 0 h_eta == h, bit for bit
    assert _abs_sum(g0["unet"]) > 0
    assert float(g0["mu"]) == 0.0 and _abs_sum(g0["control"]) == 0.0

    p1 = {**p, "unet": jax.tree.map(lambda w, g: w - 1e-2 * g, p["unet"], g0["unet"])}  # one SGD step
    (loss1, _), g1 = vg(p1, {}, inputs, target)
    assert float(loss1) < float(loss0)
    assert abs(float(g1["mu"])) > 0

    p2 = {**p1, "mu": jnp.float32(0.5)}
    (_, out2), g2 = vg(p2, {}, inputs, target)
    assert np.abs(np.asarray(out2) - np.asarray(plain)).max() > 1e-4
    for name in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
        assert _abs_sum(g2["control"][name]) > 0, name
    hint = g2["control"]["controlnet_cond_embedding"]
    assert _abs_sum(hint["conv_out"]) > 0  # the zero-initialised last hint conv starts learning
    assert _abs_sum(hint["conv_in"]) == 0.0  # ... and gates the rest of the hint net until it is nonzero


def test_controlnet_mode(setup):
    """PE-CoDi: equals the UNet at init; with the UNet frozen the zero convs get gradients."""
    ucfg, params, inputs, plain, target = setup
    cfg = cond_lib.ConditionalConfig.tiny("controlnet")
    module, p = cond_lib.init_from_unet(jax.random.key(2), cfg, params)
    trainable, frozen = split(p, ("unet",))
    assert set(trainable) == {"control"}
    vg = loss_and_grad(module)
    (_, out), g = vg(trainable, frozen, inputs, target)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))  # zero convs add exact zeros
    zero_convs = {k: v for k, v in g["control"].items() if k.startswith("controlnet_") and "cond" not in k}
    assert len(zero_convs) == 5  # conv_in + 2 down outputs of block 0 + 1 of block 1 + mid
    for name, grads in zero_convs.items():
        assert _abs_sum(grads["kernel"]) > 0, name


def test_bf16_remat_runs(setup):
    """bf16 compute with float32 params and remat in every block: finite, close to float32, float32 grads.
    (A one-level UNet keeps the compile cheap; the dtype/remat plumbing is the same at any depth.)"""
    _, _, (z, t, ctx, cond), _, target = setup
    kw = dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
              up_block_types=("CrossAttnUpBlock2D",))
    f32 = cond_lib.ConditionalConfig.tiny("mu", **kw)
    fast = cond_lib.ConditionalConfig.tiny("mu", dtype=jnp.bfloat16, remat=True, **kw)
    assert fast.control.dtype == jnp.bfloat16 and fast.control.remat
    unet = unet_lib.UNet2DConditionModel(f32.unet)
    module32, p = cond_lib.init_from_unet(jax.random.key(3), f32, random_params(unet, z, t, ctx, seed=1))
    p = {**p, "mu": jnp.float32(0.25)}
    inputs = (z, t, ctx, cond)
    ref = jax.jit(module32.apply)({"params": p}, *inputs)
    (loss, out), g = loss_and_grad(cond_lib.ConditionalUNet(fast))(p, {}, inputs, target)
    assert out.dtype == jnp.float32 and np.isfinite(float(loss))
    # bf16 keeps ~3 significant digits; the output is O(1).
    err = np.abs(np.asarray(out) - np.asarray(ref))
    assert err.mean() < 0.05 and err.max() < 0.5, (err.mean(), err.max())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
    assert _abs_sum(g["control"]) > 0 and _abs_sum(g["unet"]) > 0 and np.isfinite(float(g["mu"]))


def test_every_param_has_logical_axes():
    """Every param (UNet, encoder, hint, zero convs, mu) carries logical names from the shared vocabulary."""
    vocab = {"embed", "mlp", "heads", "vocab", "position", "conv_in", "conv_out", "norm", None}
    for mode in ("mu", "controlnet"):
        cfg = cond_lib.ConditionalConfig.tiny(mode)
        boxed = jax.eval_shape(cond_lib.ConditionalUNet(cfg).init, jax.random.key(0), *cond_lib.init_inputs(cfg))
        leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        for x in leaves:
            assert len(x.names) == x.value.ndim and set(x.names) <= vocab, x.names
        specs = nn.get_partition_spec(boxed["params"])
        assert specs["unet"]["conv_in"]["kernel"] == jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out")
        if mode == "mu":
            assert specs["mu"] == jax.sharding.PartitionSpec()
