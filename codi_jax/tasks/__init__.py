"""The task table: what each task is, in one place, one file per task.

A task is a row (a `Task`, codi_jax/tasks/base.py) defined by its own file here (depth.py, sr.py, ...): the condition
it builds from a record and from a user's file, its channels, the record fields it needs, its metrics and reference
rows, and what its export's model card says. config, the data pipeline, evaluate, export and sample ask the table and
never compare task names themselves (tests/test_tasks.py fails on such a comparison). Adding a task is one file here
plus its test: every module of this package that defines `TASK` is a row (docs/adding.md walks through one).

Nothing here imports JAX at module level: the table is read when configs are parsed and by sample's input checks,
before JAX starts. Metric functions import their networks when called.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import numpy as np

from codi_jax.tasks.base import Options, Reader, SampleInput, Task, condition_rgb, to_signed, to_uint8

TEXT_TO_IMAGE = "t2i"  # the task of the text-to-image stages (vae, pretrain): no condition


def _discover() -> dict[str, Task]:
    table = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        task = getattr(module, "TASK", None)
        if isinstance(task, Task):
            if task.name in table:
                raise ValueError(f"task {task.name!r} is defined twice ({module.__name__})")
            table[task.name] = task
    return table


TABLE: dict[str, Task] = _discover()
TASKS = tuple(TABLE)
CONDITIONAL = tuple(name for name, t in TABLE.items() if t.conditional)


def get(name: str) -> Task:
    if name not in TABLE:
        raise ValueError(f"task {name!r} is not one of {TASKS}")
    return TABLE[name]


def lower_is_better() -> dict[str, bool]:
    """metric -> lower is better, for every task's own metrics."""
    return {m: low for t in TABLE.values() for m, low in t.metric_directions.items()}


def make_example(task: str, rec: dict[str, Any], rng: np.random.Generator, *, options: Options = Options(),
                 text_dropout: float = 0.0, extras: bool = False) -> dict[str, Any]:
    """A raw record (image, caption[, depth][, input_image]) -> a training example: 'image' float32 (H,W,3) in [-1,1]
    (the target), 'cond' float32 (H,W,C) in [-1,1] (absent for t2i) and 'caption' str (the text the model is
    conditioned on; the instruction for edit). options: the data config's task knobs (data.pipeline.task_options;
    default: the data config's defaults). extras=True also keeps what the task's metrics need
    beside the condition (sr: 'lowres', the degraded low-resolution input); training leaves them out of its batches."""
    spec = get(task)
    out: dict[str, Any] = {"image": to_signed(rec["image"]), "caption": rec.get("caption", "")}
    if spec.condition is not None:
        built = spec.condition(rec, rng, options)
        out["cond"] = np.asarray(built.pop("cond"), np.float32)
        if extras:
            out.update(built)
    # Empty captions teach the unconditional branch for classifier-free guidance.
    if text_dropout > 0 and rng.random() < text_dropout:
        out["caption"] = ""
    return out


__all__ = ["CONDITIONAL", "Options", "Reader", "SampleInput", "TABLE", "TASKS", "TEXT_TO_IMAGE", "Task",
           "condition_rgb", "get", "lower_is_better", "make_example", "to_signed", "to_uint8"]
