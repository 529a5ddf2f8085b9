"""The Task row and the small value types the task files share (no JAX)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"


@dataclasses.dataclass(frozen=True)
class Options:
    """The data config's task knobs, as a condition builder reads them."""
    sr_scale: int = 4
    sr_degradation: str = "realesrgan"
    mask_fraction: float = 0.3
    mask_kind: str = "random"


@dataclasses.dataclass(frozen=True)
class Reader:
    """A network that reads generated images for one of a task's metrics (the depth estimator for depth error)."""
    field: str  # config.eval.<field> names its folder; '' = the one shipped in codi_jax/pretrained/<default>
    what: str  # for messages
    default: str  # folder under codi_jax/pretrained
    command: str  # the command that trains one (for a reader of another image size)
    load: Callable[[str | None], Any]  # folder or None (the shipped one) -> the loaded model; imports JAX when called
    metrics: tuple[str, ...]  # what is unavailable without it

    def default_path(self) -> Path:
        return PRETRAINED / self.default


@dataclasses.dataclass(frozen=True)
class SampleInput:
    """One input file of `python -m codi_jax.sample`, and what the model and the flags say about it."""
    path: str
    size: int  # the model's trained (square) size
    multiple: int  # generated sizes are multiples of this
    sr_scale: int
    fit_how: str | None  # --fit, None when not given
    mask: str | None = None  # --mask for this image
    depth_kind: str = "disparity"
    convert: bool = False


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    summary: str  # one line, for docs and --help
    channels: int  # condition channels; 0: text-to-image, no condition
    # (record, rng, options) -> {'cond': (H,W,C) float in [-1,1], plus what the metrics need beside it}; None for t2i
    condition: Callable[[dict, np.random.Generator, Options], dict[str, np.ndarray]] | None = None
    # Record fields beyond image and caption -> the data config field that names the tfds feature holding it.
    record_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Records are (input, target) pairs (edit): folders are read as pairs, scenes render the edited scene.
    paired: bool = False
    # The caption describes the target image, so caption following is meaningful (edit's is an instruction).
    reads_captions: bool = True
    # Model card: the hub tag of the task and the pipeline tag.
    tag: str = ""
    pipeline_tag: str = "image-to-image"
    # config -> extra model_index.json _codi_jax fields that sample needs (sr: sr_scale).
    export_meta: Callable[[Any], dict] | None = None
    # Evaluation: the readers the metrics need, the metrics of a set of images ((scorer, images uint8) -> dict,
    # per-image values reduced with intervals; the scorer holds the held-out real images, conditions, extras, loaded
    # readers and seed), whether lower is better for each, and reference rows ((real uint8, cond, extras) ->
    # {label: images uint8}) beside ground truth, the VAE round trip and the text-only teacher.
    readers: tuple[Reader, ...] = ()
    metrics: Callable[[Any, np.ndarray], dict] | None = None
    metric_directions: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    references: Callable[[np.ndarray, np.ndarray, dict], dict[str, np.ndarray]] | None = None
    # Those of the metrics that read the colour segmenter of caption following (scorer.segmenter): scored where
    # caption following is (the procedural scenes), and reported unavailable with it when its weights are missing.
    segmenter_metrics: tuple[str, ...] = ()
    # How the sample grid's "condition" column shows the input: (cond, extras) -> uint8 (N, H, W, 3); None: the
    # condition as an image (condition_rgb). sr shows the low-res input itself, blocky, not its bicubic upsampling (that
    # is the bicubic reference column).
    shown: Callable[[np.ndarray, dict], np.ndarray] | None = None
    # `python -m codi_jax.sample`: what --image is, the flags only this task takes, its --help epilog lines, and the
    # builder of the condition from a user's file: SampleInput -> (cond (H,W,C), box (top, left, h, w), note).
    sample_input: str = ""
    sample_flags: tuple[str, ...] = ()
    sample_help: str = ""
    sample_condition: Callable[[SampleInput], tuple[np.ndarray, tuple[int, int, int, int], str]] | None = None
    # The model card's diffusers example: the lines of Python (numpy as np, PIL's Image, torch imported) that make
    # `cond`, the (1, C, H, W) float tensor in [-1, 1] the pipeline takes, from an input file, as training builds it;
    # (model_index.json's _codi_jax metadata) -> lines. diffusers' own preprocessing would hand a PIL image to the
    # ControlNet in [0, 1], not the [-1, 1] it was trained on.
    diffusers_input: Callable[[dict], list[str]] | None = None
    # Config defaults of this task ({dotted field: value}) over the shared ones, at every scale and at :tiny; chosen
    # on the validation split (docs/validation.md).
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tiny_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def show(self, cond: np.ndarray, extras: dict) -> np.ndarray:
        """The condition as the sample grid shows it (uint8 (N, H, W, 3))."""
        if self.shown is not None:
            return self.shown(cond, extras)
        return to_uint8(condition_rgb(np.asarray(cond)))

    @property
    def conditional(self) -> bool:
        return self.channels > 0

    def needs(self, field: str) -> bool:
        """Whether the records must hold `field` (beyond image and caption)."""
        return field in self.record_fields

    @property
    def default_mode(self) -> str:
        return "codi" if self.conditional else "pretrain"


def to_signed(u8: np.ndarray) -> np.ndarray:
    return (np.asarray(u8, np.float32) / 127.5 - 1.0).astype(np.float32)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8."""
    return np.asarray(((np.asarray(images, np.float32) + 1.0) * 127.5).round().clip(0, 255), np.uint8)


def condition_rgb(cond: np.ndarray) -> np.ndarray:
    """A condition (..., C) as an image to look at, (..., 3), same value range: depth's one channel as grey, the
    first three channels otherwise (inpaint: the masked image; its mask channel is dropped)."""
    return cond[..., :3] if cond.shape[-1] >= 3 else np.repeat(cond[..., :1], 3, axis=-1)
