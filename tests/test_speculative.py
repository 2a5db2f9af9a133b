"""Speculative decoding: greedy identity with the target's own greedy decoding, sampling
exactness (chi-square against the target's enumerated distribution), per-row rollback
against a fresh prefill, and the bad-input errors.

The random tiny model with tied embeddings only repeats its last token (the token's
embedding dominates the residual stream and the tied head reads it back), so every draft
would be accepted. Scaling the embeddings by 0.05 lets the layers steer: greedy output
varies, and both drafts are accepted in part, a different number of tokens per row.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx
from speculative_helpers import greedy_tokens, random_prompts, steered

from jaxllm import kv_cache, speculative
from jaxllm.drafts import LayerSkipDraft, LookupDraft, ModelDraft, quantized_draft
from jaxllm.sampling import SamplingConfig, filter_logits
from jaxllm.speculative import SpeculativeConfig, SpeculativeGenerator

CACHE, BUCKET, NEW = 96, 16, 24
SIGNIFICANCE = 1e-3  # chi-square: reject "same distribution" below this p-value


@pytest.fixture(scope="module")
def model(tiny_model):
  return steered(tiny_model)


@pytest.fixture(scope="module")
def generators(model):
  """SpeculativeGenerator per (draft, gamma), built once (tests share compiled steps)."""
  made = {}

  def get(name, gamma):
    if (name, gamma) not in made:
      draft = _draft(name, model)
      made[name, gamma] = SpeculativeGenerator(
        model, draft, SpeculativeConfig(gamma), max_cache_len=CACHE, prompt_bucket=BUCKET
      )
    return made[name, gamma]

  return get


@pytest.fixture(scope="module")
def prompts():
  return random_prompts()


@pytest.fixture(scope="module")
def reference(model, prompts):
  """The target's own greedy tokens for the three prompts (`Generator`)."""
  return greedy_tokens(model, prompts, NEW, CACHE, BUCKET)


def _draft(name, model):
  if name == "lookup":
    return LookupDraft()
  if name == "layerskip":
    return LayerSkipDraft(model, 1)
  return quantized_draft(model, "w8a8", None)


@pytest.mark.parametrize("gamma", [1, 4])
@pytest.mark.parametrize("name", ["lookup", "layerskip"])
def test_greedy_output_is_the_targets_own(generators, prompts, reference, name, gamma):
  """Batch 3 (prompts of 5, 17 and 9 tokens) and, at gamma 4, batch 1: token for token the
  target's greedy output; streamed ids give the same tokens."""
  gen = generators(name, gamma)
  for rows in (3, 1) if gamma == 4 else (3,):
    streamed = []
    out = gen.generate(prompts[:rows], NEW, stop_at_eos=False, on_tokens=streamed.append)
    assert out.tokens == reference[:rows]
    stats = out.stats
    assert stats.generated == [NEW] * rows
    # drafts were accepted, but not all: both the accept and the reject path ran
    assert 0 < sum(stats.accepted) < sum(stats.drafted)
    assert stats.tokens_per_target_call > 1.0
    streamed = np.stack(streamed, 1)  # [B, calls]; -1: no token for the row in that call
    assert [row[row >= 0].tolist() for row in streamed] == reference[:rows]
    if rows > 1:  # rows accepted different numbers of drafts (per-row rollback)
      assert len(set(stats.accepted)) > 1


def test_quantized_copy_draft_is_greedy_exact(model, prompts, reference):
  draft = quantized_draft(model, "w8a8", None)
  assert draft.name == "quantized-w8a8"
  gen = SpeculativeGenerator(
    model, draft, SpeculativeConfig(4), max_cache_len=CACHE, prompt_bucket=BUCKET
  )
  out = gen.generate(prompts, NEW, stop_at_eos=False)
  assert out.tokens == reference
  assert out.stats.acceptance_rate > 0.5  # an int8 copy mostly agrees with its target


def test_stops_at_eos_inside_an_accepted_run(model, prompts, reference):
  """EOS = the 6th greedy token of row 0: each row stops at its first EOS (excluded) as
  plain greedy decoding would, the others run to max_new_tokens."""
  eos = reference[0][5]
  target = nnx.merge(*nnx.split(model))  # new modules, shared weights: own config
  target.config = target.config.replace(eos_id=int(eos))
  gen = SpeculativeGenerator(
    target, LookupDraft(), SpeculativeConfig(4), max_cache_len=CACHE, prompt_bucket=BUCKET
  )
  out = gen.generate(prompts, NEW)
  assert out.tokens == [r[: r.index(eos)] if eos in r else r for r in reference]
  assert out.finished == [eos in r for r in reference] and out.finished[0]
  assert out.stats.generated[0] == reference[0].index(eos) + 1  # EOS counted


