"""Data: grain pipelines, sources and the procedural scene dataset (see docs/data.md); the task conditions are the
task table's (codi_jax/tasks).

The pipeline's names load on first use: the task table imports data.degradations and data.masks, which are numpy,
when configs are parsed, and must not start JAX and grain with them."""

_PIPELINE = ("cond_channels", "default_config", "make_eval_batches", "make_source", "make_train_loader", "validate")
_SOURCES = ("skipped_count", "skipped_files")
_TOKENIZER = ("builtin_vocab_size", "load_tokenizer")


def __getattr__(name):
    if name in _PIPELINE:
        from codi_jax.data import pipeline as module
    elif name in _SOURCES:
        from codi_jax.data import sources as module
    elif name in _TOKENIZER:
        from codi_jax.data import tokenizer as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


__all__ = [*_PIPELINE, *_SOURCES, *_TOKENIZER]
