"""Generation loop: stopping rules, no retracing, and bad-input errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxllm
from jaxllm import kv_cache
from jaxllm.decoding import Generator
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
    tiny_model, max_cache_len=128, make_cache=kv_cache.cache_factory("dense", cfg)
  ).generate(prompts, 12, stop_at_eos=False)
  assert factory.tokens == default.tokens
  assert len(factory.tokens[0]) == 12


@pytest.mark.parametrize("value", [0, -1, 513, 100000, 2.5, "64", True])
def test_max_cache_len_must_lie_in_one_to_max_seq_len(tiny_model, value):
  with pytest.raises(ValueError, match=r"max_cache_len must be an int in \[1, 512\]"):
    Generator(tiny_model, max_cache_len=value)


def test_max_cache_len_bounds_are_accepted(tiny_model):
  assert Generator(tiny_model).max_cache_len == 512
  assert Generator(tiny_model, max_cache_len=1).max_cache_len == 1
  assert Generator(tiny_model, max_cache_len=np.int64(512)).max_cache_len == 512


def _with_weight(model, edit):
  """A copy of `model` whose pure-dict params went through `edit` (in place, numpy)."""
  from flax import nnx

  from jaxllm.params import model_from_params

  params = jax.tree.map(np.array, nnx.state(model).to_pure_dict())
  edit(params)
  return model_from_params(model.config, params)


def test_nan_weight_raises_at_the_prefill(tiny_model):
  def poison(params):
    params["layers"][1]["mlp"]["down"][3, 5] = np.nan

  gen = Generator(_with_weight(tiny_model, poison), max_cache_len=64, prompt_bucket=16)
  seen = []
  with pytest.raises(ValueError, match=r"^logits at step 0, row 0 are not finite: .*NaN/inf$"):
    gen.generate([[1, 2, 3], [4, 5]], 1, on_tokens=seen.append)
  assert seen == []  # raised before any token was handed out


def test_nan_reached_in_a_decode_step_names_its_step_and_row():
  # Untied embeddings: a NaN in token b's embedding row is read only once b is fed back.
  from jaxllm.params import init_model

  cfg = jaxllm.TINY.replace(name="tiny-untied", tie_embeddings=False, num_layers=1)
  model = init_model(cfg, seed=0)
  prompts = [[5, 6, 7], [9, 10, 11]]
  clean = Generator(model, max_cache_len=64, prompt_bucket=16)
  a, b = (row[0] for row in clean.generate(prompts, 1, stop_at_eos=False).tokens)  # prefill only
  assert a != b and b not in prompts[0] + prompts[1] + [a]

  def poison(params):
    params["embed"][:, b] = np.nan

  gen = Generator(_with_weight(model, poison), max_cache_len=64, prompt_bucket=16)
  seen = []
  with pytest.raises(ValueError, match=r"^logits at step 1, row 1 are not finite"):
    gen.generate(prompts, 6, on_tokens=seen.append, stop_at_eos=False)
  np.testing.assert_array_equal(np.stack(seen), [[a, b]])  # step 0 was finite
