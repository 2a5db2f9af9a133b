"""KV cache overflow under jit: a traced length cannot raise, so every cache type
carries an `overflow` flag that `check_overflow` turns into a host-side error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxllm
from jaxllm.kv_cache import DenseKVCache, create_cache, spec_for
from jaxllm.params import init_model

ONE_LAYER = jaxllm.TINY.replace(name="one-layer", num_layers=1)


@pytest.fixture(scope="module")
def split_model():
  return nnx.split(init_model(ONE_LAYER, seed=0))


@pytest.mark.parametrize(
  "method, capacity",
  [("dense", 8), ("kivi2", 32), ("int8", 8)],  # dense, KIVI (grouped), per-token (symmetric)
)
def test_overflow_inside_jit_is_flagged_and_raised(split_model, method, capacity):
  graphdef, state = split_model

  @jax.jit
  def decode(state, cache, n):
    """`n` (traced) one-token steps in `lax.fori_loop`: the length is never concrete."""
    model = nnx.merge(graphdef, state)
    step = lambda i, cache: model(jnp.full((1, 1), 5 + i), cache=cache, logits_at="last")[1]
    return jax.lax.fori_loop(0, n, step, cache)

  def empty():
    return create_cache(spec_for(method), ONE_LAYER, 1, capacity)

  full = decode(state, empty(), capacity)  # exactly fills the cache
  assert full.length.tolist() == [capacity] and not bool(full.overflow)
  full.check_overflow()

  over = decode(state, empty(), capacity + 3)  # 3 tokens past it
  assert over.length.tolist() == [capacity + 3] and bool(over.overflow)
  with pytest.raises(ValueError, match=rf"^KV cache overflow: .* capacity of {capacity} tokens"):
    over.check_overflow()
  # the flag stays set whatever comes next
  assert bool(over.rollback(over.length - 1).overflow)
  assert bool(over.for_chunked_decode(0, 1).overflow)
  assert decode._cache_size() == 1  # one compile: the step count is traced


def test_dense_grow_and_prefill_chunk_keep_the_flag():
  kv = jnp.zeros((1, 2, 4, 8))
  chunk = DenseKVCache.from_views([kv], [kv], jnp.zeros((1,), jnp.int32))  # length 4 = capacity
  assert not bool(chunk.overflow)
  written = [(jnp.zeros((1, 2, 6, 8)),) * 2]
  assert not bool(chunk.grow(6).advance(written, 2).overflow)
  flagged = chunk.grow(6).advance(written, 3)
  assert bool(flagged.overflow) and bool(flagged.grow(8).overflow)
