"""LPIPS (Zhang et al. 2018, the `lpips` package v0.1) in Flax linen, NHWC, with AlexNet or VGG16 features.

distance(x0, x1) = sum over tapped layers l of mean_hw( w_l . (n(f_l(x0)) - n(f_l(x1)))^2 ),
where f_l are ReLU outputs of the backbone (torchvision's layer structure), n() scales each pixel's feature vector to
unit length, and w_l are the learned 1x1 "lin" heads. Inputs are in [-1, 1], shifted and scaled per channel first
(lpips' ScalingLayer). Convolution parameters are named by their index in torchvision's `features` Sequential
(`conv_3` is `features[3]`), so the weights import by name.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# lpips.pretrained_networks.ScalingLayer: ImageNet statistics expressed for [-1, 1] inputs.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor

_PRECISION = jax.lax.Precision.HIGHEST

# Layer plans in torchvision order: ("conv", features index, out channels, kernel, stride, padding), ("pool", k, s),
# ("tap",) marks a ReLU output that LPIPS compares (lpips' slice1..slice5 boundaries).
NETS = {
    "alex": (
        ("conv", 0, 64, 11, 4, 2), ("tap",), ("pool", 3, 2),
        ("conv", 3, 192, 5, 1, 2), ("tap",), ("pool", 3, 2),
        ("conv", 6, 384, 3, 1, 1), ("tap",),
        ("conv", 8, 256, 3, 1, 1), ("tap",),
        ("conv", 10, 256, 3, 1, 1), ("tap",),
    ),
    "vgg": (
        ("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1), ("tap",), ("pool", 2, 2),
        ("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1), ("tap",), ("pool", 2, 2),
        ("conv", 10, 256, 3, 1, 1), ("conv", 12, 256, 3, 1, 1), ("conv", 14, 256, 3, 1, 1), ("tap",), ("pool", 2, 2),
        ("conv", 17, 512, 3, 1, 1), ("conv", 19, 512, 3, 1, 1), ("conv", 21, 512, 3, 1, 1), ("tap",), ("pool", 2, 2),
        ("conv", 24, 512, 3, 1, 1), ("conv", 26, 512, 3, 1, 1), ("conv", 28, 512, 3, 1, 1), ("tap",),
    ),
}


def tapped_channels(net: str) -> list[int]:
    plan, out, channels = NETS[net], [], 0
    for step in plan:
        if step[0] == "conv":
            channels = step[2]
        elif step[0] == "tap":
            out.append(channels)
    return out


class Backbone(nn.Module):
    """Conv+ReLU feature stack; returns the tapped ReLU outputs."""

    plan: Sequence[tuple]

    @nn.compact
    def __call__(self, x) -> list:
        taps = []
        for step in self.plan:
            if step[0] == "conv":
                _, index, features, k, s, p = step
                x = nn.relu(nn.Conv(features, (k, k), (s, s), padding=((p, p), (p, p)), precision=_PRECISION,
                                    name=f"conv_{index}")(x))
            elif step[0] == "pool":
                x = nn.max_pool(x, (step[1], step[1]), (step[2], step[2]))  # floor mode, as torch's default
            else:
                taps.append(x)
        return taps


class LPIPS(nn.Module):
    """(x0, x1) NHWC in [-1, 1] -> (N,) perceptual distances."""

    net: str = "alex"

    @nn.compact
    def __call__(self, x0, x1):
        if self.net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {self.net!r}")
        n = x0.shape[0]
        x = jnp.concatenate([x0, x1]).astype(jnp.float32)
        x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        taps = Backbone(NETS[self.net], name="net")(x)  # both images in one pass
        total = jnp.zeros((n,), jnp.float32)
        for i, f in enumerate(taps):
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + NORM_EPS)
            d = (f[:n] - f[n:]) ** 2
            w = self.param(f"lin{i}", nn.initializers.ones_init(), (f.shape[-1],))  # 1x1 conv to 1 channel, no bias
            total = total + jnp.mean(jnp.einsum("nhwc,c->nhw", d, w, precision=_PRECISION), axis=(1, 2))
        return total
