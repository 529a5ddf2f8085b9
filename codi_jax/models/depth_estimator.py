"""A small depth estimator for the controllability metric: RGB in [-1, 1] -> the depth conditioning map in [-1, 1].

ControlNet++ and Uni-ControlNet score how well a generated image obeys its depth condition by running a depth
estimator on the image and comparing the estimate with the condition. Off-the-shelf estimators (MiDaS, DPT) are
trained on photographs at 384+ px; on our 32 px procedural scenes they would measure their own domain gap. So we train
one on the scenes' exact depth, and it predicts exactly what the diffusion model was conditioned on: the MiDaS-style
inverse depth, min-max normalised per image (`codi_jax.data.tasks.disparity_condition`), near = +1, far = -1.

The network is a plain U-Net: diffusers-style pre-norm ResNet blocks (GroupNorm + SiLU) at every level, stride-2 convs
down to a small bottleneck whose 3x3 convs see the whole image (the per-image normalisation needs the global nearest
and farthest points), nearest-neighbour upsampling with skip connections back up, and a tanh head.
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
class DepthEstimatorConfig:
    """Architecture plus the resolution it was trained at (predictions at other sizes are refused, not extrapolated)."""

    image_size: int = 32
    channels: tuple[int, ...] = (16, 24, 32, 48)  # per level; level i works at image_size / 2**i
    blocks_per_level: int = 1
    norm_groups: int = 8

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
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
    def from_dict(cls, d: Mapping[str, Any]) -> "DepthEstimatorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"depth estimator config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class DepthEstimator(nn.Module):
    """(N, H, W, 3) RGB in [-1, 1] -> (N, H, W, 1) predicted conditioning map in [-1, 1]."""

    config: DepthEstimatorConfig

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
        # tanh: the target lives in [-1, 1] and reaches both ends in every image (min-max normalisation).
        return jnp.tanh(layers.Conv(1, 3, name="conv_out")(h))
