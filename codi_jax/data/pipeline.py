"""grain input pipelines: deterministic, checkpointable, sharded per JAX process.

    loader = make_train_loader(cfg, global_batch_size=64, seed=0)
    it = iter(loader)            # grain DataLoaderIterator: get_state()/set_state(), orbax via grain.checkpoint
    batch = next(it)             # {'image': (b,H,W,3), 'cond': (b,H,W,C), 'input_ids': (b,77)} numpy, b = local batch

Each process reads a disjoint shard of the record indices (grain ShardOptions) and yields its slice of the global batch;
the trainer assembles global arrays with jax.make_array_from_process_local_data.
"""

from __future__ import annotations

import os
from typing import Any

import grain.python as grain
from absl import flags
import ml_collections
import numpy as np

from codi_jax import tasks
from codi_jax.data import degradations, masks, sources, tokenizer

DATASETS = ("scenes", "folder", "tfds")


def default_config() -> ml_collections.ConfigDict:
    """Data config; the defaults are the embedded CPU setting (procedural scenes, 32 px, builtin tokenizer)."""
    c = ml_collections.ConfigDict()
    c.dataset = "scenes"  # 'scenes' | 'folder' | 'tfds'
    c.task = "depth"  # 'depth' | 'sr' | 'inpaint' | 'edit' | 't2i'
    c.image_size = 32  # positive multiple of 8
    c.data_dir = ""  # folder root (dataset='folder') or tfds data_dir (dataset='tfds'; '' = tfds default)
    c.tfds_name = ""  # e.g. 'codi_scenes/32px' or any array_record-prepared tfds dataset
    c.tfds_train_split = "train"
    c.tfds_validation_split = "validation"  # for choosing defaults and ablations (config.eval.split='validation')
    c.tfds_eval_split = "test"  # the test split: only for the numbers that are reported
    c.tfds_image_key = "image"  # for edit: the edited (target) image
    c.tfds_caption_key = "caption"  # for edit: the instruction
    c.tfds_depth_key = "depth"  # metric depth (larger = farther), used by task 'depth'
    c.tfds_edit_input_key = "input_image"  # used by task 'edit'
    c.folder_caption_key = "text"  # caption column of an optional metadata.jsonl in the image folder
    c.folder_validate = False  # decode every folder image once at start-up, so skipped files are counted up front
    # A folder without train/ and test/ sub-folders is split by a stable hash of each file's path: these fractions
    # go to test and to validation (with train/ and test/: validation/, or without it a hash share of train/).
    c.folder_test_fraction = 0.05
    c.folder_validation_fraction = 0.05
    c.tokenizer = tokenizer.BUILTIN_SCENES  # or a local folder with a CLIP tokenizer, e.g. <sd>/tokenizer
    c.max_length = 77
    c.num_workers = 0  # grain worker processes per host (0 = in the main process)
    c.worker_buffer_size = 2
    c.shuffle = True  # global index shuffle (grain IndexSampler); no shuffle buffer is needed
    c.scenes_num_train = 50_000
    c.scenes_num_validation = 2_000  # 1000 evaluated scenes and 1000 more for FID's noise floor, as the tiny eval uses
    c.scenes_num_test = 1_000
    c.scenes_seed = 0  # which procedural world; the loader `seed` only changes order and augmentation randomness
    c.scenes_min_objects = 1
    c.scenes_max_objects = 3
    c.scenes_supersample = 2  # rays per pixel per axis (anti-aliasing); 1 is 4x faster at 256 px
    c.mask_fraction = 0.3  # inpaint: mean hole fraction of the free-form and box masks
    # inpaint: the holes, in training and in the evaluation's held-out batches: 'random' (free-form strokes and boxes),
    # 'object' (one rendered object, grown by a pixel; scenes only) or 'mixed' (half each); codi_jax/data/masks.py
    c.mask_kind = "random"
    c.sr_scale = 4
    # sr: how the low-res input is made: 'realesrgan' (real-world SR, the paper's second-order degradations, for
    # 256 px and larger) or 'bicubic' (a clean antialiased downsampling; the :tiny default, codi_jax/tasks/sr.py)
    c.sr_degradation = "realesrgan"
    c.text_dropout = 0.0  # probability of an empty caption (classifier-free guidance training)
    return c


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {cfg.dataset!r}")
    if cfg.task not in tasks.TASKS:
        raise ValueError(f"task must be one of {tasks.TASKS}, got {cfg.task!r}")
    if not isinstance(cfg.image_size, int) or cfg.image_size <= 0 or cfg.image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {cfg.image_size!r}")
    if cfg.dataset == "folder" and not cfg.data_dir:
        raise ValueError("data_dir must name the image folder when dataset='folder'")
    if cfg.dataset == "tfds" and not cfg.tfds_name:
        raise ValueError("tfds_name must be set when dataset='tfds'")
    if not isinstance(cfg.max_length, int) or cfg.max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {cfg.max_length!r}")
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {cfg.num_workers!r}")
    if not 0.0 < cfg.mask_fraction < 1.0:
        raise ValueError(f"mask_fraction must be in (0, 1), got {cfg.mask_fraction!r}")
    if cfg.mask_kind not in masks.KINDS:
        raise ValueError(f"mask_kind must be one of {masks.KINDS}, got {cfg.mask_kind!r}")
    if cfg.mask_kind != "random" and cfg.dataset != "scenes":
        raise ValueError(f"mask_kind={cfg.mask_kind!r} shapes inpainting holes like the procedural scenes' objects, "
                         f"and dataset={cfg.dataset!r} has no object ids: use mask_kind='random' (or dataset='scenes')")
    if cfg.sr_scale not in (2, 4, 8) or cfg.image_size % cfg.sr_scale:
        raise ValueError(f"sr_scale must be 2, 4 or 8 and divide image_size, got {cfg.sr_scale!r}")
    if cfg.sr_degradation not in degradations.KINDS:
        raise ValueError(f"sr_degradation must be one of {degradations.KINDS}, got {cfg.sr_degradation!r}")
    if not 0.0 <= cfg.text_dropout < 1.0:
        raise ValueError(f"text_dropout must be in [0, 1), got {cfg.text_dropout!r}")
    if cfg.dataset == "scenes":
        for f in ("scenes_num_train", "scenes_num_validation", "scenes_num_test", "scenes_min_objects",
                  "scenes_supersample"):
            if int(cfg[f]) < 1:
                raise ValueError(f"{f} must be >= 1, got {cfg[f]!r}")
        if cfg.scenes_max_objects < cfg.scenes_min_objects or cfg.scenes_max_objects > 5:
            raise ValueError(f"scenes_max_objects must be in [scenes_min_objects, 5], got {cfg.scenes_max_objects!r}")
    for f in ("folder_test_fraction", "folder_validation_fraction"):
        if not 0.0 <= cfg[f] < 1.0:
            raise ValueError(f"{f} must be in [0, 1), got {cfg[f]!r}")
    if cfg.folder_test_fraction + cfg.folder_validation_fraction >= 1.0:
        raise ValueError(f"folder_test_fraction + folder_validation_fraction must leave files for training, got "
                         f"{cfg.folder_test_fraction!r} + {cfg.folder_validation_fraction!r}")
    if not cfg.tokenizer:
        raise ValueError("tokenizer must be 'builtin:scenes' or a local CLIP tokenizer folder")


