"""`jaxllm.kv_cache.cache_factory`: the one `make_cache(batch, capacity, start)` that
`Generator` and `StreamingScorer` take, and the refusal of factories of another shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import kv_cache
from jaxllm.decoding import Generator
from jaxllm.streaming import StreamingConfig, StreamingScorer


@pytest.mark.parametrize("name", ["dense", "int8", "kivi2", "kivi2_r128_s4", "rotatekv2"])
def test_factory_builds_what_create_cache_builds(name):
  """By name or by spec, the factory passes dtype and the rows' start slots through."""
  cfg, start = jaxllm.TINY, jnp.asarray([5, 0], jnp.int32)
  spec = kv_cache.spec_for(name)
  want = kv_cache.create_cache(spec, cfg, 2, 128, jnp.bfloat16, None, start)
  want_leaves, want_tree = jax.tree.flatten(want)
  for spec_or_name in (name, spec):
    cache = kv_cache.cache_factory(spec_or_name, cfg, jnp.bfloat16)(2, 128, start)
    leaves, tree = jax.tree.flatten(cache)
    assert tree == want_tree
    for got, ref in zip(leaves, want_leaves, strict=True):
      assert got.dtype == ref.dtype
      np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(cache.start, [5, 0])
    assert cache.capacity == 128
  if name == "dense":
    assert cache.keys[0].dtype == jnp.bfloat16


def test_factory_refuses_bad_specs_before_any_cache():
  cfg = jaxllm.TINY
  with pytest.raises(ValueError, match="fireq_int4 needs the post-RoPE key scale"):
    kv_cache.cache_factory("fireq_int4", cfg)  # no calibration
  with pytest.raises(ValueError, match="unknown KV cache method 'kivi3'"):
    kv_cache.cache_factory("kivi3", cfg)
  with pytest.raises(TypeError, match="spec must be a CacheSpec or a preset name, got 4"):
    kv_cache.cache_factory(4, cfg)


class _Factory:
  def __call__(self, batch, capacity, start=None):
    return kv_cache.create_cache(kv_cache.spec_for("dense"), jaxllm.TINY, batch, capacity)


@pytest.mark.parametrize("owner", ["Generator", "StreamingScorer"])
def test_only_a_batch_capacity_start_factory_is_taken(tiny_model, owner):
  """A factory without `start` (StreamingScorer's old `(batch, capacity)`) or a
  non-callable is refused when the object is built, naming it; any callable that
  takes (batch, capacity, start) is accepted."""

  def build(make_cache):
    if owner == "Generator":
      return Generator(tiny_model, make_cache=make_cache)
    return StreamingScorer(tiny_model, make_cache, StreamingConfig())

  two_args = lambda b, c: kv_cache.create_cache(kv_cache.spec_for("dense"), jaxllm.TINY, b, c)
  with pytest.raises(
    TypeError,
    match=rf"^{owner}: make_cache\(b, c\) cannot be called as make_cache\(batch, capacity, "
    r"start\) .*jaxllm\.kv_cache\.cache_factory",
  ):
    build(two_args)
  with pytest.raises(TypeError, match=f"^{owner}: make_cache must be callable, got str"):
    build("kivi2")
  for ok in (kv_cache.cache_factory("kivi2", jaxllm.TINY), _Factory(), lambda *args: None):
    assert build(ok).make_cache is ok
