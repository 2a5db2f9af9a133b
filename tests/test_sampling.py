"""Sampling filters against direct numpy definitions, and parameter validation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllm.sampling import MIN_TEMPERATURE, SamplingConfig, filter_logits, sample


def _logits(seed=0, b=3, v=50):
  return np.random.default_rng(seed).standard_normal((b, v)).astype(np.float32) * 3


def test_greedy_is_argmax():
  x = _logits()
  np.testing.assert_array_equal(sample(x, jax.random.key(0), SamplingConfig()), x.argmax(-1))


def test_top_k_keeps_exactly_k():
  x = _logits()
  kept = np.isfinite(np.asarray(filter_logits(x, SamplingConfig(1.0, top_k=5))))
  want = np.zeros_like(kept)
  np.put_along_axis(want, np.argsort(-x, -1)[:, :5], True, -1)
  np.testing.assert_array_equal(kept, want)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_smallest_prefix_reaching_p(p):
  x = _logits(1)
  kept = np.isfinite(np.asarray(filter_logits(x, SamplingConfig(1.0, top_p=p))))
  for row, k in zip(x, kept):
    order = np.argsort(-row)
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # first prefix with mass >= p
    assert set(np.flatnonzero(k)) == set(order[:n])


def test_temperature_sampling_follows_softmax():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  keys = jax.random.split(jax.random.key(3), 4000)
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingConfig(1.0)))(keys))[:, 0]
  freq = np.bincount(draws, minlength=4) / len(draws)
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  # temperature 0.5 squares the odds: p ∝ p0^2
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingConfig(0.5)))(keys))[:, 0]
  sq = np.array([0.25, 0.09, 0.0225, 0.0025])
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), sq / sq.sum(), atol=0.03)


def test_same_key_same_tokens():
  x = _logits(2)
  cfg = SamplingConfig(0.8, top_k=10, top_p=0.9)
  a = sample(x, jax.random.key(7), cfg)
  np.testing.assert_array_equal(a, sample(x, jax.random.key(7), cfg))


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8, 1e-6])
def test_tiny_temperatures_pick_the_argmax_of_large_logits(temperature):
  # Logits of order 1e9 overflow float32 once divided by a temperature below ~1e-29.
  x = _logits(4, b=4, v=300) * 1e9
  want = x.argmax(-1)
  config = SamplingConfig(temperature, top_k=50, top_p=0.9)
  assert config.greedy == (temperature < MIN_TEMPERATURE)
  for seed in range(3):
    np.testing.assert_array_equal(sample(x, jax.random.key(seed), config), want)
  filtered = np.asarray(filter_logits(x, config))
  assert not np.isnan(filtered).any() and (filtered <= 0).all()
  np.testing.assert_array_equal(filtered[np.arange(len(x)), want], 0.0)  # the max, finite
  np.testing.assert_array_equal(filtered.argmax(-1), want)


def test_filter_subtracts_the_row_max_first():
  x = _logits(5) + 40.0
  filtered = np.asarray(filter_logits(x, SamplingConfig(0.5, top_k=20)))
  kept = np.isfinite(filtered)
  assert kept.sum() == 3 * 20
  want = (x - x.max(-1, keepdims=True)) / 0.5
  np.testing.assert_allclose(filtered[kept], want[kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
  ],
)
def test_invalid_parameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingConfig(**kwargs)
