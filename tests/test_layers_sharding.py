"""Sharding constraints the layers put into the traced step (benchmarks/README.md, "The v4-32 anomaly"): every Conv /
Dense kernel is gathered (replicated) at its use, and Upsample2D's conv input stays batch-sharded."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax import parallel
from codi_jax.models import layers


def _constraints(module, x):
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    with nn.logical_axis_rules(parallel.DEFAULT_RULES), jax.set_mesh(mesh):
        params = module.init(jax.random.PRNGKey(0), x)
        jaxpr = jax.make_jaxpr(module.apply)(params, x)
    return [(e.invars[0].aval.shape, tuple(e.params["sharding"].spec)) for e in jaxpr.eqns
            if e.primitive.name == "sharding_constraint"]


def _replicated(spec):
    return all(s is None for s in spec)


def test_kernels_gathered_at_use():
    conv = _constraints(layers.Conv(8, 3, dtype=jnp.bfloat16), jnp.ones((2, 4, 4, 4)))
    assert any(shape == (3, 3, 4, 8) and _replicated(spec) for shape, spec in conv)
    dense = _constraints(layers.Dense(6, axes=("embed", "mlp")), jnp.ones((2, 5)))
    assert any(shape == (5, 6) and _replicated(spec) for shape, spec in dense)


def test_upsample_conv_input_batch_sharded():
    found = _constraints(layers.Upsample2D(4), jnp.ones((2, 3, 3, 4)))
    assert any(shape == (2, 6, 6, 4) and spec[0] == parallel.BATCH_AXES for shape, spec in found)


def test_no_constraint_without_rules():
    # Outside a mesh / rules (the CPU tests, sampling on one device) the layers trace exactly as before.
    x = jnp.ones((2, 4, 4, 4))
    conv = layers.Conv(8, 3)
    params = conv.init(jax.random.PRNGKey(0), x)
    eqns = jax.make_jaxpr(conv.apply)(params, x).eqns
    assert not [e for e in eqns if e.primitive.name == "sharding_constraint"]
