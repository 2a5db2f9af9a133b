"""The decoder: cache consistency, left padding, logical axes, sharded execution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxllm
from jaxllm.kv_cache import DenseKVCache
from jaxllm.params import logical_axes


def _forward(model, tokens, **kw):
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, state)(jnp.asarray(tokens, jnp.int32), **kw)


def test_incremental_decode_equals_full_forward(tiny_model):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, tiny_model.config.vocab_size, size=(2, 12))
  full, _ = _forward(tiny_model, tokens)
  cache = DenseKVCache.create(tiny_model.config, batch=2, capacity=16)
  logits, cache = _forward(tiny_model, tokens[:, :5], cache=cache)  # chunked prefill into a cache
  steps = [logits]
  for i in range(5, 12):
    logits, cache = _forward(tiny_model, tokens[:, i : i + 1], cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache.length, [12, 12])  # one length per row


def test_rollback_forgets_tokens(tiny_model):
  """After rolling back, re-feeding other tokens gives the logits of that new sequence."""
  rng = np.random.default_rng(1)
  a = rng.integers(0, tiny_model.config.vocab_size, size=(1, 8))
  b = a.copy()
  b[:, 5:] = (b[:, 5:] + 7) % tiny_model.config.vocab_size
  cache = DenseKVCache.create(tiny_model.config, batch=1, capacity=8)
  _, cache = _forward(tiny_model, a, cache=cache)
  logits, cache = _forward(tiny_model, b[:, 5:], cache=cache.rollback(5))
  np.testing.assert_allclose(logits, _forward(tiny_model, b)[0][:, 5:], atol=1e-4)


def test_left_padding_matches_unpadded(tiny_model):
  rng = np.random.default_rng(2)
  short = rng.integers(0, tiny_model.config.vocab_size, size=(1, 5))
  padded = np.concatenate([np.zeros((1, 3), np.int64), short], 1)
  want, _ = _forward(tiny_model, short)
  got, _ = _forward(tiny_model, padded, start=jnp.array([3]))
  np.testing.assert_allclose(got[:, 3:], want, atol=1e-4)


def test_batched_generation_equals_one_by_one(tiny_model):
  gen = jaxllm.Generator(tiny_model, prompt_bucket=8)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [3]]
  batched = gen.generate(prompts, 6, stop_at_eos=False).tokens
  single = [gen.generate([p], 6, stop_at_eos=False).tokens[0] for p in prompts]
  assert batched == single


def test_every_param_has_logical_axes(tiny_model):
  axes = jax.tree.leaves(logical_axes(tiny_model), is_leaf=lambda x: isinstance(x, tuple))
  shapes = jax.tree.leaves(nnx.state(tiny_model).to_pure_dict())
  assert len(axes) == len(shapes)
  for names, x in zip(axes, shapes):
    assert len(names) == x.ndim and all(isinstance(n, str) for n in names), names


def test_sharded_forward_matches_unsharded(tiny_model):
  """8 fake CPU devices (tests/conftest.py), data=4 x tensor=2: same logits as one device."""
  import sharding

  tokens = np.random.default_rng(0).integers(0, 512, size=(4, 16)).astype(np.int32)
  gd, state = nnx.split(tiny_model)
  f = jax.jit(lambda s, t: nnx.merge(gd, s)(t)[0])
  want = np.asarray(f(state, tokens))
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  params = sharding.shard_params(state.to_pure_dict(), logical_axes(tiny_model), mesh)
  placed = nnx.State(state)
  placed.replace_by_pure_dict(params)
  q = placed.to_pure_dict()["layers"][0]["attn"]["q"]
  assert q.sharding.spec[1] == "tensor", q.sharding
  with jax.set_mesh(mesh):
    got = np.asarray(f(placed, tokens))
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert len(jax.devices()) == 8


def test_cache_axes_have_rules():
  import sharding

  spec = sharding.logical_to_spec(DenseKVCache.LOGICAL_AXES)
  assert tuple(spec) == (("data", "fsdp"), "tensor", None, None)  # slots, dim whole


def test_untied_head_and_mqa():
  """An untied LM head and a single KV head (MQA) run through the same code."""
  from jaxllm.params import init_model

  cfg = jaxllm.TINY.replace(name="tiny-untied-mqa", tie_embeddings=False, num_kv_heads=1)
  model = init_model(cfg, seed=3)
  assert model.lm_head.shape == (cfg.embed_dim, cfg.vocab_size)
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(1, 6))
  full, _ = _forward(model, tokens)
  cache = DenseKVCache.create(cfg, batch=1, capacity=8)
  _, cache = _forward(model, tokens[:, :5], cache=cache)
  last, _ = _forward(model, tokens[:, 5:], cache=cache)
  np.testing.assert_allclose(last[:, 0], full[:, 5], atol=1e-4)