def test_rollback_leaves_the_cache_of_a_fresh_prefill(model, generators, prompts):
  """After each verify step (rows rejecting different numbers of drafts and rolling back),
  the next token's logits from the cache equal those of a fresh prefill of each row's
  kept tokens (relative error; float rounding only)."""
  gen = generators("lookup", 4)
  graphdef, state = nnx.split(model)
  cached = jax.jit(lambda c, t: nnx.merge(graphdef, state)(t, cache=c, logits_at="last")[0])
  fresh = jax.jit(lambda t, s: nnx.merge(graphdef, state)(t, start=s, logits_at="last")[0])
  greedy = SamplingConfig()
  loop, _, _ = gen._begin(prompts, NEW, greedy, jax.random.key(0), False)
  start = np.asarray(loop.cache.start)
  partial = 0
  for _ in range(4):
    loop, _, _, accepted, _ = gen._iterate(loop, jax.random.key(1), greedy, False)
    partial += int(np.sum((accepted > 0) & (accepted < 4)))
    history, count = np.asarray(loop.history), np.asarray(loop.count)
    np.testing.assert_array_equal(np.asarray(loop.cache.length), count - 1)
    pending = history[np.arange(3), count - 1][:, None]
    got = np.asarray(cached(loop.cache, jnp.asarray(pending)))[:, 0]
    # fresh: each row's kept tokens (pending included), left-padded to CACHE, no cache
    kept = np.zeros((3, CACHE), np.int32)
    for row in range(3):
      kept[row, CACHE - count[row] + start[row] :] = history[row, start[row] : count[row]]
    want = np.asarray(fresh(jnp.asarray(kept), jnp.asarray(CACHE - count + start)))[:, 0]
    err = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    assert err.max() < 1e-5, f"logits after rollback differ by {err} (relative)"
  assert partial > 0  # some row kept some but not all of its drafts


# -- sampling exactness ---------------------------------------------------------------

VOCAB, ROWS, SMALL_PROMPT = 16, 4096, [3, 7, 1, 12]
SAMPLING = SamplingConfig(temperature=1.0, top_k=12)


@pytest.fixture(scope="module")
def small(tiny_model):
  return steered(tiny_model, VOCAB)


@pytest.fixture(scope="module")
def exact(small):
  """The target's distribution of tokens 2..4 after SMALL_PROMPT (sampling as SAMPLING
  filters), by enumerating every t1, t2, t3: joint [V, V, V, V] of (t1, t2, t3, t4)."""
  seqs = np.array([SMALL_PROMPT + list(c) for c in itertools.product(range(VOCAB), repeat=3)])
  graphdef, state = nnx.split(small)
  logits = jax.jit(lambda t: nnx.merge(graphdef, state)(t)[0])(jnp.asarray(seqs))
  n, v = len(SMALL_PROMPT), VOCAB

  def probs(i):  # p(token at n + i | what comes before), by (t1, t2, t3)
    p = jax.nn.softmax(filter_logits(logits[:, n - 1 + i], SAMPLING), -1)
    return np.asarray(p, np.float64).reshape(v, v, v, v)

  p1, p2, p3, p4 = probs(0)[0, 0, 0], probs(1)[:, 0, 0], probs(2)[:, :, 0], probs(3)
  return p1[:, None, None, None] * p2[:, :, None, None] * p3[:, :, :, None] * p4


def _p_value(samples, probs):
  """Pearson chi-square p-value of `samples` (ids) against `probs`; cells expected fewer
  than 5 times are pooled into one."""
  counts = np.bincount(samples, minlength=probs.size).astype(float)
  expected = probs.ravel() * len(samples)
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  obs, exp = obs[keep], exp[keep]
  return scipy.stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def _sample_rows(small, draft):
  """ROWS rows of SMALL_PROMPT, 4 tokens each with gamma 2: token 1 from the prefill, tokens
  2..4 from the first verify step (accept or resample at 2 and 3, the bonus at 4)."""
  gen = SpeculativeGenerator(
    small, draft, SpeculativeConfig(2, "sample"), max_cache_len=32, prompt_bucket=4
  )
  out = gen.generate([SMALL_PROMPT] * ROWS, 4, SAMPLING, key=jax.random.key(0), stop_at_eos=False)
  return np.asarray(out.tokens), out.stats


