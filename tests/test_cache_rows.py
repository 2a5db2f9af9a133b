"""Per-row cache lengths: rows of one batch at different lengths, per-row rollback, and the
host-side rollback check, for every cache class (dense, KIVI-4, KIVI-2, per-token int8).

Independent reference: the same model on batch 1, each row alone, fed only the tokens
the batched row kept, in the same chunks (a compressed cache stores what a chunk wrote
after it attended, so the chunk schedule is part of the sequence)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.kv_cache import CACHE_PRESETS, create_cache

NAMES = ["dense", "kivi4", "kivi2", "int8"]
# KIVI (R=96, G=32) has quantized one group after PREFILL tokens, so a rollback has a floor
PREFILL, CHUNK, STEPS, CAPACITY = 128, 6, 26, 192
START = np.array([2, 0], np.int32)  # row 0 is left-padded by 2
# max |logits - reference| / max |reference|: batch 2 and batch 1 differ only by float
# rounding (measured <= 6e-7; writing every row at row 0's slot gives 1e-2 or more)
TOL = 2e-6


@pytest.fixture(scope="module")
def run(tiny_model):
  graphdef, state = nnx.split(tiny_model)
  step = jax.jit(lambda s, c, t: nnx.merge(graphdef, s)(t, cache=c))
  return lambda cache, tokens: step(state, cache, jnp.asarray(tokens, jnp.int32))


@pytest.fixture(scope="module")
def forward(tiny_model):
  """The model without a cache (one causal prefill), jitted."""
  graphdef, state = nnx.split(tiny_model)
  step = jax.jit(lambda s, t, start: nnx.merge(graphdef, s)(t, start=start))
  return lambda tokens, start: step(state, jnp.asarray(tokens, jnp.int32), jnp.asarray(start))


@pytest.fixture(scope="module")
def seqs(tiny_model):
  """Per row: prompt [PREFILL] (row 0 padded at the front), chunk A [CHUNK], chunk B
  [CHUNK], decode tokens [STEPS]."""
  rng = np.random.default_rng(0)
  v = tiny_model.config.vocab_size
  prompt = rng.integers(0, v, (2, PREFILL)).astype(np.int32)
  prompt[0, : START[0]] = 0
  a, b = (rng.integers(0, v, (2, CHUNK)).astype(np.int32) for _ in range(2))
  return prompt, a, b, rng.integers(0, v, (2, STEPS)).astype(np.int32)


def _cache(cfg, name, row):
  """An empty cache of both rows (row None) or of one row alone."""
  start = START if row is None else START[row : row + 1]
  return create_cache(CACHE_PRESETS[name], cfg, len(start), CAPACITY, start=start)


def _close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= TOL, f"max |logits - reference| is {err:.2e} of the largest logit"


def _alone(run, cfg, name, row, chunks):
  """Row `row` alone (batch 1) fed `chunks` ([S] token lists, one model call each): the
  logits of each call and the cache."""
  cache, out = _cache(cfg, name, row), []
  for tokens in chunks:
    if len(tokens):
      logits, cache = run(cache, np.asarray(tokens)[None])
      out.append(np.asarray(logits[0]))
  return out, cache


@pytest.mark.parametrize("name", NAMES)
def test_rows_of_different_lengths_decode_as_each_row_alone(run, seqs, tiny_model, name):
  """Both rows take prompt + chunk A, row 1 keeps 1 of A's 6 tokens (rollback), then 26
  one-token steps write at each row's own slot: every step's logits equal each row's
  run alone. KIVI's rows part in their quantized lengths too (row 0 flushes at 160)."""
  cfg = tiny_model.config
  prompt, a, _, steps = seqs
  _, cache = run(_cache(cfg, name, None), prompt)
  _, cache = run(cache, a)
  kept = np.array([CHUNK, 1])
  cache = cache.rollback(PREFILL + kept)
  np.testing.assert_array_equal(cache.length, PREFILL + kept)
  got = []
  for i in range(steps.shape[1]):
    logits, cache = run(cache, steps[:, i : i + 1])
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)  # [2, STEPS, V]
  np.testing.assert_array_equal(cache.length, PREFILL + kept + steps.shape[1])
  for row in range(2):
    decode = [[t] for t in steps[row]]
    want, alone = _alone(run, cfg, name, row, [prompt[row], a[row, : kept[row]], *decode])
    _close(got[row], np.concatenate(want[2:]))
    if name.startswith("kivi"):
      assert int(alone.quantized_length[0]) == int(cache.quantized_length[row])
  if name.startswith("kivi"):  # the rows' quantized lengths part: 160 and 155 tokens
    assert cache.quantized_length.tolist() == [64, 32]


