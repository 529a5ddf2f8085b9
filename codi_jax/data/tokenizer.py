"""CLIP tokenizers: a user's local folder (e.g. SD's tokenizer/) or a builtin one for the scene captions.

`load_tokenizer("builtin:scenes")` builds a genuine transformers CLIPTokenizer whose byte-level BPE vocab and merges are
learned from the scene caption grammar, so every caption word is one token, any other text falls back to byte tokens,
and bos/eos/pad follow CLIP. No file is downloaded, ever.
"""

from __future__ import annotations

import collections
import functools
import os

import numpy as np

BUILTIN_SCENES = "builtin:scenes"
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on the word list until every word is a single symbol (CLIP's '</w>' word-end convention)."""
    b2u = _bytes_to_unicode()
    segs = {}
    for w in words:
        chars = [b2u[b] for b in w.encode("utf-8")]
        segs[w] = chars[:-1] + [chars[-1] + "</w>"]
    merges: list[tuple[str, str]] = []
    while True:
        counts: collections.Counter = collections.Counter()
        for s in segs.values():
            for pair in zip(s, s[1:]):
                counts[pair] += 1
        if not counts:
            return merges
        # Deterministic tie-break so the vocabulary never depends on dict or hash order.
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out


@functools.lru_cache(maxsize=None)
def builtin_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the builtin scenes tokenizer, in CLIP's layout: bytes, bytes+'</w>', merges, bos, eos."""
    from codi_jax.data import scenes  # local import: the scene module is heavier than this one

    words = sorted(set(scenes.caption_words()))
    merges = _learn_merges(words)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]


def builtin_vocab_size() -> int:
    return len(builtin_vocab_and_merges()[0])


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str):
    """`builtin:scenes` or a local folder holding a CLIP tokenizer (vocab.json + merges.txt, as SD's tokenizer/)."""
    from transformers import CLIPTokenizer  # seconds to import; grain's worker processes import this module too

    if spec == BUILTIN_SCENES:
        vocab, merges = builtin_vocab_and_merges()
        return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], unk_token=_EOS,
                             bos_token=_BOS, eos_token=_EOS, pad_token=_EOS, model_max_length=77)
    if spec.startswith("builtin:"):
        raise ValueError(f"tokenizer: unknown builtin {spec!r}; the only builtin is {BUILTIN_SCENES!r}")
    if not os.path.isdir(spec):
        raise ValueError(f"tokenizer: {spec!r} is neither {BUILTIN_SCENES!r} nor a local folder with "
                         "vocab.json/merges.txt")
    missing = [f for f in ("vocab.json", "merges.txt") if not os.path.exists(os.path.join(spec, f))]
    if missing and not os.path.exists(os.path.join(spec, "tokenizer.json")):
        raise ValueError(f"tokenizer: folder {spec!r} lacks {missing} "
                         "(expected a CLIP tokenizer, e.g. SD's tokenizer/)")
    # from_pretrained on a local directory never touches the network.
    return CLIPTokenizer.from_pretrained(spec, local_files_only=True)


def tokenize(spec: str, texts: list[str], max_length: int = 77) -> np.ndarray:
    """int32 (len(texts), max_length) ids, padded/truncated as CLIP's text encoder expects."""
    tok = load_tokenizer(spec)
    ids = tok(list(texts), padding="max_length", max_length=max_length, truncation=True,
              return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)


@functools.lru_cache(maxsize=1 << 16)
def _tokenize_one(spec: str, text: str, max_length: int) -> np.ndarray:
    ids = tokenize(spec, [text], max_length)[0]
    ids.flags.writeable = False  # shared by every hit of the cache
    return ids


def tokenize_cached(spec: str, text: str, max_length: int = 77) -> np.ndarray:
    """One caption's ids; cached, since procedural and real captions repeat and each HF call costs ~0.5 ms."""
    return _tokenize_one(spec, text, max_length)
