"""Chunked (memory-efficient) attention in layers.dot_product_attention equals the exact path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.models import layers


def _qkv(lq, lk, heads=2, d=8, b=2, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (b, lq, heads * d)), jax.random.normal(kk, (b, lk, heads * d)),
            jax.random.normal(kv, (b, lk, heads * d)))


@pytest.mark.parametrize("lq,lk,chunk_scores", [
    (64, 64, 16 * 64),   # 4 even chunks of 16 queries
    (37, 40, 10 * 40),   # 37 queries in 4 chunks of 10: padded by 3
    (50, 7, 3 * 7),      # cross-attention shape (few keys), 17 chunks of 3 with padding
])
@pytest.mark.parametrize("upcast", [False, True])
def test_chunked_matches_exact_forward_and_grad(lq, lk, chunk_scores, upcast):
    q, k, v = _qkv(lq, lk)
    assert layers._query_chunk(lq, lk, chunk_scores) < lq  # the chunked path is really taken

    def loss(q, k, v, chunk):
        out = layers.dot_product_attention(q, k, v, heads=2, upcast=upcast, chunk_scores=chunk)
        return jnp.sum(jnp.sin(out)), out

    (_, exact), g_exact = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 0)
    (_, chunked), g_chunked = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                                      static_argnums=3)(q, k, v, chunk_scores)
    np.testing.assert_allclose(chunked, exact, atol=1e-5, rtol=1e-5)
    for a, e in zip(g_chunked, g_exact):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)


def test_module_knob_and_bf16():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(48, 48))
    exact = layers.dot_product_attention(q, k, v, heads=2, chunk_scores=0)
    old = layers.ATTENTION_CHUNK_SCORES
    try:
        layers.ATTENTION_CHUNK_SCORES = 12 * 48
        chunked = layers.dot_product_attention(q, k, v, heads=2)
    finally:
        layers.ATTENTION_CHUNK_SCORES = old
    assert chunked.dtype == jnp.bfloat16 and chunked.shape == exact.shape
    np.testing.assert_allclose(np.asarray(chunked, np.float32), np.asarray(exact, np.float32), atol=1e-2)


def test_short_sequences_stay_exact():
    assert layers._query_chunk(1024, 1024, layers.ATTENTION_CHUNK_SCORES) == 1024   # SD 32x32 level: exact
    assert layers._query_chunk(4096, 77, layers.ATTENTION_CHUNK_SCORES) == 4096     # cross-attention: exact
    assert layers._query_chunk(4096, 4096, layers.ATTENTION_CHUNK_SCORES) == 512    # SD 64x64 level: 8 chunks
    assert layers._query_chunk(4097, 4096, 1 << 21) == 456                            # balanced: 9 chunks, pad 7