@pytest.mark.parametrize("name", NAMES)
def test_per_row_rollback_then_append_equals_fresh_cache(run, forward, seqs, tiny_model, name):
  """Rows roll back 5 and 6 of chunk A's tokens (row 1 all of it), then take chunk B and one
  decode step: the logits equal a fresh cache fed the kept tokens and B (batch 1). The
  dense cache also equals one prefill of the whole kept sequence."""
  cfg = tiny_model.config
  prompt, a, b, steps = seqs
  _, cache = run(_cache(cfg, name, None), prompt)
  _, cache = run(cache, a)
  kept = np.array([1, 0])
  cache = cache.rollback(jnp.asarray(PREFILL + kept))
  got_b, cache = run(cache, b)
  got_step, cache = run(cache, steps[:, :1])
  np.testing.assert_array_equal(cache.length, PREFILL + kept + CHUNK + 1)
  for row in range(2):
    chunks = [prompt[row], a[row, : kept[row]], b[row], steps[row, :1]]
    want, _ = _alone(run, cfg, name, row, chunks)
    _close(got_b[row], want[-2])
    _close(got_step[row], want[-1])
    if name == "dense":  # one prefill of the kept sequence, no cache
      full, _ = forward(np.concatenate(chunks)[None], START[row : row + 1])
      _close(got_b[row], full[0, -CHUNK - 1 : -1])


@pytest.mark.parametrize("name", NAMES)
def test_host_check_refuses_rollback_below_the_floor(run, seqs, tiny_model, name):
  """After the prompt each KIVI row has quantized 32 tokens: rolling row 1 back to 20 is
  refused on the host, naming cache, row, length and the floor; the dense and int8 caches
  roll back to any length >= 0. Under jit nothing raises: the row stays at its floor,
  `refused_rollback` is set and `check_overflow` reports it."""
  cfg = tiny_model.config
  prompt = seqs[0]
  _, cache = run(_cache(cfg, name, None), prompt)
  floor = 32 if name.startswith("kivi") else 0
  np.testing.assert_array_equal(cache.rollback_floor(), [floor, floor])
  want = np.array([40, floor - 12])
  named = {"dense": "DenseKVCache", "int8": r"TokenQuantizedKVCache \(int8\)"}
  named = named.get(name, rf"GroupQuantizedKVCache \({name}\)")
  message = rf"^{named}: cannot roll back row 1 to {floor - 12} tokens: the least it can "
  message += rf"roll back to is {floor}\b"
  with pytest.raises(ValueError, match=message):
    cache.check_rollback(want)
  with pytest.raises(ValueError, match=message):
    cache.rollback(want)
  with pytest.raises(ValueError, match=r"one per row, shape \(2,\); got shape \(3,\)"):
    cache.rollback(np.array([40, 40, 40]))
  ok = cache.rollback(np.array([floor, PREFILL]))  # each row as far as it can / not at all
  np.testing.assert_array_equal(ok.length, [floor, PREFILL])
  ok.check_overflow()
  np.testing.assert_array_equal(cache.rollback(PREFILL - 3).length, [PREFILL - 3] * 2)  # scalar

  jitted = jax.jit(lambda c, n: c.rollback(n))(cache, jnp.asarray(want))
  np.testing.assert_array_equal(jitted.length, [40, floor])
  np.testing.assert_array_equal(jitted.refused_rollback, [False, True])
  with pytest.raises(ValueError, match=r"rollback under jit asked row 1 for fewer tokens"):
    jitted.check_overflow()
  assert bool(jitted.rollback(jitted.length).refused_rollback[1])  # kept from then on
