"""Data: grain pipelines, sources, task conditions and the procedural scene dataset (see docs/data.md)."""

from codi_jax.data.pipeline import cond_channels
from codi_jax.data.pipeline import default_config
from codi_jax.data.pipeline import make_eval_batches
from codi_jax.data.pipeline import make_source
from codi_jax.data.pipeline import make_train_loader
from codi_jax.data.pipeline import validate
from codi_jax.data.sources import skipped_count, skipped_files
from codi_jax.data.tokenizer import builtin_vocab_size
from codi_jax.data.tokenizer import load_tokenizer

__all__ = [
    "builtin_vocab_size", "cond_channels", "default_config", "load_tokenizer", "make_eval_batches", "make_source",
    "make_train_loader", "skipped_count", "skipped_files", "validate",
]
