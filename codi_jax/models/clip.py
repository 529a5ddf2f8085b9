"""CLIP in Flax: the text encoder that conditions the UNet, and the full CLIP model used for CLIP score.

Semantics and parameter names follow transformers' CLIPTextModel / CLIPModel exactly, so that weights convert by the
generic path rule of codi_jax.weights.convert (torch `text_model.encoder.layers.3.self_attn.q_proj.weight` <->
flax ('text_model', 'encoder', 'layers_3', 'self_attn', 'q_proj', 'kernel')).
Layout: tokens (batch, length), images NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models import layers

Dtype = Any

# Older transformers checkpoints store the position_ids buffers; they are constants, never weights.
IGNORE_KEYS = (r"(^|\.)position_ids$",)

# transformers' "gelu" is the exact erf form (layers.get_activation's "gelu" too), not the tanh approximation.
_ACTIVATIONS = ("gelu", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower hyper-parameters (field names as in transformers' CLIPTextConfig)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # only used by CLIPModel / kept for config round trips
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    dtype: Dtype = jnp.float32  # compute dtype; params stay float32
    remat: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "CLIPTextConfig":
        """sd15 (OpenAI ViT-L/14 text tower), sd21 (OpenCLIP ViT-H/14 text tower, penultimate layer), tiny."""
        presets = {
            # SD 1.x text_encoder/config.json. eos_token_id=2 is the legacy value those configs ship with: pooling
            # then takes the argmax token id, which is the real eos (49407) for CLIP's tokenizer.
            "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2),
            # SD 2.x drops the last of OpenCLIP-H's 24 layers (uses the penultimate one), hence 23.
            "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                         hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=2),
            "tiny": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=32, bos_token_id=998, eos_token_id=999),
        }
        if name not in presets:
            raise ValueError(f"unknown CLIP text preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Vision tower hyper-parameters (field names as in transformers' CLIPVisionConfig)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    dtype: Dtype = jnp.float32
    remat: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks (shared by both towers).

class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        b, n, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        split = lambda t: t.reshape(b, n, self.num_heads, head_dim)
        q = split(layers.Dense(self.hidden_size, axes=("embed", "heads"), dtype=self.dtype, name="q_proj")(x))
        k = split(layers.Dense(self.hidden_size, axes=("embed", "heads"), dtype=self.dtype, name="k_proj")(x))
        v = split(layers.Dense(self.hidden_size, axes=("embed", "heads"), dtype=self.dtype, name="v_proj")(x))
        # Logits and softmax in float32 even under bf16 compute, as transformers does.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, self.hidden_size)
        return layers.Dense(self.hidden_size, axes=("heads", "embed"), dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.Dense(self.intermediate_size, axes=("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        x = layers.get_activation(self.hidden_act)(x)
        return layers.Dense(self.hidden_size, axes=("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        h = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, c.dtype, name="self_attn")(h, mask)
        h = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="layer_norm2")(x)
        x = x + CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.dtype, name="mlp")(h)
        return layers.constrain_seq(x)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, x, mask=None):
        layer_cls = nn.remat(CLIPEncoderLayer) if self.config.remat else CLIPEncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, name=f"layers_{i}")(x, mask)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Text tower.

class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        n = input_ids.shape[-1]
        if n > c.max_position_embeddings:
            raise ValueError(f"sequence length {n} exceeds max_position_embeddings {c.max_position_embeddings}")
        tokens = layers.Embed(c.vocab_size, c.hidden_size, axes=("vocab", "embed"), dtype=c.dtype,
                              name="token_embedding")(input_ids)
        positions = layers.Embed(c.max_position_embeddings, c.hidden_size, axes=("position", "embed"), dtype=c.dtype,
                                 name="position_embedding")(jnp.arange(n))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    """transformers' CLIPTextModel.text_model: returns (last_hidden_state, pooled output at the eos token)."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        input_ids = jnp.asarray(input_ids)
        x = layers.constrain_seq(CLIPTextEmbeddings(c, name="embeddings")(input_ids))
        n = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]  # causal: (1, 1, query, key)
        if attention_mask is not None:  # padding mask (batch, key), 1 = attend
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        x = CLIPEncoder(c, name="encoder")(x, mask)
        x = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="final_layer_norm")(x)
        if c.eos_token_id == 2:
            # Legacy configs (SD 1.x/2.x) carry eos_token_id=2; transformers then pools at the highest token id,
            # which is the eos token of CLIP's vocabulary.
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            eos_index = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, eos_index[:, None, None], axis=1)[:, 0]
        return x, pooled


class CLIPTextEncoder(nn.Module):
    """transformers.CLIPTextModel: `apply(p, input_ids)` -> last_hidden_state (batch, length, hidden_size).

    With return_pooled=True it returns (last_hidden_state, pooled eos-token state).
    """

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, return_pooled: bool = False):
        last, pooled = CLIPTextTransformer(self.config, name="text_model")(input_ids, attention_mask)
        return (last, pooled) if return_pooled else last


# ----------------------------------------------------------------------------------------------------------------------
# Vision tower and the full CLIP model (CLIP score).

class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        b, h, w, _ = pixel_values.shape
        if (h, w) != (c.image_size, c.image_size):
            raise ValueError(f"CLIP vision input is {h}x{w}; the model expects {c.image_size}x{c.image_size} "
                             "(preprocess with codi_jax.metrics.clip_score.preprocess_images)")
        patches = layers.Conv(c.hidden_size, c.patch_size, stride=c.patch_size, padding=0, use_bias=False,
                              dtype=c.dtype, name="patch_embedding")(pixel_values)
        # NHWC row-major flatten == torch's flatten(2).transpose(1, 2) of NCHW: same patch order.
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                         (c.hidden_size,), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        pos = layers.Embed(num_positions, c.hidden_size, axes=("position", "embed"), dtype=c.dtype,
                           name="position_embedding")(jnp.arange(num_positions))
        return x + pos[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionModel.vision_model: returns (last_hidden_state, pooled = post_layernorm(cls))."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        x = CLIPVisionEmbeddings(c, name="embeddings")(pixel_values)
        # "pre_layrnorm" (sic) is transformers' attribute name.
        x = layers.constrain_seq(layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="pre_layrnorm")(x))
        x = CLIPEncoder(c, name="encoder")(x)
        pooled = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="post_layernorm")(x[:, 0])
        return x, pooled