@pytest.mark.parametrize("name", ["layerskip", "lookup"])
def test_sampling_matches_the_targets_distribution(small, exact, name):
  tokens, stats = _sample_rows(small, _draft(name, small))
  assert 0.02 < stats.acceptance_rate < 0.95  # both accept and resample paths ran
  pair = _p_value(tokens[:, 1] * VOCAB + tokens[:, 2], exact.sum((0, 3)))
  bonus = _p_value(tokens[:, 3], exact.sum((0, 1, 2)))
  assert pair > SIGNIFICANCE and bonus > SIGNIFICANCE, (pair, bonus)


def test_chi_square_catches_a_wrong_acceptance_rule(small, exact, monkeypatch):
  """The same test on a rule that accepts every draft (then samples the bonus from p):
  tokens 2 and 3 follow the draft's q, and the test rejects them."""

  def always_accept(p, q, drafts, key):
    del q
    b, gamma = drafts.shape
    bonus = jax.random.categorical(key, jnp.log(p[:, gamma]), axis=-1).astype(jnp.int32)
    return jnp.full((b,), gamma, jnp.int32), bonus

  monkeypatch.setattr(speculative, "accept_sampled", always_accept)
  tokens, _ = _sample_rows(small, LayerSkipDraft(small, 1))
  assert _p_value(tokens[:, 1] * VOCAB + tokens[:, 2], exact.sum((0, 3))) < SIGNIFICANCE


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0, -1, 2.0, True])
def test_gamma_below_one_is_refused(gamma):
  with pytest.raises(ValueError, match="gamma must be an int >= 1"):
    SpeculativeConfig(gamma)


def test_bad_inputs(model, small, prompts):
  with pytest.raises(ValueError, match="mode must be one of"):
    SpeculativeConfig(2, "beam")
  with pytest.raises(ValueError, match="vocabulary of 16 tokens, the target 512"):
    SpeculativeGenerator(model, ModelDraft(small), SpeculativeConfig(2))
  with pytest.raises(ValueError, match="num_layers=2 is as deep as the target or deeper"):
    LayerSkipDraft(model, 2)
  with pytest.raises(ValueError, match="num_layers=3 is as deep"):
    LayerSkipDraft(model, 3)
  gen = SpeculativeGenerator(model, LookupDraft(), SpeculativeConfig(4), max_cache_len=64)
  with pytest.raises(ValueError, match=r"50 tokens.*max_new_tokens=12 and gamma=4 it needs 66"):
    gen.generate([list(range(3, 53))], 12)
  with pytest.raises(ValueError, match="mode 'greedy' needs greedy sampling"):
    gen.generate(prompts, 4, SamplingConfig(temperature=1.0), key=jax.random.key(0))
  sampler = SpeculativeGenerator(model, LookupDraft(), SpeculativeConfig(4, "sample"))
  with pytest.raises(ValueError, match="PRNG key"):
    sampler.generate(prompts, 4, SamplingConfig(temperature=1.0))


def test_gamma_deeper_than_a_compressed_cache_can_roll_back(model):
  cfg = model.config
  kivi2 = kv_cache.cache_factory("kivi2", cfg)  # residual window R = 96
  # KIVI commits only the kept tokens (deferred commit): its window does not bound gamma
  SpeculativeGenerator(model, LookupDraft(), SpeculativeConfig(97), make_cache=kivi2)
  ring = kv_cache.cache_factory(kv_cache.spec_for("int8").replace(residual=8), cfg)
  with pytest.raises(ValueError, match=r"gamma=33 is deeper.*ROLLBACK_SLACK=32.*gamma <= 32"):
    SpeculativeGenerator(model, LookupDraft(), SpeculativeConfig(33), make_cache=ring)
  no_residual = kv_cache.cache_factory("kivi2_no_residual", cfg)
  with pytest.raises(ValueError, match="cannot roll back at all"):
    SpeculativeGenerator(model, LookupDraft(), SpeculativeConfig(1), make_cache=no_residual)
  with pytest.raises(ValueError, match="LayerSkipDraft writes into the target's dense cache"):
    SpeculativeGenerator(model, LayerSkipDraft(model, 1), SpeculativeConfig(1), make_cache=kivi2)
