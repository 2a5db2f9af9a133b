"""Tests for jaxllm.perplexity: window cutting and NLL against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxllm.perplexity import perplexity, tokenize_windows, window_nll
from jaxllm.pipeline import load_pipeline


class CharTokenizer:
  """One token per character: id = code point % 97; records how it was called."""

  def __init__(self):
    self.calls = 0

  def encode(self, text: str) -> list[int]:
    self.calls += 1
    return [ord(c) % 97 for c in text]


@pytest.fixture(scope="module")
def tiny():
  return load_pipeline("tiny", seed=0)


def _numpy_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """Per-row sum of -log softmax(logits[t])[tokens[t+1]] in float64."""
  z = logits[:, :-1].astype(np.float64)
  m = z.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(z, tokens[:, 1:, None], -1)[..., 0]
  return (logz - picked).sum(-1)


def test_windows_exact_cut_and_tail_dropped():
  tok = CharTokenizer()
  text = "".join(chr(65 + i % 26) for i in range(25))
  w = tokenize_windows(tok, text, 8)
  assert tok.calls == 1  # the whole text, tokenized once
  assert w.shape == (3, 8) and w.dtype == np.int32
  np.testing.assert_array_equal(w.ravel(), [ord(c) % 97 for c in text[:24]])


@pytest.mark.parametrize(
  "n_chars, context, windows", [(8, 8, 1), (15, 8, 1), (16, 8, 2), (1000, 2, 500), (1001, 10, 100)]
)
def test_window_counts(n_chars, context, windows):
  assert tokenize_windows(CharTokenizer(), "x" * n_chars, context).shape == (windows, context)


def test_too_short_text_names_lengths():
  with pytest.raises(ValueError, match=r"text has 7 tokens.*context=8"):
    tokenize_windows(CharTokenizer(), "x" * 7, 8)


@pytest.mark.parametrize("context", [1, 0, -3, 2.5, True])
def test_bad_context(context):
  with pytest.raises(ValueError, match="context must be an int >= 2"):
    tokenize_windows(CharTokenizer(), "x" * 100, context)


def test_window_nll_matches_numpy(tiny):
  windows = np.random.default_rng(1).integers(0, tiny.config.vocab_size, (3, 24)).astype(np.int32)
  want = _numpy_nll(np.asarray(tiny.logits(windows)), windows)
  got = list(window_nll(tiny, windows))
  assert [c for _, c in got] == [23, 23, 23]
  np.testing.assert_allclose([s for s, _ in got], want, rtol=1e-5)
  # Batched with a ragged last batch, and through the bare model: same sums.
  for model, batch in ((tiny, 2), (tiny.model, 3)):
    np.testing.assert_allclose([s for s, _ in window_nll(model, windows, batch)], want, rtol=1e-5)


def test_window_nll_accepts_a_forward_callable(tiny):
  windows = np.random.default_rng(2).integers(0, tiny.config.vocab_size, (2, 16)).astype(np.int32)
  forward = lambda tokens: tiny.model(tokens)[0]
  want = _numpy_nll(np.asarray(tiny.logits(windows)), windows)
  np.testing.assert_allclose([s for s, _ in window_nll(forward, windows)], want, rtol=1e-5)


def test_perplexity_dict(tiny):
  windows = np.random.default_rng(3).integers(0, tiny.config.vocab_size, (2, 16)).astype(np.int32)
  want = _numpy_nll(np.asarray(tiny.logits(windows)), windows).sum() / 30
  r = perplexity(tiny, windows)
  assert (r["tokens"], r["windows"], r["context"]) == (30, 2, 16)
  assert r["nll"] == pytest.approx(want, rel=1e-5)
  assert r["ppl"] == pytest.approx(math.exp(want), rel=1e-4)


def test_bad_windows(tiny):
  with pytest.raises(ValueError, match="windows must be int"):
    window_nll(tiny, np.zeros((0, 8), np.int32))
  with pytest.raises(ValueError, match="windows must be int"):
    window_nll(tiny, np.zeros((2, 1), np.int32))
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
    window_nll(tiny, np.full((1, 8), 512, np.int32))
  with pytest.raises(ValueError, match="batch_size"):
    window_nll(tiny, np.zeros((1, 8), np.int32), batch_size=0)
