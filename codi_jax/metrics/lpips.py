"""LPIPS distance with user-supplied weights (codi_jax/models/lpips.py is the network).

    model = load_lpips("lpips_alex.safetensors", net="alex")
    d = lpips_distance(model, images0, images1)          # (N,) float64; images uint8 or float in [0, 1], NHWC

The weights are one safetensors file holding the backbone and the linear heads, with the `lpips` package's state-dict
names. Nothing is downloaded: the backbone is torchvision's ImageNet AlexNet/VGG16, which the `lpips` package fetches
through torchvision on first use, so make the file once on a machine that has (or can fetch) those weights:

    import lpips                                        # pip install lpips==0.1.4 (brings torch and torchvision)
    from safetensors.torch import save_file
    model = lpips.LPIPS(net="alex")                     # or net="vgg"; ImageNet backbone + the v0.1 linear heads
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lins.")}
    save_file(state, "lpips_alex.safetensors")          # `lins.*` alias `lin*`; safetensors refuses shared tensors

Keys read: net.slice{1..5}.{i}.weight/bias (i = torchvision `features` index), lin{0..4}.model.1.weight (or
lins.{0..4}.model.1.weight), and optionally scaling_layer.shift/scale, which are checked against the fixed constants.
"""

import dataclasses
import functools
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from codi_jax.metrics import MetricUnavailable
from codi_jax.metrics.image import as_unit_float
from codi_jax.models.lpips import LPIPS, NETS, SCALE, SHIFT

_CONV = re.compile(r"net\.slice\d+\.(\d+)\.(weight|bias)")
_LIN = re.compile(r"(?:lin(\d+)|lins\.(\d+))\.model\.1\.weight")


@dataclasses.dataclass(frozen=True)
class Lpips:
    net: str           # "alex" or "vgg"
    variables: dict    # Flax variables of models.lpips.LPIPS(net)


def params_from_state_dict(tensors: dict[str, np.ndarray], net: str) -> dict:
    """`lpips` package state dict (PyTorch layouts) -> Flax variables of LPIPS(net); raises naming what is wrong."""
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
    params: dict = {"net": {}}
    unexpected = []
    for key, value in tensors.items():
        value = np.asarray(value, np.float32)
        if m := _CONV.fullmatch(key):
            layer = params["net"].setdefault(f"conv_{m.group(1)}", {})
            layer["kernel" if m.group(2) == "weight" else "bias"] = (
                value.transpose(2, 3, 1, 0) if m.group(2) == "weight" else value)
        elif m := _LIN.fullmatch(key):
            params[f"lin{m.group(1) or m.group(2)}"] = value.reshape(-1)  # (1, C, 1, 1) -> (C,)
        elif key in ("scaling_layer.shift", "scaling_layer.scale"):
            want = SHIFT if key.endswith("shift") else SCALE
            if not np.allclose(value.reshape(-1), want, atol=1e-6):
                raise ValueError(f"LPIPS weights: {key} is {value.reshape(-1)}, expected {want}")
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"LPIPS weights: unexpected keys {sorted(unexpected)[:8]} (is this an lpips state dict?)")
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = _expected_shapes(net)
    missing = sorted(set(want) - set(got))
    wrong = sorted((k, got[k], want[k]) for k in set(want) & set(got) if got[k] != want[k])
    extra = sorted(set(got) - set(want))
    if missing or wrong or extra:
        raise ValueError(f"LPIPS weights do not fit net={net!r}: missing {missing[:6]}, wrong shape {wrong[:4]}, "
                         f"unexpected {extra[:6]}")
    return {"params": params}


@functools.cache
def _expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    x = jnp.zeros((1, 64, 64, 3))
    shapes = jax.eval_shape(LPIPS(net).init, jax.random.key(0), x, x)
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(shapes["params"])}


def load_lpips(path: str | os.PathLike | None = None, net: str = "alex") -> Lpips:
    """Reads LPIPS weights from safetensors. No path, or no file there: MetricUnavailable (see the module docstring)."""
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
    if path is None:
        raise MetricUnavailable(
            f"LPIPS({net}): no weights given; pass a safetensors file with the {net} backbone and the lpips linear "
            f"heads (made once from the lpips package, see codi_jax.metrics.lpips)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise MetricUnavailable(f"LPIPS({net}): weights file {path} does not exist")
    return Lpips(net, params_from_state_dict(load_file(str(path)), net))


@functools.partial(jax.jit, static_argnames="net")
def _distance(variables, x0, x1, net):
    return LPIPS(net).apply(variables, x0 * 2.0 - 1.0, x1 * 2.0 - 1.0)


def lpips_distance(model: Lpips, images0, images1, batch_size: int = 32) -> np.ndarray:
    """(N,) float64 distances between paired NHWC images (uint8, or float in [0, 1]; mapped to [-1, 1] as lpips'
    normalize=True). The last batch is padded so that one program serves every call of one image size."""
    x0, x1 = as_unit_float(images0), as_unit_float(images1)
    if x0.shape != x1.shape:
        raise ValueError(f"paired images must have equal shapes, got {x0.shape} and {x1.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x0, x1 = np.clip(x0, 0.0, 1.0), np.clip(x1, 0.0, 1.0)
    n = x0.shape[0]
    out = np.empty((n,), np.float64)
    for start in range(0, n, batch_size):
        a, b = x0[start:start + batch_size], x1[start:start + batch_size]
        m = a.shape[0]
        if m < batch_size:
            pad = np.zeros((batch_size - m, *a.shape[1:]), a.dtype)
            a, b = np.concatenate([a, pad]), np.concatenate([b, pad])
        out[start:start + m] = np.asarray(_distance(model.variables, jnp.asarray(a), jnp.asarray(b), model.net))[:m]
    return out

