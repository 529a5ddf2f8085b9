"""Cache of precomputed text embeddings keyed by caption (a frozen text encoder then runs once per distinct caption).

Stored as one .npz (captions as a unicode array, embeddings as float arrays); read with allow_pickle=False.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def build_cache(captions: Sequence[str], encode: Callable[[list[str]], np.ndarray], path: str,
                batch_size: int = 64) -> None:
    """Encodes every distinct caption with `encode` (list[str] -> (n, ...) array) and writes `path` (.npz)."""
    unique = sorted(set(captions))
    if not unique:
        raise ValueError("build_cache: no captions given")
    embs = [np.asarray(encode(unique[i:i + batch_size])) for i in range(0, len(unique), batch_size)]
    np.savez(path, captions=np.asarray(unique, dtype=str), embeddings=np.concatenate(embs, 0))


class TextEmbeddingCache:
    """Lookup of cached embeddings; a caption that was never cached is an error, not a silent zero."""

    def __init__(self, path: str):
        with np.load(path, allow_pickle=False) as f:
            self.captions = f["captions"]
            self.embeddings = f["embeddings"]
        self._index = {str(c): i for i, c in enumerate(self.captions)}

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, captions: Sequence[str]) -> np.ndarray:
        missing = [c for c in captions if c not in self._index]
        if missing:
            raise KeyError(f"{len(missing)} caption(s) not in the text-embedding cache, e.g. {missing[0]!r}")
        return self.embeddings[[self._index[c] for c in captions]]
