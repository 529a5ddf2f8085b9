"""The evaluation's cache: reference rows and the real images' InceptionV3 features, keyed by the content of
everything that determines them.

Most of an evaluation's time goes to rows that do not depend on the model evaluated: the ground truth (its FID
noise floor is a second held-out set through InceptionV3), the VAE round trip, the task's own reference rows (sr:
bicubic), the text-only teacher sampled at 50 steps, and the real images' features every row is compared with. The
same held-out set, teacher and metric networks give the same numbers, so they are computed once and read back.

A key is the SHA-256 of a JSON of its parts: the held-out set itself (the bytes of its images, conditions, extras
and captions, and how it was drawn), the bytes of every weight file involved (metric readers, the teacher, the VAE),
the sampler settings, and the source of the code that computes them (eval_cache.CODE: a change there recomputes). A changed input is a
changed key. Entries are JSON (rows) or .npy (features, read with allow_pickle=False), written whole or not at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from absl import logging

PACKAGE = Path(__file__).resolve().parent


def default_dir() -> Path:
    """$CODI_JAX_CACHE/eval, else ~/.cache/codi_jax/eval."""
    root = os.environ.get("CODI_JAX_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "codi_jax") / "eval"


# The code a reference row runs: the held-out data and the task's conditions, the models, samplers and weight
# loading, the metrics, and the evaluation itself. Training, export, checkpoints, the command lines and the launch
# tooling are not in it, so changing those keeps the cache (and any change here recomputes it).
CODE = ("data", "diffusion", "metrics", "models", "tasks", "weights", "evaluate.py", "eval_cache.py", "inference.py",
        "sample.py", "teacher.py", "modes.py")


@functools.cache
def code_hash() -> str:
    """SHA-256 of the .py files (path and bytes) of the code a reference row runs (CODE)."""
    h = hashlib.sha256()
    files = [f for part in CODE for f in ((PACKAGE / part).rglob("*.py") if (PACKAGE / part).is_dir()
                                          else [PACKAGE / part])]
    for path in sorted(files):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file, or of a folder's files (relative paths and bytes, sorted); None for no path. Read once per
    process per (file, size, mtime)."""
    if not path:
        return None
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
        rel = [path.name]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        rel = [str(p.relative_to(path)) for p in files]
    else:
        return f"missing:{path}"
    h = hashlib.sha256()
    for name, f in zip(rel, files):
        st = f.stat()
        h.update(name.encode())
        h.update(_file_hash(str(f), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


def array_hash(*arrays) -> str:
    """SHA-256 of arrays (dtype, shape and bytes) and strings, in order."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, str):
            h.update(a.encode())
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Cache:
    """Rows and arrays under `root`, or nothing when disabled (every lookup misses, nothing is written)."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root).expanduser() if root else default_dir()
        self.enabled = enabled
        self.hits: list[str] = []  # what was read back, for the report and the tests
        self.misses: list[str] = []

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps({"code": code_hash(), **parts}, sort_keys=True,
                                         default=str).encode()).hexdigest()

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def _write(self, path: Path, write: Callable[[str], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            write(str(tmp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _cached(self, what: str, key: str, files: tuple[tuple[str, Callable, Callable], ...],
                compute: Callable[[], tuple]) -> tuple:
        """The values stored under `key` (one file per (suffix, read(path), write(value, path))), else compute()'s
        tuple of values, then stored: the last file last, so a last file on disk means all of them are."""
        paths = [self._path(key, suffix) for suffix, _, _ in files]
        if self.enabled and all(p.is_file() for p in paths):
            self.hits.append(what)
            logging.info("eval cache hit: %s (key %s, %s)", what, key[:16], paths[-1])
            return tuple(read(p) for p, (_, read, _) in zip(paths, files))
        self.misses.append(what)
        t0 = time.time()
        values = compute()
        logging.info("eval: %s computed in %.0f s", what, time.time() - t0)
        if self.enabled:
            for p, value, (_, _, write) in zip(paths, values, files):
                self._write(p, lambda tmp: write(value, tmp))
        return values

    def row(self, what: str, key: str, compute: Callable[[], dict]) -> dict:
        """The cached row `what` under `key`, else compute() (then stored)."""
        return self._cached(what, key, (_JSON,), lambda: (compute(),))[0]

    def array(self, what: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array `what` under `key`, else compute() (then stored as .npy; read without pickle)."""
        return self._cached(what, key, (_NPY,), lambda: (np.asarray(compute()),))[0]

    def row_with_images(self, what: str, key: str, compute: Callable[[], tuple[dict, np.ndarray]]
                        ) -> tuple[dict, np.ndarray]:
        """A sampled row and the images it shows in the sample grid, cached together under `key`."""
        def both():
            row, images = compute()
            return np.asarray(images), row
        images, row = self._cached(what, key, (_NPY, _JSON), both)  # the row last
        return row, images


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(value, path):
    with open(path, "w") as f:
        json.dump(value, f)


def _write_npy(value, path):
    with open(path, "wb") as f:
        np.save(f, value, allow_pickle=False)


_JSON = (".json", _read_json, _write_json)
_NPY = (".npy", lambda path: np.load(path, allow_pickle=False), _write_npy)
