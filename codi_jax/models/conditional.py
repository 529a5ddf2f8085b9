"""The adapted conditional network of CoDi (paper 4.1 / 4.4): a pretrained UNet plus a conditional encoder eta.

mode 'mu' (full CoDi, eq. 12): every skip feature and the mid output entering the decoder become
    h'_k = (1 - mu) h_theta,k + mu h_eta,k,   mu a learnable scalar initialised to 0; everything is trained.
mode 'controlnet' (PE-CoDi / ControlNet): h'_k = h_theta,k + zero_conv_k(h_eta,k); only 'control' is trained.

params = {'unet': ..., 'control': ..., 'mu': ()}   ('mu' only in mode 'mu'). With init_from_unet the encoder starts
as a copy of the pretrained one and the adapted model's output equals the pretrained UNet's exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.models.controlnet import ControlNetConfig, ControlNetModel
from codi_jax.models.unet import UNet2DConditionModel, UNetConfig

MODES = ("mu", "controlnet")
# The control encoder's parts that start as copies of the pretrained UNet (docs/algorithm.md, "The conditional network").
COPIED_FROM_UNET = ("conv_in", "time_embedding", "down_blocks_", "mid_block")


@dataclasses.dataclass(frozen=True)
class ConditionalConfig:
    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    control: ControlNetConfig = dataclasses.field(default_factory=lambda: ControlNetConfig.from_unet(UNetConfig()))
    mode: str = "mu"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown conditional mode {self.mode!r}; expected one of {MODES}")
        want_zero = self.mode == "controlnet"
        if self.control.zero_convs != want_zero:
            object.__setattr__(self, "control", dataclasses.replace(self.control, zero_convs=want_zero))
        u, c = self.unet, self.control
        differ = [f"{k}={getattr(c, k)} (UNet: {getattr(u, k)})"
                  for k in ("in_channels", "flip_sin_to_cos", "freq_shift", "act_fn", "block_out_channels",
                            "down_block_types", "layers", "heads", "transformer_layers", "norm_num_groups",
                            "cross_attention_dim", "use_linear_projection") if getattr(u, k) != getattr(c, k)]
        if differ:
            raise ValueError(f"control encoder differs from the UNet's: {'; '.join(differ)}; it must mirror the UNet "
                             "encoder (its features enter the UNet's decoder)")

    @classmethod
    def create(cls, unet: UNetConfig, mode: str = "mu", **control_kw) -> "ConditionalConfig":
        """The usual way: the encoder mirrors `unet`; control_kw set the hint net (conditioning_channels, ...)."""
        return cls(unet=unet, control=ControlNetConfig.from_unet(unet, **control_kw), mode=mode)

    @classmethod
    def tiny(cls, mode: str = "mu", **unet_kw) -> "ConditionalConfig":
        return cls.create(UNetConfig.preset("tiny", **unet_kw), mode, conditioning_embedding_out_channels=(8, 16, 16))


class ConditionalUNet(nn.Module):
    """(latents NHWC, timesteps, text embeddings, condition image NHWC at hint_factor x latent size) -> prediction."""
    config: ConditionalConfig

    @nn.compact
    def __call__(self, latents, timesteps, text_embeddings, cond_image_nhwc, conditioning_scale=1.0):
        cfg = self.config
        control = ControlNetModel(cfg.control, name="control")
        unet = UNet2DConditionModel(cfg.unet, name="unet")
        if cfg.mode == "mu":
            mu = self.param("mu", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), (), jnp.float32)
            h_eta = control(latents, timesteps, text_embeddings, cond_image_nhwc)
            return unet(latents, timesteps, text_embeddings, mix_features=h_eta, mix_weight=mu)
        down, mid = control(latents, timesteps, text_embeddings, cond_image_nhwc, conditioning_scale)
        return unet(latents, timesteps, text_embeddings, down, mid)


def init_inputs(config: ConditionalConfig, batch: int = 1):
    """Dummy (latents, timesteps, text, cond image) at the UNet's sample size."""
    u, c = config.unet, config.control
    s = u.sample_size
    return (jnp.zeros((batch, s, s, u.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, 1, u.cross_attention_dim), jnp.float32),
            jnp.zeros((batch, s * c.hint_factor, s * c.hint_factor, c.conditioning_channels), jnp.float32))


