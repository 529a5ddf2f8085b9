"""The small dense-prediction U-Net behind the metrics' readers of generated images: RGB in [-1, 1] -> a map.

ControlNet++ and Uni-ControlNet score how well a generated image obeys its condition by running a reader (a depth
estimator, a segmenter) on the image and comparing its reading with what was asked for. Off-the-shelf readers (MiDaS,
DPT, OWL-ViT) are trained on photographs at 384+ px; on our 32 px procedural scenes they would measure their own
domain gap. So we train them on the scenes' exact ground truth (`codi_jax.metrics.train_depth`):
- the depth estimator (`head='tanh'`, 1 output) predicts exactly what the diffusion model was conditioned on: the
  MiDaS-style inverse depth, min-max normalised per image (`codi_jax.tasks.depth.disparity_condition`), near = +1;
- the colour segmenter (`head='logits'`, one output per class) labels each pixel with the palette colour of the
  object it shows, or background, which is what the caption-following metric reads (`codi_jax.metrics.captions`).

The network is a plain U-Net: diffusers-style pre-norm ResNet blocks (GroupNorm + SiLU) at every level, stride-2 convs
down to a small bottleneck whose 3x3 convs see the whole image (the per-image normalisation needs the global nearest
and farthest points), nearest-neighbour upsampling with skip connections back up, and a tanh (map) or linear (class logits) head.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from codi_jax.models import layers


@dataclasses.dataclass(frozen=True)
class DenseUNetConfig:
    """Architecture plus the resolution it was trained at (predictions at other sizes are refused, not extrapolated)."""

    image_size: int = 32
    channels: tuple[int, ...] = (16, 24, 32, 48)  # per level; level i works at image_size / 2**i
    blocks_per_level: int = 1
    norm_groups: int = 8
    out_channels: int = 1
    head: str = "tanh"  # 'tanh': a map in [-1, 1]; 'logits': unnormalised class scores

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.head not in ("tanh", "logits") or self.out_channels < 1:
            raise ValueError(f"head must be 'tanh' or 'logits' and out_channels >= 1, got {self.head!r}, "
                             f"{self.out_channels}")
        if not self.channels or any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"channels {self.channels} must be non-empty multiples of norm_groups={self.norm_groups}")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.channels) - 1} "
                             f"for {len(self.channels)} levels")
        if self.blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be >= 1, got {self.blocks_per_level}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DenseUNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"dense U-Net config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class DenseUNet(nn.Module):
    """(N, H, W, 3) RGB in [-1, 1] -> (N, H, W, out_channels): a map in [-1, 1] (tanh) or class logits."""

    config: DenseUNetConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        groups = cfg.norm_groups
        h = layers.Conv(cfg.channels[0], 3, name="conv_in")(x)
        skips = []
        for i, ch in enumerate(cfg.channels):
            for j in range(cfg.blocks_per_level):
                h = layers.ResnetBlock2D(ch, groups=groups, eps=1e-5, name=f"down_{i}_res_{j}")(h)
            if i < len(cfg.channels) - 1:
                skips.append(h)
                h = layers.Downsample2D(ch, name=f"down_{i}_sample")(h)
        h = layers.ResnetBlock2D(cfg.channels[-1], groups=groups, eps=1e-5, name="mid_res")(h)
        for i in reversed(range(len(cfg.channels) - 1)):
            ch = cfg.channels[i]
            h = layers.Upsample2D(ch, name=f"up_{i}_sample")(h)
            h = jnp.concatenate([h, skips[i]], axis=-1)
            for j in range(cfg.blocks_per_level):
                h = layers.ResnetBlock2D(ch, groups=groups, eps=1e-5, name=f"up_{i}_res_{j}")(h)
        h = nn.silu(layers.GroupNorm(groups, 1e-5, name="norm_out")(h))
        out = layers.Conv(cfg.out_channels, 3, name="conv_out")(h)
        # tanh: the depth target lives in [-1, 1] and reaches both ends in every image (min-max normalisation).
        return jnp.tanh(out) if cfg.head == "tanh" else out
