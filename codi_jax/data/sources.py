"""Random-access data sources (grain's RandomAccessDataSource protocol: __len__ and __getitem__).

Every source yields raw records at the configured resolution:
  'image'        uint8 (H,W,3)  the target image (for edit: the edited image)
  'caption'      str            caption (for edit: the instruction)
  'depth'        float32 (H,W)  metric depth, larger = farther       (scenes, tfds; optional)
  'disparity'    float32 (H,W)  inverse-depth-like, larger = nearer (folders, from prepare_depth; optional)
  'input_image'  uint8 (H,W,3)  edit input (edit task only)
  'bad'          bool           True when the file could not be decoded; the pipeline filters these out
  'error'        str            (bad records only) the file and why it could not be read
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from codi_jax.data import scenes

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEPTH_DIR = "depth"  # prepare_depth writes <root>/depth/<relative stem>.png
# Image files skipped because they could not be decoded, counted in this process. grain's worker processes
# (data.num_workers > 0) each read their own share, so they also share a ledger folder (SKIPPED_DIR_ENV, set by
# the train loader before its workers start): one empty file per unreadable file, created exclusively, so each
# file is logged once by whichever process meets it first, and every process counts the same distinct files.
SKIPPED = collections.Counter()
SKIPPED_DIR_ENV = "CODI_JAX_SKIPPED_LEDGER"


def new_skipped_ledger() -> str:
    """A fresh ledger folder for this process and the worker processes it starts next (removed at exit). Never one
    inherited from a parent process: a run launched from another (a notebook, a test) counts only its own files."""
    folder = tempfile.mkdtemp(prefix="codi_jax_skipped_")
    os.environ[SKIPPED_DIR_ENV] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def drop_skipped_ledger() -> None:
    """Back to this process's own count (no workers), whatever a parent process left in the environment."""
    os.environ.pop(SKIPPED_DIR_ENV, None)


def skipped_count() -> int:
    """Failed reads in this process (a file that stays unreadable counts once per pass)."""
    return sum(SKIPPED.values())


def skipped_files() -> int:
    """Distinct files found unreadable, by this process and the workers sharing its ledger (each logged once)."""
    folder = os.environ.get(SKIPPED_DIR_ENV)
    if folder and os.path.isdir(folder):
        return len(os.listdir(folder))
    return len(SKIPPED)


def _first_sighting(path: str) -> bool:
    folder = os.environ.get(SKIPPED_DIR_ENV)
    if not folder:
        return path not in SKIPPED
    marker = os.path.join(folder, hashlib.sha1(path.encode()).hexdigest())
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:  # the ledger is gone (e.g. removed at exit): fall back to this process's own memory
        return path not in SKIPPED


def _skip(path: str, err: Exception, what: str = "image") -> str:
    """Counts a failed read; logs the file only the first time, so a long run's log does not repeat it every pass."""
    first = _first_sighting(path)
    SKIPPED[path] += 1
    if first:
        logging.warning("skipping unreadable %s %s (unreadable files so far: %d): %s", what, path, skipped_files(),
                        err)
    return f"{path}: {err}"


def _center_crop_resize(img: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), resample)


def load_image(path: str, size: int) -> np.ndarray:
    """uint8 (size,size,3), centre-cropped; raises OSError/ValueError on unreadable or truncated files."""
    with Image.open(path) as im:
        im.load()  # forces the full decode, so truncated files fail here instead of yielding grey garbage
        return np.asarray(_center_crop_resize(im.convert("RGB"), size))


def load_disparity(path: str, size: int) -> np.ndarray:
    """A prepare_depth map (16-bit PNG, near = bright) as float32 (size,size) in [0,1]."""
    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im).astype(np.float32)
        scale = 65535.0 if arr.max() > 255 or im.mode.startswith("I") else 255.0
        f = Image.fromarray(arr / scale, mode="F")
        return np.asarray(_center_crop_resize(f, size, Image.Resampling.BILINEAR), np.float32)