def cond_channels(cfg) -> int:
    """Channels of the condition image (the task table's: depth 1, sr 3, inpaint 4, edit 3, t2i 0)."""
    task = cfg if isinstance(cfg, str) else cfg.task
    return tasks.get(task).channels


def task_options(cfg) -> "tasks.Options":
    """The data config's task knobs, as the task's condition builder reads them."""
    return tasks.Options(sr_scale=int(cfg.sr_scale), sr_degradation=str(cfg.sr_degradation),
                         mask_fraction=float(cfg.mask_fraction), mask_kind=str(cfg.mask_kind))


def make_source(cfg, split: str):
    """The raw record source of a split: 'train', 'validation' (for choosing defaults and ablations) or 'test' (only
    for the numbers that are reported)."""
    validate(cfg)
    if split not in sources.SPLITS:
        raise ValueError(f"split must be one of {sources.SPLITS}, got {split!r}")
    if cfg.dataset == "scenes":
        n = cfg[f"scenes_num_{split}"]
        return sources.SceneSource(split=split, num_examples=n, image_size=cfg.image_size, seed=cfg.scenes_seed,
                                   edit=tasks.get(cfg.task).paired, min_objects=cfg.scenes_min_objects,
                                   max_objects=cfg.scenes_max_objects, supersample=cfg.scenes_supersample)
    if cfg.dataset == "folder":
        fractions = {"test_fraction": cfg.folder_test_fraction,
                     "validation_fraction": cfg.folder_validation_fraction}
        if tasks.get(cfg.task).paired:
            return sources.EditFolderSource(cfg.data_dir, split=split, image_size=cfg.image_size, **fractions)
        return sources.FolderSource(cfg.data_dir, split=split, image_size=cfg.image_size,
                                    need_depth=tasks.get(cfg.task).needs("depth"),
                                    caption_key=cfg.folder_caption_key, validate=cfg.folder_validate, **fractions)
    keys = {"image": cfg.tfds_image_key, "caption": cfg.tfds_caption_key}
    keys.update({field: cfg[config_field] for field, config_field in tasks.get(cfg.task).record_fields.items()})
    tfds_split = {"train": cfg.tfds_train_split, "validation": cfg.tfds_validation_split,
                  "test": cfg.tfds_eval_split}[split]
    return sources.TfdsSource(cfg.tfds_name, split=tfds_split, data_dir=cfg.data_dir or None,
                              image_size=cfg.image_size, keys=keys)


