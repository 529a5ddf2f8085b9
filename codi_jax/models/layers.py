"""Shared Flax building blocks with diffusers semantics and attribute names (NHWC).

Attribute names mirror diffusers' PyTorch modules so `codi_jax.weights.convert` maps weights generically; every param
carries logical axis names (docs/design.md, "Training system") so the training system can shard it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
PARAM_DTYPE = jnp.float32

# Activation sharding specs used at block boundaries.
IMAGE_AXES = ("batch", "height", "width", "act_channels")
SEQ_AXES = ("batch", "length", "act_embed")


def constrain_image(x):
    return nn.with_logical_constraint(x, IMAGE_AXES)


def constrain_seq(x):
    return nn.with_logical_constraint(x, SEQ_AXES)


# ----------------------------------------------------------------------------------------------------------------------
# Param-annotated primitives. Factories return plain flax modules so the param tree stays {name: {kernel, bias}}.


def _gathered(kernel):
    """The kernel replicated at its use: FSDP's all-gather of a weight, made explicit (a no-op without a mesh).

    Left to itself, XLA's TPU SPMD partitioner may instead keep an FSDP-sharded kernel sharded and run the matmul /
    conv as a windowed einsum (collective matmul): a loop of collective-permutes over the kernel's input-channel
    shards. On v4-32 (fsdp=16) it did so for ~1500 of the SD1.5 step's matmuls and convs (not on v4-128, fsdp=64),
    and each loop slices the activation's channels, so its activation gets a batch-minor layout whose 128-lane
    tiling pads the per-device batch: the frozen VAE encoder's bf16[16,512,512,128] (1 GiB) took 8 GiB buffers, and
    the step needed 29.7 GiB at 16 examples per device (v4-128: 14.1 GiB). Gathering the kernel (a few MiB) first
    leaves a plain conv / matmul on the batch-sharded activation (v4-32: 14.5 GiB, no windowed loop left); the
    kernel's gradient is then the partial sum over each device's batch, reduced onto its shards.
    """
    return nn.with_logical_constraint(kernel, (None,) * kernel.ndim)


def _conv_gathered_kernel(lhs, rhs, *args, **kwargs):
    return jax.lax.conv_general_dilated(lhs, _gathered(rhs), *args, **kwargs)


def _dot_gathered_kernel(lhs, rhs, *args, **kwargs):
    return jax.lax.dot_general(lhs, _gathered(rhs), *args, **kwargs)


def Dense(features: int, *, axes: tuple = ("embed", "embed"), use_bias: bool = True, dtype: Dtype = None,
          kernel_init: Callable = nn.initializers.lecun_normal(), name: Optional[str] = None) -> nn.Dense:
    """nn.Dense with logical axes (in, out) on the kernel and (out,) on the bias."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=PARAM_DTYPE, dot_general=_dot_gathered_kernel,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)), name=name)


def Conv(features: int, kernel_size: int = 3, *, stride: int = 1, padding: Any = 1, use_bias: bool = True,
         dtype: Dtype = None, kernel_init: Callable = nn.initializers.lecun_normal(),
         name: Optional[str] = None) -> nn.Conv:
    """nn.Conv in torch's convention: square kernel, integer symmetric padding (or an explicit flax padding spec)."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding, use_bias=use_bias,
        dtype=dtype, param_dtype=PARAM_DTYPE, conv_general_dilated=_conv_gathered_kernel,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), name=name)


def ZeroConv(features: int, kernel_size: int = 1, *, dtype: Dtype = None, name: Optional[str] = None) -> nn.Conv:
    """A zero-initialised conv (ControlNet's zero_module): the adapted model starts as the pretrained one."""
    return Conv(features, kernel_size, padding=kernel_size // 2, dtype=dtype, kernel_init=nn.initializers.zeros_init(),
                name=name)


def GroupNorm(num_groups: int = 32, eps: float = 1e-5, *, dtype: Dtype = None, name: Optional[str] = None):
    # Two-pass variance: the fast E[x^2]-E[x]^2 form loses ~1e-4 against torch on un-normalised activations.
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=PARAM_DTYPE, use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), name=name)


def LayerNorm(eps: float = 1e-5, *, dtype: Dtype = None, name: Optional[str] = None):
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=PARAM_DTYPE, use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), name=name)


def Embed(num_embeddings: int, features: int, *, axes: tuple = ("vocab", "embed"), dtype: Dtype = None,
          name: Optional[str] = None) -> nn.Embed:
    return nn.Embed(
        num_embeddings, features, dtype=dtype, param_dtype=PARAM_DTYPE,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes), name=name)


def get_activation(name: str) -> Callable:
    acts = {"silu": nn.silu, "swish": nn.silu, "gelu": lambda x: nn.gelu(x, approximate=False),
            "gelu_tanh": lambda x: nn.gelu(x, approximate=True), "relu": nn.relu,
            "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x)}
    if name not in acts:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(acts)}")
    return acts[name]