@flax.struct.dataclass
class CLIPOutput:
    image_embeds: jax.Array     # (n_images, projection_dim), L2-normalised
    text_embeds: jax.Array      # (n_texts, projection_dim), L2-normalised
    logits_per_image: jax.Array  # (n_images, n_texts) = exp(logit_scale) * cosine


class CLIPModel(nn.Module):
    """transformers.CLIPModel. Images NHWC, already preprocessed (CLIP mean/std) at config.vision_config.image_size."""

    config: CLIPConfig

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text_config)
        self.vision_model = CLIPVisionTransformer(c.vision_config)
        self.visual_projection = layers.Dense(c.projection_dim, axes=("embed", None), use_bias=False,
                                              dtype=c.vision_config.dtype)
        self.text_projection = layers.Dense(c.projection_dim, axes=("embed", None), use_bias=False,
                                            dtype=c.text_config.dtype)
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(c.logit_scale_init_value), ()),
            (), jnp.float32)

    def get_text_features(self, input_ids, attention_mask=None):
        """Projected (not normalised) pooled text features, as transformers' get_text_features."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def get_image_features(self, pixel_values):
        """Projected (not normalised) pooled image features, as transformers' get_image_features."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> CLIPOutput:
        img = _l2_normalize(self.get_image_features(pixel_values).astype(jnp.float32))
        txt = _l2_normalize(self.get_text_features(input_ids, attention_mask).astype(jnp.float32))
        return CLIPOutput(img, txt, jnp.exp(self.logit_scale) * img @ txt.T)


def _l2_normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)



# ----------------------------------------------------------------------------------------------------------------------
# transformers config.json <-> module.

_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "bos_token_id",
                "eos_token_id", "pad_token_id")
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size", "hidden_act", "layer_norm_eps", "projection_dim")


def _pick(d: Mapping[str, Any], fields, what: str) -> dict:
    out = {k: d[k] for k in fields if d.get(k) is not None}
    for k in ("eos_token_id", "bos_token_id", "pad_token_id", "image_size", "patch_size"):
        if isinstance(out.get(k), (list, tuple)):
            raise ValueError(f"{what}: a list-valued {k} ({out[k]}) is not supported")
    return out


def text_config_from_dict(d: Mapping[str, Any], **overrides) -> CLIPTextConfig:
    """CLIPTextConfig from a transformers text config dict (missing keys take transformers' defaults)."""
    return CLIPTextConfig(**{**_pick(d, _TEXT_FIELDS, "CLIP text config"), **overrides})


def from_diffusers_config(d: Mapping[str, Any], **overrides) -> CLIPTextEncoder:
    """CLIPTextEncoder from the config.json a transformers CLIPTextModel writes (a pipeline's text_encoder/)."""
    arch = d.get("architectures") or ["CLIPTextModel"]
    if list(arch) != ["CLIPTextModel"]:
        raise ValueError(f"text_encoder architecture {arch} is not supported; only transformers CLIPTextModel "
                         "(Stable Diffusion 1.x/2.x) is")
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"text_encoder model_type {d['model_type']!r} is not clip_text_model")
    return CLIPTextEncoder(text_config_from_dict(d, **overrides))


def init_inputs(module: CLIPTextEncoder) -> tuple:
    """Dummy inputs for module.init / eval_shape (param shapes do not depend on the sequence length)."""
    return (jnp.zeros((1, 2), jnp.int32),)


def _text_dict(c: CLIPTextConfig) -> dict:
    return {k: getattr(c, k) for k in _TEXT_FIELDS}


def to_diffusers_config(module: CLIPTextEncoder) -> dict:
    """The config.json of the equivalent transformers CLIPTextModel."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "dtype": "float32",
            "attention_dropout": 0.0, **_text_dict(module.config)}


def clip_config_from_dict(d: Mapping[str, Any], **overrides) -> CLIPConfig:
    """CLIPConfig from the config.json a transformers CLIPModel writes (e.g. openai/clip-vit-large-patch14)."""
    if d.get("model_type", "clip") != "clip":
        raise ValueError(f"CLIP score needs a transformers CLIPModel folder; config.json has model_type "
                         f"{d.get('model_type')!r}")
    projection_dim = d.get("projection_dim", 512)
    text = d.get("text_config") or {}
    vision = d.get("vision_config") or {}
    return CLIPConfig(
        text_config=CLIPTextConfig(**{**_pick(text, _TEXT_FIELDS, "CLIP text_config"), **overrides}),
        vision_config=CLIPVisionConfig(**{**_pick(vision, _VISION_FIELDS, "CLIP vision_config"), **overrides}),
        projection_dim=projection_dim,
        logit_scale_init_value=d.get("logit_scale_init_value", 2.6592))


def prepare_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Text-encoder safetensors keys -> the names this module uses ('text_model.' prefix, no position_ids buffers).

    transformers >= 5 saves CLIPTextModel without the 'text_model.' prefix; every SD checkpoint on disk (and what we
    write, which both transformers 4 and 5 load) has it. Apply before convert.torch_to_flax.
    """
    out = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith("text_model.") else "text_model." + k] = v
    return out