SPLITS = ("train", "validation", "test")


def _split_of(rel: str, test_fraction: float, validation_fraction: float) -> str:
    """'test', 'validation' or 'train' from a stable hash of the relative path: a file never changes split when files
    are added, and the splits never overlap. Test takes the hash's first `test_fraction` (the same files as before
    validation existed), validation the next `validation_fraction`."""
    bucket = zlib.crc32(rel.encode()) % 10_000
    if bucket < test_fraction * 10_000:
        return "test"
    return "validation" if bucket < (test_fraction + validation_fraction) * 10_000 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class SceneSource:
    """The procedural scene dataset: example i of a split is rendered on the fly, deterministically from (seed, i)."""

    def __init__(self, *, split: str, num_examples: int, image_size: int, seed: int = 0, edit: bool = False,
                 min_objects: int = 1, max_objects: int = 3, supersample: int = 2):
        if split not in scenes.SPLITS:
            raise ValueError(f"split must be one of {list(scenes.SPLITS)}, got {split!r}")
        self.split, self.num_examples, self.image_size, self.seed = split, int(num_examples), int(image_size), int(seed)
        self.edit, self.min_objects, self.max_objects, self.supersample = edit, min_objects, max_objects, supersample

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        ex = scenes.render_example(self.seed, int(index), self.split, self.image_size, edit=self.edit,
                                   min_objects=self.min_objects, max_objects=self.max_objects,
                                   supersample=self.supersample)
        if self.edit:
            ex["caption"] = ex.pop("instruction")
        ex["bad"] = False
        return ex

    def __repr__(self) -> str:  # grain stores the source's repr in iterator checkpoints
        return f"SceneSource(split={self.split}, n={self.num_examples}, size={self.image_size}, edit={self.edit})"


def has_split_folders(root: str) -> bool:
    """A folder dataset laid out as root/train and root/test (optionally root/validation)."""
    return os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test"))


def _list_images(root: str, exclude: tuple[str, ...] = ()) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if os.path.relpath(os.path.join(dirpath, d), root) not in exclude)
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTS):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return out


