"""The conditional encoder eta (diffusers ControlNetModel semantics and names), NHWC.

Input: conv_in(z_t) + controlnet_cond_embedding(c), then a copy of the UNet's down blocks and mid block.
With zero convs (ControlNet / PE-CoDi) it returns residuals (down_residuals, mid_residual) scaled by conditioning_scale;
without them (`zero_convs=False`, full CoDi's mu form) it returns the raw features h_eta = (skips, mid).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from codi_jax.models import layers
from codi_jax.models.unet import (_ENCODER_KEYS, _REQUIRED_DEFAULTS, EncoderConfig, UNetConfig, check_supported,
                                  encoder_features, time_embedding)

_CN_REQUIRED_DEFAULTS = {k: v for k, v in _REQUIRED_DEFAULTS.items()
                         if k in ("class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim",
                                  "encoder_hid_dim_type", "resnet_time_scale_shift", "addition_time_embed_dim",
                                  "projection_class_embeddings_input_dim")}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(EncoderConfig):
    """ControlNetModel options: the UNet encoder's fields plus the hint network's."""
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)  # hint net widths; len-1 stride-2 convs
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False
    zero_convs: bool = True  # False: no controlnet_down_blocks / controlnet_mid_block, return raw h_eta

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "conditioning_embedding_out_channels",
                           tuple(self.conditioning_embedding_out_channels))
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"unknown controlnet_conditioning_channel_order "
                             f"{self.controlnet_conditioning_channel_order!r}")

    @property
    def hint_factor(self) -> int:
        """Condition image size / latent size."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **kw) -> "ControlNetConfig":
        """The encoder of `unet` (same widths, blocks, heads, dtype, remat) plus hint options in kw."""
        fields = {k: getattr(unet, k) for k in _ENCODER_KEYS}
        return cls(**{**fields, "dtype": unet.dtype, "remat": unet.remat, **kw})

    @classmethod
    def tiny(cls, **kw) -> "ControlNetConfig":
        return cls.from_unet(UNetConfig.preset("tiny"), **{"conditioning_embedding_out_channels": (8, 16, 16), **kw})

    @classmethod
    def from_diffusers(cls, d: dict, **kw) -> "ControlNetConfig":
        check_supported(d, _CN_REQUIRED_DEFAULTS, "ControlNetModel")
        if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
            raise ValueError("mid_block_type=None is not supported")
        if d.get("conditioning_embedding_out_channels", ()) is None:
            raise ValueError("conditioning_embedding_out_channels=None is not supported")
        extra = ("conditioning_channels", "conditioning_embedding_out_channels",
                 "controlnet_conditioning_channel_order", "global_pool_conditions")
        fields = {k: d[k] for k in _ENCODER_KEYS + extra if k in d}
        fields.setdefault("cross_attention_dim", 1280)
        return cls(**{**fields, **kw})

    def to_diffusers(self) -> dict:
        if len(set(self.layers)) != 1:
            raise ValueError("diffusers ControlNetModel needs the same layers_per_block in every block")
        d = {"_class_name": "ControlNetModel", **self.encoder_diffusers_fields(), "layers_per_block": self.layers[0],
             "conditioning_channels": self.conditioning_channels,
             "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
             "controlnet_conditioning_channel_order": self.controlnet_conditioning_channel_order,
             "global_pool_conditions": self.global_pool_conditions}
        return d


class ControlNetConditioningEmbedding(nn.Module):
    """Hint network: conv_in, pairs of (3x3, 3x3 stride 2) convs named blocks_i, zero-initialised conv_out."""
    out_channels: int
    block_out_channels: tuple
    dtype: Any = None

    @nn.compact
    def __call__(self, cond):
        ch = self.block_out_channels
        h = nn.silu(layers.Conv(ch[0], 3, dtype=self.dtype, name="conv_in")(cond))
        for i in range(len(ch) - 1):
            h = nn.silu(layers.Conv(ch[i], 3, dtype=self.dtype, name=f"blocks_{2 * i}")(h))
            h = nn.silu(layers.Conv(ch[i + 1], 3, stride=2, dtype=self.dtype, name=f"blocks_{2 * i + 1}")(h))
        return layers.ZeroConv(self.out_channels, 3, dtype=self.dtype, name="conv_out")(h)


class ControlNetModel(nn.Module):
    """(latents NHWC, timesteps, text embeddings, condition image NHWC) -> (down residuals tuple, mid residual)."""
    config: ControlNetConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0):
        cfg = self.config
        b, hh, ww, _ = sample.shape
        f = cfg.hint_factor
        if controlnet_cond.shape[1:3] != (hh * f, ww * f):
            raise ValueError(f"condition image {controlnet_cond.shape[1:3]} must be {f}x the latent size {(hh, ww)} "
                             f"for conditioning_embedding_out_channels={cfg.conditioning_embedding_out_channels}")
        if controlnet_cond.shape[-1] != cfg.conditioning_channels:
            raise ValueError(f"condition image has {controlnet_cond.shape[-1]} channels, the encoder expects "
                             f"{cfg.conditioning_channels}")
        dt = cfg.dtype or jnp.float32
        cond = jnp.asarray(controlnet_cond, dt)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        context = layers.constrain_seq(jnp.asarray(encoder_hidden_states, dt))
        emb = time_embedding(cfg, timesteps, b)
        h = layers.Conv(cfg.block_out_channels[0], 3, dtype=cfg.dtype, name="conv_in")(jnp.asarray(sample, dt))
        h = h + ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                                dtype=cfg.dtype, name="controlnet_cond_embedding")(cond)
        skips, mid = encoder_features(cfg, layers.constrain_image(h), emb, context)
        if not cfg.zero_convs:
            return skips, mid
        skips = tuple(layers.ZeroConv(s.shape[-1], 1, dtype=cfg.dtype, name=f"controlnet_down_blocks_{i}")(s)
                      for i, s in enumerate(skips))
        mid = layers.ZeroConv(mid.shape[-1], 1, dtype=cfg.dtype, name="controlnet_mid_block")(mid)
        scale = jnp.asarray(conditioning_scale, skips[0].dtype)
        skips = tuple(s * scale for s in skips)
        mid = mid * scale
        if cfg.global_pool_conditions:
            skips = tuple(jnp.mean(s, axis=(1, 2), keepdims=True) for s in skips)
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return skips, mid


def from_diffusers_config(d: dict, **kw) -> ControlNetModel:
    return ControlNetModel(ControlNetConfig.from_diffusers(d, **kw))


def to_diffusers_config(module: ControlNetModel) -> dict:
    if not module.config.zero_convs:
        raise ValueError("a ControlNet without zero convs (the mu-form encoder) has no diffusers equivalent")
    return module.config.to_diffusers()


def init_inputs(module: ControlNetModel, batch: int = 1):
    cfg = module.config
    s = 2 ** (cfg.num_blocks - 1)
    f = cfg.hint_factor
    return (jnp.zeros((batch, s, s, cfg.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, 1, cfg.cross_attention_dim), jnp.float32),
            jnp.zeros((batch, s * f, s * f, cfg.conditioning_channels), jnp.float32))


__all__ = ["ControlNetConditioningEmbedding", "ControlNetConfig", "ControlNetModel", "from_diffusers_config",
           "init_inputs", "to_diffusers_config"]