class NoReadableData(ValueError):
    """A full pass over the source yielded no readable record: training would wait for a batch forever."""

    MARKER = "no readable record"


class _DropBad(grain.FilterTransform):
    """Drops unreadable records, and stops the pipeline once a whole pass in a row has been unreadable.

    Without the stop, a folder in which nothing decodes is an endless loop: the sampler repeats for ever, every record
    is dropped, no batch is ever formed, and the trainer waits in next() where it cannot even act on a SIGTERM. One
    pass is exact with num_workers=0; each grain worker sees its own share, so with workers it takes at most
    num_workers passes.
    """

    def __init__(self, num_records: int, source: str):
        self.num_records, self.source = num_records, source
        self.bad_in_a_row, self.errors = 0, set()

    def filter(self, element) -> bool:
        if not element["bad"]:
            self.bad_in_a_row = 0
            return True
        self.bad_in_a_row += 1
        self.errors.add(element.get("error", "unreadable"))
        if self.bad_in_a_row >= self.num_records:
            example = sorted(self.errors)[0]
            raise NoReadableData(
                f"data: {NoReadableData.MARKER} in a full pass over {self.source}: all {self.num_records} records "
                f"were skipped, {len(self.errors)} distinct failures, e.g. {example}. Fix or remove those files "
                "(data.folder_validate=True checks every file once before training)")
        return False


class _Task(grain.RandomMapTransform):
    """Builds the task condition; grain hands each record its own rng derived from (seed, record index)."""

    def __init__(self, task: str, options: tasks.Options, text_dropout: float):
        self.task, self.options, self.text_dropout = task, options, text_dropout

    def random_map(self, element, rng: np.random.Generator):
        return tasks.make_example(self.task, element, rng, options=self.options, text_dropout=self.text_dropout)


class _Tokenize(grain.MapTransform):
    """Caption -> CLIP input_ids; strings never reach the batch (they cannot cross grain's shared memory)."""

    def __init__(self, spec: str, max_length: int):
        self.spec, self.max_length = spec, max_length

    def map(self, element):
        ids = tokenizer.tokenize_cached(self.spec, element.pop("caption"), self.max_length)
        return {**element, "input_ids": ids}


def _process_shard(process_index, process_count) -> grain.ShardOptions:
    if process_index is None and process_count is None:
        return grain.ShardByJaxProcess(drop_remainder=True)
    if process_index is None or process_count is None:
        raise ValueError("pass both process_index and process_count, or neither (then JAX's are used)")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)


