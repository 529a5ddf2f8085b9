"""AutoencoderKL (the Stable Diffusion VAE) in Flax, NHWC, with diffusers semantics and parameter names.

encode(images in [-1, 1]) -> DiagonalGaussian over latents; decode(latents) -> images. Neither applies
config.scaling_factor: as in diffusers, the caller multiplies latents by it after encoding and divides before decoding.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.models import layers

Dtype = Any


@flax.struct.dataclass
class DiagonalGaussian:
    """diffusers' DiagonalGaussianDistribution over NHWC latents (a pytree, so it leaves jit)."""

    mean: jax.Array    # (B, h, w, latent_channels), float32
    logvar: jax.Array  # (B, h, w, latent_channels), float32, clipped to [-30, 20]

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other), other defaulting to N(0, I); summed over (h, w, c) -> (B,)."""
        if other is None:
            kl = self.mean ** 2 + self.var - 1.0 - self.logvar
        else:
            kl = ((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar
                  + other.logvar)
        return 0.5 * jnp.sum(kl, axis=(1, 2, 3))

    def nll(self, sample: jax.Array) -> jax.Array:
        """Negative log-likelihood of `sample`, summed over (h, w, c) -> (B,)."""
        return 0.5 * jnp.sum(np.log(2.0 * np.pi) + self.logvar + (sample - self.mean) ** 2 / self.var, axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config (field names as in its config.json) plus our compute options."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32  # compute dtype; params stay float32
    remat: bool = False

    def __post_init__(self):
        layers.get_activation(self.act_fn)  # raises on an unknown name
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                                 f"norm_num_groups {self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, name: str, **overrides) -> "VAEConfig":
        """sd: the SD 1.x/2.x VAE (8x down). tiny: (16, 32, 64), 4x down. tiny2x: (32, 64), 2x down."""
        presets = {
            "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                       sample_size=512, scaling_factor=0.18215),
            "tiny": dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32,
                         scaling_factor=1.0),
            "tiny2x": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, sample_size=32,
                           scaling_factor=1.0),
        }
        if name not in presets:
            raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_downsample: bool
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = layers.ResnetBlock2D(self.out_channels, groups=self.groups, eps=1e-6, act_fn=self.act_fn,
                                     dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            # padding=0: diffusers pads (0, 1, 0, 1) then convolves unpadded; a symmetric pad would shift the grid.
            x = layers.Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return layers.constrain_image(x)


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_upsample: bool
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = layers.ResnetBlock2D(self.out_channels, groups=self.groups, eps=1e-6, act_fn=self.act_fn,
                                     dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = layers.Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return layers.constrain_image(x)


class UNetMidBlock2D(nn.Module):
    """resnets_0 -> attentions_0 (single-head, group-normed, residual) -> resnets_1, as diffusers' VAE mid block."""

    channels: int
    groups: int
    act_fn: str
    add_attention: bool = True
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x):
        res = lambda i: layers.ResnetBlock2D(self.channels, groups=self.groups, eps=1e-6, act_fn=self.act_fn,
                                             dtype=self.dtype, name=f"resnets_{i}")
        x = res(0)(x)
        if self.add_attention:
            x = layers.Attention(self.channels, heads=1, dim_head=self.channels, bias=True,
                                 norm_num_groups=self.groups, eps=1e-6, residual_connection=True,
                                 upcast_attention=True, dtype=self.dtype, name="attentions_0")(x)
        x = res(1)(x)
        return layers.constrain_image(x)


def _maybe_remat(cls, remat: bool):
    return nn.remat(cls) if remat else cls


class Encoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = layers.Conv(c.block_out_channels[0], 3, dtype=c.dtype, name="conv_in")(x)
        n = len(c.block_out_channels)
        for i, ch in enumerate(c.block_out_channels):
            x = _maybe_remat(DownEncoderBlock2D, c.remat)(
                ch, c.layers_per_block, c.norm_num_groups, c.act_fn, add_downsample=i < n - 1, dtype=c.dtype,
                name=f"down_blocks_{i}")(x)
        x = _maybe_remat(UNetMidBlock2D, c.remat)(c.block_out_channels[-1], c.norm_num_groups, c.act_fn,
                                                   c.mid_block_add_attention, dtype=c.dtype, name="mid_block")(x)
        x = layers.GroupNorm(c.norm_num_groups, 1e-6, dtype=c.dtype, name="conv_norm_out")(x)
        x = layers.get_activation(c.act_fn)(x)
        return layers.Conv(2 * c.latent_channels, 3, dtype=c.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        c = self.config
        x = layers.Conv(c.block_out_channels[-1], 3, dtype=c.dtype, name="conv_in")(z)
        x = _maybe_remat(UNetMidBlock2D, c.remat)(c.block_out_channels[-1], c.norm_num_groups, c.act_fn,
                                                   c.mid_block_add_attention, dtype=c.dtype, name="mid_block")(x)
        rev = tuple(reversed(c.block_out_channels))
        for i, ch in enumerate(rev):
            x = _maybe_remat(UpDecoderBlock2D, c.remat)(
                ch, c.layers_per_block + 1, c.norm_num_groups, c.act_fn, add_upsample=i < len(rev) - 1,
                dtype=c.dtype, name=f"up_blocks_{i}")(x)
        x = layers.GroupNorm(c.norm_num_groups, 1e-6, dtype=c.dtype, name="conv_norm_out")(x)
        x = layers.get_activation(c.act_fn)(x)
        return layers.Conv(c.out_channels, 3, dtype=c.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL. Images NHWC in [-1, 1]; latents NHWC with config.latent_channels channels."""

    config: VAEConfig

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = layers.Conv(2 * c.latent_channels, 1, padding=0, dtype=c.dtype)
        if c.use_post_quant_conv:
            self.post_quant_conv = layers.Conv(c.latent_channels, 1, padding=0, dtype=c.dtype)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """(B, H, W, in_channels) -> posterior over (B, H/f, W/f, latent_channels), f = config.downsample_factor."""
        self._check_spatial(images, self.config.downsample_factor, "images")
        h = self.encoder(images.astype(self.config.dtype))
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels) float32 images (unclipped)."""
        z = latents.astype(self.config.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None, sample_posterior: bool = True):
        """Reconstruction for VAE training -> (reconstruction, posterior).

        The posterior sample uses `rng`, else the 'posterior' rng stream (init falls back to 'params').
        """
        posterior = self.encode(images)
        if sample_posterior:
            z = posterior.sample(self.make_rng("posterior") if rng is None else rng)
        else:
            z = posterior.mode()
        return self.decode(z), posterior

    @staticmethod
    def _check_spatial(x, factor: int, what: str):
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"{what} must be NHWC with height and width divisible by {factor}; got {x.shape}")


# ----------------------------------------------------------------------------------------------------------------------
# diffusers config.json <-> module, and checkpoint key normalisation.

_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
           "norm_num_groups", "act_fn", "sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
           "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def from_diffusers_config(d: Mapping[str, Any], **overrides) -> AutoencoderKL:
    """AutoencoderKL from a diffusers vae/config.json dict; unsupported variants raise ValueError."""
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"VAE class {name!r} is not supported; only diffusers AutoencoderKL is")
    n = len(d.get("block_out_channels", VAEConfig.block_out_channels))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = tuple(d.get(key, (want,) * n))
        if types != (want,) * n:
            raise ValueError(f"VAE {key} {types} is not supported; expected {n} x {want!r}")
    if d.get("norm_type", "group") != "group":
        raise ValueError(f"VAE norm_type {d['norm_type']!r} is not supported (only 'group')")
    kw = {k: d[k] for k in _FIELDS if k in d}
    for k in ("block_out_channels", "latents_mean", "latents_std"):
        if kw.get(k) is not None:
            kw[k] = tuple(kw[k])
    if isinstance(kw.get("sample_size"), (list, tuple)):
        kw["sample_size"] = int(kw["sample_size"][0])
    return AutoencoderKL(VAEConfig(**{**kw, **overrides}))


def to_diffusers_config(module: AutoencoderKL) -> dict:
    """The config.json diffusers' AutoencoderKL.from_pretrained reads."""
    c = module.config
    n = len(c.block_out_channels)
    d = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
         "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    for k in _FIELDS:
        v = getattr(c, k)
        d[k] = list(v) if isinstance(v, tuple) else v
    return d


def init_inputs(module: AutoencoderKL) -> tuple:
    """Smallest image batch for module.init / eval_shape (the posterior sample falls back to the 'params' rng)."""
    f = module.config.downsample_factor
    return (jnp.zeros((1, f, f, module.config.in_channels), jnp.float32),)


# Pre-0.14 diffusers (and some hub VAEs) name the mid-block attention query/key/value/proj_attn.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def prepare_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """VAE safetensors keys -> current diffusers names (renames deprecated attention keys; apply before convert)."""
    out = {}
    for k, v in state_dict.items():
        m = _DEPRECATED_RE.match(k)
        if m:
            k = f"{m[1]}.{_DEPRECATED_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and np.ndim(v) == 4:  # LDM stored them as 1x1 convs
                v = np.asarray(v)[:, :, 0, 0]
        out[k] = v
    return out