def copy_encoder_from_unet(control_params: Mapping, unet_params: Mapping) -> dict:
    """control_params with conv_in, time_embedding, down_blocks_*, mid_block replaced by the UNet's (hint/zero kept)."""
    out = dict(control_params)
    for k, v in unet_params.items():
        if any(k == p or (p.endswith("_") and k.startswith(p)) for p in COPIED_FROM_UNET):
            if k not in out:
                raise ValueError(f"control encoder has no {k!r} to copy the UNet's into")
            if jax.tree.structure(out[k]) != jax.tree.structure(v) or any(
                    a.shape != b.shape for a, b in zip(jax.tree.leaves(out[k]), jax.tree.leaves(v))):
                raise ValueError(f"control encoder {k!r} does not match the UNet's (shapes or structure differ)")
            out[k] = jax.tree.map(lambda a: np.array(a, copy=True), v)  # host copy: no per-shape device op
    return out


def _init_hint(key, shapes: Mapping) -> dict:
    """The hint net's fresh weights on the host: lecun-normal kernels (truncated at 2 sigma, as flax's default),
    zero biases, zero last conv. Drawn with numpy from `key`: XLA's CPU compile of the threefry init takes ~10 s."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())

    def draw(path, s):
        names = [getattr(p, "key", "") for p in path]
        if names[-1] != "kernel" or names[0] == "conv_out":
            return np.zeros(s.shape, np.float32)
        x = rng.standard_normal(s.shape)
        while np.any(np.abs(x) > 2):  # resample the tails: a truncated normal
            bad = np.abs(x) > 2
            x[bad] = rng.standard_normal(int(bad.sum()))
        std = 1.0 / np.sqrt(np.prod(s.shape[:-1])) / 0.87962566103423978  # unit variance after truncation
        return (x * std).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def init_from_unet(key, config: ConditionalConfig, unet_params: Mapping) -> tuple[ConditionalUNet, dict]:
    """(module, params) with pretrained `unet_params`, a control encoder copied from them, a fresh hint net (last conv
    zero), zero convs, and mu = 0. Params are plain arrays (no partitioning boxes).

    Shapes come from eval_shape and the few fresh weights are drawn on the host, so this compiles nothing.
    """
    unet_params = nn.meta.unbox(unet_params)
    c = config.control
    shapes = nn.meta.unbox(jax.eval_shape(ControlNetModel(c).init, key, *init_inputs(config))["params"])
    control = {"controlnet_cond_embedding": _init_hint(key, shapes["controlnet_cond_embedding"])}
    for k, v in shapes.items():
        if k.startswith("controlnet_") and k != "controlnet_cond_embedding":  # zero convs: weight and bias zero
            control[k] = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), v)
        elif k not in control:
            control[k] = v
    # The encoder gets its own buffers (a donated train state must not alias the UNet's).
    params = {"unet": unet_params, "control": jax.device_put(copy_encoder_from_unet(control, unet_params))}
    leftover = [k for k, v in params["control"].items() if any(isinstance(x, jax.ShapeDtypeStruct)
                                                               for x in jax.tree.leaves(v))]
    if leftover:
        raise ValueError(f"control encoder parts {leftover} are neither copied from the UNet nor initialised")
    if config.mode == "mu":
        params["mu"] = jnp.zeros((), jnp.float32)
    return ConditionalUNet(config), params


__all__ = ["COPIED_FROM_UNET", "ConditionalConfig", "ConditionalUNet", "MODES", "copy_encoder_from_unet",
           "init_from_unet", "init_inputs"]