class FolderSource:
    """Images under a folder (recursive), captions from same-stem .txt files or an imagefolder-style metadata.jsonl.

    Splits: `root/train` and `root/test` when both exist (and `root/validation` when present; without it there is no
    validation split); otherwise a stable hash split of the relative paths,
    `test_fraction` for test and `validation_fraction` for validation (see _split_of).
    Unreadable or truncated images are skipped and counted (see SKIPPED); with validate=True every file is decoded once
    here so the count is exact before training starts.
    """

    def __init__(self, root: str, *, split: str, image_size: int, need_depth: bool = False, caption_key: str = "text",
                 test_fraction: float = 0.05, validation_fraction: float = 0.05, validate: bool = False):
        _check_split(split)
        if not os.path.isdir(root):
            raise ValueError(f"data_dir: {root!r} is not a folder")
        # Paths are kept relative to root, so depth maps live at root/depth/<same relative path> in both layouts.
        if has_split_folders(root):
            # The user's own split folders are taken as they are: train/ is never shrunk to make a validation split
            # (that would change what an existing run trains on); validation is root/validation, if there is one.
            if split == "validation" and not os.path.isdir(os.path.join(root, "validation")):
                raise ValueError(f"data_dir: {root!r} has train/ and test/ folders but no validation/ folder: add one "
                                 "to evaluate on validation (your train/ is used as it is)")
            files = [os.path.join(split, f) for f in _list_images(os.path.join(root, split), (DEPTH_DIR,))]
            meta_dirs = ["", split]
        else:
            files = [f for f in _list_images(root, (DEPTH_DIR,))
                     if _split_of(f, test_fraction, validation_fraction) == split]
            meta_dirs = [""]
        if not files:
            raise ValueError(f"data_dir: no images ({', '.join(IMAGE_EXTS)}) for split {split!r} under {root!r}")
        self.root, self.image_size, self.need_depth = root, int(image_size), need_depth
        self.captions = self._read_metadata(root, meta_dirs, caption_key)
        self.skipped = self.missing_depth = 0
        if need_depth:
            have = [f for f in files if os.path.exists(self._depth_path(f))]
            if not have:
                raise ValueError(f"task 'depth' needs depth maps, and none exist "
                                 f"(e.g. {self._depth_path(files[0])!r}); run `python -m codi_jax.data.prepare_depth "
                                 f"--images {root} --model /path/to/depth-model` first")
            if len(have) < len(files):
                # Typically the unreadable images prepare_depth skipped; they would be skipped here anyway.
                self.missing_depth = len(files) - len(have)
                logging.warning("%d of %d images under %s have no depth map; leaving them out", self.missing_depth,
                                len(files), root)
            files = have
        if validate:
            good = []
            for f in files:
                try:
                    load_image(os.path.join(root, f), 8)
                    good.append(f)
                except Exception as e:  # noqa: BLE001 -- any decoder failure means the file is unusable
                    self._count_bad(f, e)
            if not good:
                raise ValueError(f"data_dir: none of the {len(files)} images under {root!r} can be decoded")
            files = good
        self.files = files

    @staticmethod
    def _read_metadata(root: str, meta_dirs: list[str], caption_key: str) -> dict[str, str] | None:
        """Captions from metadata.jsonl files (HF imagefolder style: file_name relative to the jsonl's folder)."""
        caps: dict[str, str] | None = None
        for sub in meta_dirs:
            path = os.path.join(root, sub, "metadata.jsonl")
            if not os.path.exists(path):
                continue
            caps = caps or {}
            with open(path) as f:
                for n, line in enumerate(f):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if caption_key not in row or "file_name" not in row:
                        raise ValueError(f"{path}:{n + 1}: needs 'file_name' and the caption column {caption_key!r} "
                                         f"(folder_caption_key); found {sorted(row)}")
                    caps[os.path.normpath(os.path.join(sub, row["file_name"]))] = str(row[caption_key])
        return caps

    def _depth_path(self, rel: str) -> str:
        return os.path.join(self.root, DEPTH_DIR, os.path.splitext(rel)[0] + ".png")

    def _count_bad(self, rel: str, err: Exception) -> str:
        self.skipped += 1
        return _skip(os.path.join(self.root, rel), err)

    def caption(self, rel: str) -> str:
        if self.captions is not None:
            return self.captions.get(rel, "")
        txt = os.path.join(self.root, os.path.splitext(rel)[0] + ".txt")
        if os.path.exists(txt):
            with open(txt, encoding="utf-8") as f:
                return f.read().strip()
        return ""

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rel = self.files[index]
        s = self.image_size
        try:
            ex = {"image": load_image(os.path.join(self.root, rel), s), "caption": self.caption(rel), "bad": False}
            if self.need_depth:
                ex["disparity"] = load_disparity(self._depth_path(rel), s)
            return ex
        except Exception as e:  # noqa: BLE001 -- skip-and-count is the contract for bad files
            ex = {"image": np.zeros((s, s, 3), np.uint8), "caption": "", "bad": True, "error": self._count_bad(rel, e)}
            if self.need_depth:
                ex["disparity"] = np.zeros((s, s), np.float32)
            return ex

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, n={len(self.files)})"


