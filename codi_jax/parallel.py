"""Device mesh, logical-axis rules and shardings.

Modules name their parameter and activation axes logically ('embed', 'mlp', 'heads', 'conv_in', ...); the config maps those
names to the three mesh axes ('data', 'fsdp', 'tensor'). Shardings for a whole pytree come from its abstract (eval_shape)
value, so nothing is materialised before it is placed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that holds distinct data.
BATCH_AXES = ("data", "fsdp")

# Default rules: FSDP shards parameters over their input width, tensor parallelism over their output width.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    ("position", None),
    ("norm", None),
    ("height", None),
    ("width", None),
    ("length", None),
    ("act_channels", "tensor"),
    ("act_embed", "tensor"),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves -1 entries (at most one) so the product equals num_devices; raises a clear error otherwise."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
    sizes = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {fill}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(mesh_config)}: the fixed axes ({known} devices) do not divide the {num_devices} devices"
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"config.mesh {dict(mesh_config)} needs {math.prod(sizes.values())} devices but {num_devices} are available"
        )
    return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (jax.make_mesh defaults to Explicit)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # noqa: BLE001 - abstract/foreign topologies the mesh utilities cannot reason about.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    if not rules:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh.shape[axes]
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops the mesh axes of any dimension they do not divide, so odd sizes (3 RGB channels, 1 depth channel)
    stay replicated instead of failing to shard."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, axes in zip(shape, entries):
        if axes is not None and dim % _axis_size(mesh, axes) != 0:
            axes = None
        fitted.append(axes)
    return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a pytree that may hold nn.LogicallyPartitioned boxes (from eval_shape of an init).

    Leaves without logical names are replicated. The result has the structure of the *unboxed* tree.
    """
    specs = nn.get_partition_spec(abstract_tree)
    unboxed = nn.meta.unbox(abstract_tree)

    def to_sharding(spec, leaf):
        if leaf is None or not hasattr(leaf, "shape"):
            # An absent optional subtree (TrainState.target_params when unused), or optax's MaskedNode where a
            # masked transform (weight decay, mu's own Adam) keeps no state for a parameter inside a logical box.
            return leaf
        spec = logical_to_mesh_spec(spec if isinstance(spec, P) else P(), rules)
        return NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh))

    return jax.tree.map(to_sharding, specs, unboxed, is_leaf=lambda x: isinstance(x, P) or x is None)


def logical_to_mesh_spec(logical: P, rules) -> P:
    """Maps logical names to mesh axes by the first matching rule. A mesh axis is used once per array: a square
    ('embed', 'embed') kernel shards its first dimension and replicates the second."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        axes = table.get(name) if isinstance(name, str) else None
        if axes is not None:
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
            if used.intersection(axes_t):
                axes = None
            else:
                used.update(axes_t)
        out.append(axes)
    return P(*out)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the per-process slices of a global batch into global jax.Arrays sharded along the batch axes."""
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OUS":  # Captions and other strings never reach the device.
            continue
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


def put_global(tree: Any, shardings: Any) -> Any:
    """Places host numpy values (identical on every process) as global arrays with the given shardings."""

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)
