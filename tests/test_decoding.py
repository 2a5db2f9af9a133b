"""Generation loop: stopping rules, no retracing, and bad-input errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.decoding import Generator
from jaxllm.kv_cache import KVCache
from jaxllm.sampling import SamplingConfig


@pytest.fixture(scope="module")
def gen(tiny_model):
  return jaxllm.Generator(tiny_model, max_cache_len=64, prompt_bucket=16)


def test_decode_step_is_traced_once(gen):
  before = gen._step._cache_size()
  gen.generate([[1, 2, 3]], 12, stop_at_eos=False)
  gen.generate([[4, 5]], 12, stop_at_eos=False)
  assert gen._step._cache_size() - before <= 1


def test_stops_at_eos_and_max_new_tokens(gen):
  out = gen.generate([[1, 2, 3]], 10, stop_at_eos=False)
  assert len(out.tokens[0]) == 10 and out.finished == [False]
  first = out.tokens[0][0]
  stopper = jaxllm.Generator(gen_model := gen_model_with_eos(gen, first), max_cache_len=64)
  out = stopper.generate([[1, 2, 3]], 10)
  assert out.tokens == [[]] and out.finished == [True]
  del gen_model


def gen_model_with_eos(gen, eos_id):
  """The same weights with `eos_id` as EOS, so the first generated token stops."""
  from flax import nnx

  model = nnx.merge(gen.graphdef, gen.state)
  model.config = model.config.replace(eos_id=int(eos_id))
  return model


def test_sampling_needs_a_key(gen):
  with pytest.raises(ValueError, match="PRNG key"):
    gen.generate([[1]], 2, SamplingConfig(temperature=1.0))
  a = gen.generate([[1]], 5, SamplingConfig(1.0), key=jax.random.key(1), stop_at_eos=False)
  b = gen.generate([[1]], 5, SamplingConfig(1.0), key=jax.random.key(1), stop_at_eos=False)
  assert a.tokens == b.tokens


def test_prompt_longer_than_cache_names_both_lengths(gen):
  with pytest.raises(ValueError, match=r"60 tokens.*needs 70 cache slots.*holds 64"):
    gen.generate([list(range(1, 61))], 10)


@pytest.mark.parametrize(
  "prompts, match",
  [
    ([], "non-empty list"),
    ([[]], "prompt 0 is empty"),
    ([[1], [99999]], "outside"),
  ],
)
def test_bad_prompts(gen, prompts, match):
  with pytest.raises(ValueError, match=match):
    gen.generate(prompts, 4)


def test_streaming_callback_sees_every_token(gen):
  seen = []
  out = gen.generate(
    [[1, 2], [3]], 5, on_tokens=lambda ids: seen.append(ids.copy()), stop_at_eos=False
  )
  np.testing.assert_array_equal(np.stack(seen, 1), np.asarray(out.tokens))


def test_cache_factory_path_matches_default(tiny_model):
  # Prefill into an empty cache built by `make_cache` (the path compressed caches
  # take) must generate exactly what the default prefill-then-grow path does.
  cfg = tiny_model.config
  prompts = [[5, 6, 7, 8, 9], [3, 4]]
  default = Generator(tiny_model, max_cache_len=128).generate(prompts, 12, stop_at_eos=False)
  factory = Generator(
    tiny_model,
    max_cache_len=128,
    make_cache=lambda b, c, start: KVCache.create(cfg, b, c, start=start),
  ).generate(prompts, 12, stop_at_eos=False)
  assert factory.tokens == default.tokens
  assert len(factory.tokens[0]) == 12