def make_train_loader(cfg, *, global_batch_size: int, seed: int, process_index: int | None = None,
                      process_count: int | None = None) -> grain.DataLoader:
    """A grain DataLoader repeating forever over this process's shard, yielding its slice of each global batch."""
    validate(cfg)
    shard = _process_shard(process_index, process_count)
    if global_batch_size % shard.shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {shard.shard_count} processes")
    local_batch = global_batch_size // shard.shard_count
    if cfg.num_workers > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside app.run (tests, notebooks) they are still unparsed.
        flags.FLAGS.mark_as_parsed()
    if cfg.num_workers > 0:
        sources.new_skipped_ledger()  # before the workers start: they inherit it, so each bad file is logged once
    else:
        sources.drop_skipped_ledger()
    source = make_source(cfg, "train")
    if len(source) < shard.shard_count:
        raise ValueError(f"dataset has {len(source)} records, fewer than the {shard.shard_count} processes")
    sampler = grain.IndexSampler(num_records=len(source), shard_options=shard, shuffle=cfg.shuffle, num_epochs=None,
                                 seed=int(seed))
    ops = [_DropBad(len(source), repr(source)), _Task(cfg.task, task_options(cfg), cfg.text_dropout),
           _Tokenize(cfg.tokenizer, cfg.max_length), grain.Batch(local_batch, drop_remainder=True)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=cfg.num_workers,
                            worker_buffer_size=cfg.worker_buffer_size,
                            # Few threads: records are CPU-bound numpy work and the GIL serialises them anyway.
                            read_options=grain.ReadOptions(num_threads=2,
                                                           prefetch_buffer_size=max(2 * local_batch, 16)))


def split_size_fields(cfg, split: str) -> str:
    """What sets the number of records in a split, for a message that asks for more of them."""
    if cfg.dataset == "scenes":
        return f"data.scenes_num_{split}"
    if cfg.dataset == "tfds":
        field = {"train": "tfds_train_split", "validation": "tfds_validation_split", "test": "tfds_eval_split"}[split]
        return f"data.{field} (a larger split of {cfg.tfds_name})"
    root = cfg.data_dir
    if not tasks.get(cfg.task).paired and sources.has_split_folders(root):
        if split == "validation" and not os.path.isdir(os.path.join(root, "validation")):
            return (f"data.folder_validation_fraction (the share of {os.path.join(root, 'train')} held out), or a "
                    f"{os.path.join(root, 'validation')} folder")
        return f"more images in {os.path.join(root, split)}"
    if split == "train":
        return "more images in data.data_dir"
    return f"data.folder_{split}_fraction"


def make_eval_batches(cfg, *, batch_size: int, num_examples: int, seed: int, offset: int = 0,
                      split: str = "test", extras: bool = False) -> list[dict[str, Any]]:
    """Records `offset` .. `offset + num_examples` (of the readable ones) of a held-out split ('test', or 'validation'
    to choose settings on) as deterministic batches (same keys as training, plus 'caption'); a second, disjoint set
    (offset = num_examples) gives FID's noise floor.

    Task randomness (masks, degradations) is drawn from (seed, record index), so every call returns the same batches.
    Unreadable files are skipped; the last batch may be smaller. extras=True adds what the task's metrics need beside
    the condition (tasks.make_example; sr: 'lowres').
    """
    validate(cfg)
    source = make_source(cfg, split)
    if offset + num_examples > len(source):
        raise ValueError(f"num_examples {num_examples} (from {split} record {offset}) exceeds the {len(source)} "
                         f"{split} records (a larger {split} split: {split_size_fields(cfg, split)})")
    examples = []
    readable = 0
    options = task_options(cfg)
    for i in range(len(source)):
        if len(examples) == num_examples:
            break
        rec = source[i]
        if rec["bad"]:
            continue
        readable += 1
        if readable <= offset:
            continue
        ex = tasks.make_example(cfg.task, rec, np.random.default_rng([int(seed), i]), options=options,
                                text_dropout=0.0, extras=extras)
        examples.append(ex)
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        caps = [e["caption"] for e in chunk]
        b = {"image": np.stack([e["image"] for e in chunk]), "caption": caps,
             "input_ids": tokenizer.tokenize(cfg.tokenizer, caps, cfg.max_length)}
        b.update({k: np.stack([e[k] for e in chunk]) for k in chunk[0] if k not in ("image", "caption")})
        batches.append(b)
    return batches
