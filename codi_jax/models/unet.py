"""Stable Diffusion 1.x/2.x UNet (diffusers UNet2DConditionModel semantics and parameter names), NHWC.

The encoder half (conv_in, time embedding, down blocks, mid block) is shared with the ControlNet / CoDi conditional
encoder: `encoder_features` builds it inside whichever module calls it, so both get diffusers' top-level names.

Encoder features h_theta = (skips, mid): `skips` are conv_in's output and every resnet/attention/downsample output
of the down blocks, in order (exactly the tensors ControlNet adds residuals to); `mid` is the mid-block output. Full CoDi
(paper eq. 12) mixes them as they enter the decoder: `unet.apply(p, z, t, ctx, mix_features=h_eta, mix_weight=mu)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from codi_jax.models import layers
from codi_jax.models.layers import as_tuple

Features = tuple  # (skips: tuple[(B, H_k, W_k, C_k)], mid: (B, h, w, C_last))

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn",)

# diffusers config keys that must keep their SD1.x/2.x default value: anything else needs modules we do not build.
_REQUIRED_DEFAULTS = {
    "center_input_sample": False, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}


def check_supported(d: dict, required: dict, what: str):
    """Raise one ValueError naming every diffusers option outside what we implement."""
    bad = []
    for key, default in required.items():
        v = d.get(key, default)
        if v != default and not (isinstance(v, (list, tuple)) and not any(v) and not default):
            bad.append(f"{key}={v!r} (supported: {default!r})")
    if bad:
        raise ValueError(f"unsupported {what} config options: " + "; ".join(bad))


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The fields shared by the UNet and the conditional encoder (diffusers names; per-block values as tuples)."""
    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2  # int or per-block tuple
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: Any = 1  # int or per-block tuple
    attention_head_dim: Any = 8  # diffusers quirk: this is the head COUNT unless num_attention_heads is given
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); params stay float32
    remat: bool = False  # rematerialise each down/mid/up block in the backward pass

    def __post_init__(self):
        # Lists (from config.json) become tuples: the config must stay hashable as a flax module attribute.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(tuple(x) if isinstance(x, list) else x for x in v))
        n = len(self.down_block_types)
        for name in ("down_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.block_out_channels) != n:
            raise ValueError(f"block_out_channels {self.block_out_channels} needs one entry per down block ({n})")
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(f"unsupported down block type {t!r}; supported: {_DOWN_TYPES}")
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(f"unsupported mid block type {self.mid_block_type!r}; supported: {_MID_TYPES}")
        if any(as_tuple(self.only_cross_attention, n, "only_cross_attention")):
            raise ValueError("only_cross_attention=True is not supported (not used by SD 1.x/2.x)")
        object.__setattr__(self, "only_cross_attention", False)
        if self.norm_num_groups is None:
            raise ValueError("norm_num_groups=None is not supported")
        cad = self.cross_attention_dim
        if not isinstance(cad, int):
            if len(set(cad)) != 1:
                raise ValueError(f"per-block cross_attention_dim {cad} is not supported")
            object.__setattr__(self, "cross_attention_dim", int(cad[0]))
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in v):
                raise ValueError(f"nested {name}={v} is not supported (SDXL-style)")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            as_tuple(getattr(self, name), n, name)
        for c, h in zip(self.block_out_channels, self.heads):
            if c % h:
                raise ValueError(f"block width {c} is not divisible by its {h} attention heads")

    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def layers(self) -> tuple:
        return as_tuple(self.layers_per_block, self.num_blocks, "layers_per_block")

    @property
    def transformer_layers(self) -> tuple:
        return as_tuple(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    @property
    def heads(self) -> tuple:
        # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (a historical misnomer).
        h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return as_tuple(h, self.num_blocks, "num_attention_heads")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def encoder_diffusers_fields(self) -> dict:
        def lst(v):
            return list(v) if isinstance(v, tuple) else v
        return {
            "in_channels": self.in_channels, "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types), "mid_block_type": self.mid_block_type,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": lst(self.layers_per_block),
            "downsample_padding": self.downsample_padding, "mid_block_scale_factor": self.mid_block_scale_factor,
            "act_fn": self.act_fn, "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": lst(self.transformer_layers_per_block),
            "attention_head_dim": lst(self.attention_head_dim), "num_attention_heads": lst(self.num_attention_heads),
            "use_linear_projection": self.use_linear_projection, "upcast_attention": self.upcast_attention,
            "only_cross_attention": self.only_cross_attention,
        }


_ENCODER_KEYS = tuple(f.name for f in dataclasses.fields(EncoderConfig) if f.name not in ("dtype", "remat"))


@dataclasses.dataclass(frozen=True)
class UNetConfig(EncoderConfig):
    """UNet2DConditionModel options for SD 1.x/2.x."""
    sample_size: int = 64
    out_channels: int = 4
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        if len(self.up_block_types) != self.num_blocks:
            raise ValueError("up_block_types and down_block_types must have the same length")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(f"unsupported up block type {t!r}; supported: {_UP_TYPES}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "UNetConfig":
        """sd15 (the defaults), sd21 (768-v: OpenCLIP-H context, linear projections, 64-dim heads, upcast attention)
        or tiny (the embedded CPU size, ~0.8 M params at 8x8x4 latents), as VAEConfig.preset and
        CLIPTextConfig.preset (config.model.preset)."""
        presets = {
            "sd15": {},
            "sd21": dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                         upcast_attention=True, sample_size=96),
            "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                         norm_num_groups=8, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        }
        if name not in presets:
            raise ValueError(f"unknown UNet preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def from_diffusers(cls, d: dict, **kw) -> "UNetConfig":
        check_supported(d, _REQUIRED_DEFAULTS, "UNet2DConditionModel")
        fields = {k: d[k] for k in _ENCODER_KEYS + ("out_channels", "up_block_types", "conv_in_kernel",
                                                      "conv_out_kernel") if k in d}
        if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
            raise ValueError("mid_block_type=None is not supported")
        sample = d.get("sample_size") or 64
        fields.setdefault("cross_attention_dim", 1280)
        fields["sample_size"] = int(sample if isinstance(sample, int) else sample[0])
        return cls(**{**fields, **kw})

    def to_diffusers(self) -> dict:
        return {"_class_name": "UNet2DConditionModel", **self.encoder_diffusers_fields(),
                "sample_size": self.sample_size, "out_channels": self.out_channels,
                "up_block_types": list(self.up_block_types), "conv_in_kernel": self.conv_in_kernel,
                "conv_out_kernel": self.conv_out_kernel}


# ----------------------------------------------------------------------------------------------------------------------
# Blocks (diffusers unet_2d_blocks names).


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with_attention) or DownBlock2D; returns (h, outputs of every resnet/attn/downsampler)."""
    cfg: EncoderConfig
    out_channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    add_downsample: bool
    with_attention: bool

    @nn.compact
    def __call__(self, h, temb, context):
        cfg, outputs = self.cfg, []
        for i in range(self.num_layers):
            h = layers.ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                                     dtype=cfg.dtype, name=f"resnets_{i}")(h, temb)
            if self.with_attention:
                h = _transformer(cfg, self.out_channels, self.heads, self.transformer_layers, f"attentions_{i}")(
                    h, context)
            outputs.append(h)
        if self.add_downsample:
            h = layers.Downsample2D(self.out_channels, cfg.downsample_padding, dtype=cfg.dtype,
                                    name="downsamplers_0")(h)
            outputs.append(h)
        return h, tuple(outputs)


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) once."""
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, h, temb, context):
        cfg = self.cfg
        c = cfg.block_out_channels[-1]
        res = lambda name: layers.ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                                                output_scale_factor=cfg.mid_block_scale_factor, dtype=cfg.dtype,
                                                name=name)
        h = res("resnets_0")(h, temb)
        h = _transformer(cfg, c, cfg.heads[-1], cfg.transformer_layers[-1], "attentions_0")(h, context)
        return res("resnets_1")(h, temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with_attention) or UpBlock2D: each resnet eats one skip from the end of the list."""
    cfg: EncoderConfig
    out_channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    add_upsample: bool
    with_attention: bool

    @nn.compact
    def __call__(self, h, skips, temb, context):
        cfg = self.cfg
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - i].astype(h.dtype)], axis=-1)
            h = layers.ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                                     dtype=cfg.dtype, name=f"resnets_{i}")(h, temb)
            if self.with_attention:
                h = _transformer(cfg, self.out_channels, self.heads, self.transformer_layers, f"attentions_{i}")(
                    h, context)
        if self.add_upsample:
            h = layers.Upsample2D(self.out_channels, dtype=cfg.dtype, name="upsamplers_0")(h)
        return h


def _transformer(cfg: EncoderConfig, channels: int, heads: int, num_layers: int, name: str):
    return layers.Transformer2DModel(
        heads, channels // heads, num_layers=num_layers, groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention, dtype=cfg.dtype,
        name=name)


def _maybe_remat(cls, cfg):
    return nn.remat(cls) if cfg.remat else cls


def time_embedding(cfg: EncoderConfig, timesteps, batch: int):
    """time_proj (sinusoidal, no params) + the `time_embedding` MLP, built in the calling module."""
    t = jnp.asarray(timesteps)
    t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))
    t_emb = layers.timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                      freq_shift=cfg.freq_shift)
    if cfg.dtype is not None:
        t_emb = t_emb.astype(cfg.dtype)
    return layers.TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype=cfg.dtype, name="time_embedding")(t_emb)


def encoder_features(cfg: EncoderConfig, h, emb, context) -> Features:
    """Down blocks and mid block on h = conv_in(...) output; creates submodules in the *calling* module."""
    skips = [h]
    down_cls = _maybe_remat(DownBlock, cfg)
    for i, btype in enumerate(cfg.down_block_types):
        h, outs = down_cls(cfg, cfg.block_out_channels[i], cfg.layers[i], cfg.heads[i], cfg.transformer_layers[i],
                           add_downsample=i < cfg.num_blocks - 1, with_attention=btype == "CrossAttnDownBlock2D",
                           name=f"down_blocks_{i}")(h, emb, context)
        h = layers.constrain_image(h)
        skips += outs
    h = _maybe_remat(MidBlock, cfg)(cfg, name="mid_block")(h, emb, context)
    return tuple(skips), layers.constrain_image(h)


def check_features(cfg: EncoderConfig, skips, mid, what: str):
    n = 1 + sum(cfg.layers) + cfg.num_blocks - 1
    if len(skips) != n:
        raise ValueError(f"{what}: expected {n} skip tensors (conv_in + every resnet/attention/downsample output), "
                         f"got {len(skips)}")
    if mid is None:
        raise ValueError(f"{what}: the mid-block tensor is missing")


class UNet2DConditionModel(nn.Module):
    """SD UNet: (latents NHWC, timesteps int|(B,), text embeddings (B, L, D)) -> NHWC prediction (float32).

    Optional inputs, applied to the skips and the mid output as they enter the decoder:
      down_block_additional_residuals / mid_block_additional_residual: ControlNet residuals, h' = h + r.
      mix_features=(skips, mid), mix_weight=mu: full CoDi (eq. 12), h' = (1 - mu) h + mu h_eta (before any residuals).
      features_only=True: return the encoder features h_theta = (skips, mid) and skip the decoder.
    """
    config: UNetConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, down_block_additional_residuals=None,
                 mid_block_additional_residual=None, *, mix_features: Optional[Features] = None,
                 mix_weight=None, features_only: bool = False):
        cfg = self.config
        b, hh, ww, _ = sample.shape
        factor = 2 ** (cfg.num_blocks - 1)
        if hh % factor or ww % factor:
            raise ValueError(f"latent size {hh}x{ww} must be a multiple of {factor} for this UNet")
        # Validate the optional inputs before any compute, so a bad call fails fast.
        if mix_features is not None:
            if mix_weight is None:
                raise ValueError("mix_features needs mix_weight (mu)")
            check_features(cfg, *mix_features, "mix_features")
        if down_block_additional_residuals is not None or mid_block_additional_residual is not None:
            check_features(cfg, down_block_additional_residuals or (), mid_block_additional_residual,
                           "down_block_additional_residuals")
        dt = cfg.dtype or jnp.float32
        context = layers.constrain_seq(jnp.asarray(encoder_hidden_states, dt))
        emb = time_embedding(cfg, timesteps, b)
        h = layers.Conv(cfg.block_out_channels[0], cfg.conv_in_kernel, padding=cfg.conv_in_kernel // 2,
                        dtype=cfg.dtype, name="conv_in")(jnp.asarray(sample, dt))
        skips, mid = encoder_features(cfg, layers.constrain_image(h), emb, context)
        if features_only:
            return skips, mid

        if mix_features is not None:
            f_skips, f_mid = mix_features
            w = jnp.asarray(mix_weight, jnp.float32)
            mix = lambda a, f: ((1.0 - w) * a.astype(jnp.float32) + w * f.astype(jnp.float32)).astype(a.dtype)
            skips = tuple(mix(a, f) for a, f in zip(skips, f_skips))
            mid = mix(mid, f_mid)
        if down_block_additional_residuals is not None:
            skips = tuple(a + r.astype(a.dtype) for a, r in zip(skips, down_block_additional_residuals))
        if mid_block_additional_residual is not None:
            mid = mid + mid_block_additional_residual.astype(mid.dtype)

        h = mid
        rev_ch = cfg.block_out_channels[::-1]
        rev_layers, rev_heads, rev_tl = cfg.layers[::-1], cfg.heads[::-1], cfg.transformer_layers[::-1]
        up_cls = _maybe_remat(UpBlock, cfg)
        for i, btype in enumerate(cfg.up_block_types):
            n = rev_layers[i] + 1
            block_skips, skips = skips[-n:], skips[:-n]
            block = up_cls(cfg, rev_ch[i], n, rev_heads[i], rev_tl[i], add_upsample=i < cfg.num_blocks - 1,
                           with_attention=btype == "CrossAttnUpBlock2D", name=f"up_blocks_{i}")
            h = block(h, block_skips, emb, context)
            h = layers.constrain_image(h)
        h = layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype=cfg.dtype, name="conv_norm_out")(h)
        h = layers.get_activation(cfg.act_fn)(h)
        h = layers.Conv(cfg.out_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2, dtype=cfg.dtype,
                        name="conv_out")(h)
        return h.astype(jnp.float32)


def from_diffusers_config(d: dict, **kw) -> UNet2DConditionModel:
    """Build the module from a diffusers UNet2DConditionModel config.json dict (kw: dtype, remat)."""
    return UNet2DConditionModel(UNetConfig.from_diffusers(d, **kw))


def to_diffusers_config(module: UNet2DConditionModel) -> dict:
    return module.config.to_diffusers()


def init_inputs(module: UNet2DConditionModel, batch: int = 1):
    """Dummy (sample, timesteps, context) for init / eval_shape."""
    cfg = module.config
    s = 2 ** (cfg.num_blocks - 1)
    return (jnp.zeros((batch, s, s, cfg.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, 1, cfg.cross_attention_dim), jnp.float32))


__all__ = ["EncoderConfig", "UNetConfig", "UNet2DConditionModel", "encoder_features", "from_diffusers_config",
           "init_inputs", "time_embedding", "to_diffusers_config"]