class EditFolderSource:
    """Instruction-editing triplets: root/input/<stem>.<ext>, root/edited/<stem>.<ext>, root/instruction/<stem>.txt,
    split by a stable hash of the stem as FolderSource splits a flat folder."""

    def __init__(self, root: str, *, split: str, image_size: int, test_fraction: float = 0.05,
                 validation_fraction: float = 0.05):
        _check_split(split)
        dirs = {k: os.path.join(root, k) for k in ("input", "edited", "instruction")}
        absent = [d for d in dirs.values() if not os.path.isdir(d)]
        if absent:
            raise ValueError(f"data_dir: edit folders need input/, edited/ and instruction/; missing {absent}")
        edited = {os.path.splitext(f)[0]: f for f in _list_images(dirs["edited"])}
        inputs = {os.path.splitext(f)[0]: f for f in _list_images(dirs["input"])}
        stems = sorted(s for s in edited
                       if s in inputs and os.path.exists(os.path.join(dirs["instruction"], s + ".txt"))
                       and _split_of(s, test_fraction, validation_fraction) == split)
        if not stems:
            raise ValueError(f"data_dir: no complete (input, edited, instruction) triplets for split {split!r} "
                             f"in {root!r}")
        self.dirs, self.image_size, self.skipped = dirs, int(image_size), 0
        self.items = [(inputs[s], edited[s], s + ".txt") for s in stems]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        inp, out, txt = self.items[index]
        s = self.image_size
        try:
            with open(os.path.join(self.dirs["instruction"], txt), encoding="utf-8") as f:
                instruction = f.read().strip()
            return {"input_image": load_image(os.path.join(self.dirs["input"], inp), s),
                    "image": load_image(os.path.join(self.dirs["edited"], out), s),
                    "caption": instruction, "bad": False}
        except Exception as e:  # noqa: BLE001
            self.skipped += 1
            error = _skip(os.path.join(self.dirs["edited"], out), e, "edit triplet")
            z = np.zeros((s, s, 3), np.uint8)
            return {"input_image": z, "image": z, "caption": "", "bad": True, "error": error}

    def __repr__(self) -> str:  # grain stores the source's repr in iterator checkpoints
        return f"EditFolderSource({os.path.dirname(self.dirs['input'])!r}, n={len(self.items)})"


class TfdsSource:
    """A tensorflow-datasets dataset prepared as array_record, read by random access (tfds.data_source).

    `keys` maps our record fields ('image', 'caption', optionally 'depth', 'input_image') to the dataset's feature
    names.
    """

    def __init__(self, name: str, *, split: str, data_dir: str | None, image_size: int, keys: dict[str, str]):
        import tensorflow_datasets as tfds  # optional (TensorFlow): only the tfds sources need it

        self.name, self.split, self.data_dir, self.image_size, self.keys = name, split, data_dir, int(image_size), keys
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 -- tfds raises several types for "not found"
            raise ValueError(f"tfds_name: cannot open {name!r} in {data_dir!r}: {e}") from e
        features = set(builder.info.features.keys())
        missing = {ours: theirs for ours, theirs in keys.items() if theirs not in features}
        if missing:
            raise ValueError(f"tfds dataset {name!r} lacks feature(s) {missing} (set tfds_*_key); "
                             f"it has {sorted(features)}")
        if split not in builder.info.splits:
            raise ValueError(f"tfds dataset {name!r} has no split {split!r}; it has {list(builder.info.splits)}")
        self._len = builder.info.splits[split].num_examples
        self._source = None  # opened lazily so the object pickles cheaply into grain workers

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds  # as above, and again in each grain worker that opens it

            self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        return self._source

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._open()[int(index)]
        s = self.image_size
        ex: dict[str, Any] = {"bad": False}
        for ours, theirs in self.keys.items():
            v = rec[theirs]
            if ours == "caption":
                ex[ours] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
            elif ours == "depth":
                d = np.asarray(v, np.float32)
                d = d[..., 0] if d.ndim == 3 else d
                if d.shape != (s, s):
                    d = np.asarray(_center_crop_resize(Image.fromarray(d, mode="F"), s, Image.Resampling.BILINEAR))
                ex[ours] = d
            else:
                img = np.asarray(v)
                if img.shape[:2] != (s, s):
                    img = np.asarray(_center_crop_resize(Image.fromarray(img).convert("RGB"), s))
                ex[ours] = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img, 3, -1)
        return ex

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split})"