# ----------------------------------------------------------------------------------------------------------------------
# Timestep embedding (diffusers embeddings.get_timestep_embedding / Timesteps / TimestepEmbedding).


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, identical to diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (diffusers TimestepEmbedding without cond_proj / post_act)."""
    time_embed_dim: int
    act_fn: str = "silu"
    dtype: Dtype = None

    @nn.compact
    def __call__(self, t_emb):
        h = Dense(self.time_embed_dim, axes=("embed", "mlp"), dtype=self.dtype, name="linear_1")(t_emb)
        h = get_activation(self.act_fn)(h)
        return Dense(self.time_embed_dim, axes=("mlp", "embed"), dtype=self.dtype, name="linear_2")(h)


# ----------------------------------------------------------------------------------------------------------------------
# ResNet block, up/down sampling.


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (pre-norm, time_embedding_norm='default'); temb may be None (VAE)."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    use_in_shortcut: Optional[bool] = None  # None: a 1x1 conv_shortcut iff channels change, as diffusers
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x, temb=None):
        act = get_activation(self.act_fn)
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
        h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
        if temb is not None:
            t = Dense(self.out_channels, axes=("embed", "embed"), dtype=self.dtype, name="time_emb_proj")(act(temb))
            h = h + t[:, None, None, :]
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
        h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        shortcut = self.use_in_shortcut if self.use_in_shortcut is not None else x.shape[-1] != self.out_channels
        if shortcut:
            x = Conv(self.out_channels, 1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv named 'conv'. padding=0 reproduces diffusers' asymmetric (0,1,0,1) pad (the VAE encoder)."""
    out_channels: int
    padding: int = 1
    use_conv: bool = True
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x):
        if not self.use_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return Conv(self.out_channels, 3, stride=2, padding=pad, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv named 'conv'."""
    out_channels: int
    use_conv: bool = True
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        # Exact 2x nearest == torch F.interpolate(scale_factor=2, mode='nearest').
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        # Keep the conv's input batch-sharded. Without this, in the remat'd backward the SPMD partitioner propagated
        # the FSDP sharding of the kernel gradient (over input channels) back into this recomputed, unconstrained
        # activation: on v4-32 (16 devices) it rebuilt it for the whole global batch with channels split (an
        # all-to-all) and all-gathered the output gradient (bf16[256,64,64,640], 1.25 GiB per device in up_blocks_2)
        # to form the kernel gradient, instead of a per-device partial sum that is reduce-scattered.
        x = constrain_image(x)
        if self.use_conv:
            x = Conv(self.out_channels, 3, dtype=self.dtype, name="conv")(x)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Attention and transformer blocks.


# Memory-efficient attention: above this many scores per head (query length x key length) the queries are processed in
# chunks of at most this many scores each, every chunk under jax.checkpoint, so neither the forward nor the backward
# pass ever holds more than one chunk's float32 logits / probabilities. SD at 512 px has 4096 tokens at the 64x64 level:
# the exact path would hold (batch, heads, 4096, 4096) float32 (512 MiB per image per layer, ~1.5 GiB per image with
# the backward's copies), which is what kept the SD1.5 train step off 32 GiB TPU v4 chips. 0 or None: always exact.
# The chunked result is the same computation row by row (each query row's softmax sees every key), so it agrees with
# the exact path to float rounding. Tiny models (short sequences) never reach the threshold.
ATTENTION_CHUNK_SCORES = 1 << 21


def _attention_exact(q, k, v, scale):
    """(B, Lq, H, D) x (B, Lk, H, D) -> (B, Lq, H, D); logits in q/k's dtype, softmax in float32, probs in v's dtype."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _query_chunk(lq: int, lk: int, max_scores: Optional[int]) -> int:
    """Queries per chunk (lq: no chunking): at most max_scores // lk rows, balanced so the padding is < one chunk."""
    if not max_scores or lq * lk <= max_scores or lq <= 1:
        return lq
    rows = max(1, max_scores // lk)
    n = -(-lq // rows)
    return -(-lq // n)


def dot_product_attention(q, k, v, *, heads: int, upcast: bool = True, chunk_scores: Optional[int] = -1):
    """Multi-head scaled dot-product attention on (B, L, heads*d). Softmax always in float32 (stable in bf16).

    chunk_scores: the most query x key scores per head computed at once (-1: ATTENTION_CHUNK_SCORES; 0 / None: never
    chunk). Longer sequences go through query chunks (lax.map, each chunk rematerialised in the backward pass); a
    query length that the chunk does not divide is padded with zero queries, whose rows are dropped.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    q = q.reshape(b, lq, heads, d)
    k = k.reshape(b, lk, heads, d)
    v = v.reshape(b, lk, heads, d)
    if upcast:  # upcast_attention: q.k in float32 (SD2.1 needs it in fp16/bf16)
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scale = 1.0 / math.sqrt(d)
    chunk = _query_chunk(lq, lk, ATTENTION_CHUNK_SCORES if chunk_scores == -1 else chunk_scores)
    if chunk >= lq:
        return _attention_exact(q, k, v, scale).reshape(b, lq, inner)
    n = -(-lq // chunk)
    pad = n * chunk - lq
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    # (n, B, chunk, H, D): the batch axis keeps its sharding; only the query axis is split.
    qs = jnp.moveaxis(q.reshape(b, n, chunk, heads, d), 1, 0)
    # prevent_cse=False: inside lax.map (a scan) the rematerialisation cannot be CSE'd away, and the flag would only
    # add optimisation barriers.
    per_chunk = jax.checkpoint(lambda qc: _attention_exact(qc, k, v, scale), prevent_cse=False)
    out = jax.lax.map(per_chunk, qs)
    out = jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, heads, d)[:, :lq]
    return out.reshape(b, lq, inner)


class Attention(nn.Module):
    """diffusers Attention (AttnProcessor2_0): to_q/to_k/to_v/to_out_0, optional group_norm and residual.

    Accepts (B, L, C) or (B, H, W, C); a 4-D input is flattened to tokens and restored, as diffusers does for the VAE's
    mid-block attention (which sets norm_num_groups, residual_connection=True, bias=True).
    """
    query_dim: int
    heads: int = 8
    dim_head: int = 64
    bias: bool = False
    out_bias: bool = True
    upcast_attention: bool = False
    norm_num_groups: Optional[int] = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x, context=None):
        residual = x
        shape = x.shape
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.eps, dtype=self.dtype, name="group_norm")(x)
        if x.ndim == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = Dense(inner, axes=("embed", "heads"), use_bias=self.bias, dtype=self.dtype, name="to_q")(x)
        k = Dense(inner, axes=("embed", "heads"), use_bias=self.bias, dtype=self.dtype, name="to_k")(context)
        v = Dense(inner, axes=("embed", "heads"), use_bias=self.bias, dtype=self.dtype, name="to_v")(context)
        h = dot_product_attention(q, k, v, heads=self.heads, upcast=self.upcast_attention)
        h = Dense(self.query_dim, axes=("heads", "embed"), use_bias=self.out_bias, dtype=self.dtype, name="to_out_0")(h)
        h = h.reshape(shape[:-1] + (self.query_dim,))
        if self.residual_connection:
            h = h + residual
        if self.rescale_output_factor != 1.0:
            h = h / self.rescale_output_factor
        return h


class GEGLU(nn.Module):
    """proj -> (hidden, gate) -> hidden * gelu(gate), exact gelu as torch F.gelu."""
    dim_out: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x):
        h = Dense(self.dim_out * 2, axes=("embed", "mlp"), dtype=self.dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward with activation_fn='geglu': net_0 = GEGLU, net_1 = dropout (no params), net_2 = Linear."""
    dim: int
    mult: int = 4
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x):
        inner = self.dim * self.mult
        h = GEGLU(inner, dtype=self.dtype, name="net_0")(x)
        return Dense(self.dim, axes=("mlp", "embed"), dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm with a residual (SD1/SD2 settings)."""
    dim: int
    heads: int
    dim_head: int
    upcast_attention: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x, context):
        h = LayerNorm(1e-5, dtype=self.dtype, name="norm1")(x)
        x = x + Attention(self.dim, self.heads, self.dim_head, upcast_attention=self.upcast_attention,
                          dtype=self.dtype, name="attn1")(h, context if self.only_cross_attention else None)
        h = LayerNorm(1e-5, dtype=self.dtype, name="norm2")(x)
        x = x + Attention(self.dim, self.heads, self.dim_head, upcast_attention=self.upcast_attention,
                          dtype=self.dtype, name="attn2")(h, context)
        h = LayerNorm(1e-5, dtype=self.dtype, name="norm3")(x)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(h)


class Transformer2DModel(nn.Module):
    """diffusers Transformer2DModel for continuous NHWC input: norm, proj_in (1x1 conv or linear), blocks, proj_out."""
    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    remat: bool = False
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x, context):
        b, hh, ww, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        h = GroupNorm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            h = Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hh * ww, c))
        else:
            h = Conv(inner, 1, padding=0, dtype=self.dtype, name="proj_in")(h).reshape(b, hh * ww, inner)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            h = block_cls(inner, self.heads, self.dim_head, upcast_attention=self.upcast_attention,
                          only_cross_attention=self.only_cross_attention, dtype=self.dtype,
                          name=f"transformer_blocks_{i}")(h, context)
            h = constrain_seq(h)
        if self.use_linear_projection:
            h = Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hh, ww, c)
        else:
            h = Conv(c, 1, padding=0, dtype=self.dtype, name="proj_out")(h.reshape(b, hh, ww, inner))
        return h + residual


def as_tuple(value, n: int, what: str) -> tuple:
    """Broadcast an int (or None) to n entries, or check a sequence has n entries (diffusers' per-block options)."""
    if value is None or isinstance(value, (int, float, bool)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{what} must have one entry per block ({n}), got {value}")
    return value


__all__ = [
    "Attention", "BasicTransformerBlock", "Conv", "Dense", "Downsample2D", "Embed", "FeedForward", "GEGLU", "GroupNorm",
    "LayerNorm", "ResnetBlock2D", "TimestepEmbedding", "Transformer2DModel", "Upsample2D", "ZeroConv", "as_tuple",
    "constrain_image", "constrain_seq", "dot_product_attention", "get_activation", "timestep_embedding",
]
