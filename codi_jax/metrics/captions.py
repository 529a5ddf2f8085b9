"""Caption following on the procedural scenes: are the caption's objects in the caption's colours and places?

A colour segmenter (codi_jax/models/dense_unet.py, `head='logits'`), trained on the scenes' exact object ids by
`python -m codi_jax.metrics.train_segmenter`, labels every pixel of a generated image with the palette colour of the
object it shows, or background. The caption grammar (`codi_jax.data.scenes.caption`) names each object by colour and
shape and relates neighbours ("a red sphere left of a shiny blue box, and a green cylinder behind the blue box").
Per image:

- colour_recall: the fraction of the caption's colours that the segmenter finds (at least `min_fraction` of the
  pixels), i.e. the objects are there in the right colours;
- colour_exact: 1 when the colours found are exactly the caption's (no missing and no extra colour);
- relation (per left/right relation, between two objects whose colours are each named once): 1 when both colours are
  found and their pixel centroids are ordered as the caption says. 'in front of'/'behind' are not scored: a 32 px
  image's vertical position says too little about depth.
- order (per left/right relation whose two colours are both found): 1 when their centroids are ordered as the
  caption says. relation mixes "are the objects there" with "are they in place"; order asks only the second, and a
  model that draws the right objects at random places scores 0.5 on it.

    model = load_segmenter()                      # shipped weights, codi_jax/pretrained/colours_scenes32
    labels = segment(model, generated_uint8)      # (N, H, W) int32: 0 background, 1 + COLOURS index
    scores = caption_following(labels, captions)  # {'colour_recall': (N,), 'colour_exact': (N,), 'relation': (R,),
                                                  #  'order': (R' <= R,)}

The segmenter's own scores on real test scenes with their captions are the ceiling; the same scenes against another
scene's caption are the chance level (its model card, README.md next to the weights).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from codi_jax.data.scenes import COLOURS, RELATIONS, SHAPES
from codi_jax.metrics import dense
from codi_jax.models.dense_unet import DenseUNet

DEFAULT_PATH = dense.PRETRAINED / "colours_scenes32"
CLASSES = ("background",) + COLOURS
MIN_FRACTION = 0.005  # 5 pixels of a 32x32 image; every captioned object covers >= 1.5 % of its real image

_NOUN = rf"(?:a|the) (?:shiny )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CLAUSE = re.compile(rf"^{_NOUN}(?: ({'|'.join(RELATIONS)}) {_NOUN})?$")


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[tuple[str, str], ...]  # (colour, shape), in caption order
    relations: tuple[tuple[tuple[str, str], str, tuple[str, str]], ...]  # (subject, relation, object)


def parse(caption: str) -> ParsedCaption:
    """Objects and relations of a caption of the scene grammar; anything else raises ValueError naming the caption."""
    objects: list[tuple[str, str]] = []
    relations = []
    for clause in caption.strip().split(", and "):
        m = _CLAUSE.match(clause)
        if m is None:
            raise ValueError(f"not a scene caption (the grammar of codi_jax.data.scenes.caption): {caption!r}")
        subject = (m.group(1), m.group(2))
        if subject not in objects:
            objects.append(subject)
        if m.group(3):
            obj = (m.group(4), m.group(5))
            if obj not in objects:
                objects.append(obj)
            relations.append((subject, m.group(3), obj))
    return ParsedCaption(tuple(objects), tuple(relations))


def caption_following(labels: np.ndarray, captions: list[str], min_fraction: float = MIN_FRACTION) -> dict[str, np.ndarray]:
    """labels (N, H, W) ints (0 background, 1 + index into COLOURS) and N captions -> per-image colour_recall and
    colour_exact (N,) float64, relation (R,) float64: one 0/1 outcome per scored left/right relation, and order
    (R',) float64: the outcomes of those relations whose two colours were both found."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or len(labels) != len(captions):
        raise ValueError(f"labels must be (N, H, W) with one caption per image, got {labels.shape} and "
                         f"{len(captions)} captions")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(CLASSES):
        raise ValueError(f"labels must lie in [0, {len(CLASSES)}), got [{labels.min()}, {labels.max()}]")
    n, h, w = labels.shape
    min_pixels = max(1, int(round(min_fraction * h * w)))
    xs = np.arange(w, dtype=np.float64)
    recall, exact, relation, order = np.empty(n), np.empty(n), [], []
    for i, (lab, text) in enumerate(zip(labels, captions)):
        parsed = parse(text)
        counts = np.bincount(lab.ravel(), minlength=len(CLASSES))
        found = {c for k, c in enumerate(COLOURS) if counts[k + 1] >= min_pixels}
        named = [c for c, _ in parsed.objects]
        recall[i] = np.mean([c in found for c in set(named)])
        exact[i] = float(found == set(named))
        for (ca, _), rel, (cb, _) in parsed.relations:
            if rel not in ("left of", "right of") or ca == cb or named.count(ca) > 1 or named.count(cb) > 1:
                continue
            if ca not in found or cb not in found:
                relation.append(0.0)
                continue
            centre = {c: float((lab == 1 + COLOURS.index(c)).sum(0) @ xs) / counts[1 + COLOURS.index(c)]
                      for c in (ca, cb)}
            relation.append(float(centre[ca] < centre[cb] if rel == "left of" else centre[ca] > centre[cb]))
            order.append(relation[-1])
    return {"colour_recall": recall, "colour_exact": exact, "relation": np.asarray(relation, np.float64),
            "order": np.asarray(order, np.float64)}


def load_segmenter(path: str | os.PathLike | None = None) -> tuple[DenseUNet, dict]:
    """(module, variables); default: the shipped segmenter. A missing reader raises MetricUnavailable."""
    model = dense.load(DEFAULT_PATH if path is None else path, "caption following",
                       "python -m codi_jax.metrics.train_segmenter", head="logits")
    if model[0].config.out_channels != len(CLASSES):
        raise ValueError(f"a colour segmenter has {len(CLASSES)} classes {CLASSES}, this one "
                         f"{model[0].config.out_channels}")
    return model


def segment(model: tuple[DenseUNet, dict], images, batch_size: int = 128) -> np.ndarray:
    """(N, H, W, 3) images (uint8, or float in [-1, 1]) -> (N, H, W) int32 class labels."""
    return np.argmax(dense.predict(model, images, batch_size), axis=-1).astype(np.int32)
