"""Streaming perplexity: decoding through a dense cache must reproduce the one-pass scores."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.kv_cache import KVCache
from jaxllm.perplexity import perplexity
from jaxllm.streaming import StreamingConfig, StreamingScorer, streaming_perplexity


def _windows(vocab: int, n: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(n, length), dtype=np.int32)


def _dense_scorer(model, **config):
  cfg = model.config
  return StreamingScorer(
    model, lambda b, c: KVCache.create(cfg, b, c), StreamingConfig(capacity_multiple=16, **config)
  )


@pytest.mark.parametrize("prefill,block", [(1, 8), (5, 7), (12, 64)])
def test_dense_streaming_matches_one_pass(tiny_model, prefill, block):
  # 3 windows with batch 2: a padded short last batch; blocks that overrun the window.
  windows = _windows(tiny_model.config.vocab_size, 3, 24)
  scorer = _dense_scorer(tiny_model, prefill=prefill, block=block, batch_size=2)
  stream, top1 = streaming_perplexity(scorer, windows)
  one_pass = perplexity(tiny_model, windows)
  assert stream["tokens"] == one_pass["tokens"] == 3 * 23
  np.testing.assert_allclose(stream["nll"], one_pass["nll"], rtol=1e-5)
  # Top-1 of the streamed run equals the one-pass argmax at every position.
  logits, _ = tiny_model(windows)
  np.testing.assert_array_equal(top1, np.argmax(np.asarray(logits), -1)[:, :-1])


def test_per_window_scores_and_top1_agreement(tiny_model):
  windows = _windows(tiny_model.config.vocab_size, 2, 20, seed=1)
  scorer = _dense_scorer(tiny_model, prefill=4, block=8, batch_size=2)
  nll, top1 = scorer.score_batch(windows)
  assert nll.shape == top1.shape == (2, 19)
  result, _ = streaming_perplexity(scorer, windows, reference_top1=top1)
  assert result["top1_agree"] == 1.0
  shifted = (top1 + 1) % tiny_model.config.vocab_size
  shifted[:, :10] = top1[:, :10]
  result, _ = streaming_perplexity(scorer, windows, reference_top1=shifted)
  assert result["top1_agree"] == pytest.approx(20 / 38)


def test_layout_rounds_capacity_to_fit_every_block():
  cfg = StreamingConfig(prefill=32, block=64, capacity_multiple=128)
  blocks, capacity = cfg.layout(1024)
  assert blocks == 16  # 991 decode steps
  assert capacity == 1152  # 32 + 16 * 64 = 1056, rounded up to 128


@pytest.mark.parametrize(
  "kwargs,match",
  [({"prefill": 0}, "prefill"), ({"block": 2.5}, "block"), ({"batch_size": True}, "batch_size")],
)
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    StreamingConfig(**kwargs)


def test_bad_windows(tiny_model):
  scorer = _dense_scorer(tiny_model, prefill=4)
  vocab = tiny_model.config.vocab_size
  with pytest.raises(ValueError, match="windows must be int"):
    streaming_perplexity(scorer, np.zeros((2,), np.int32))
  with pytest.raises(ValueError, match="token ids"):
    streaming_perplexity(scorer, np.full((1, 8), vocab, np.int32))
  with pytest.raises(ValueError, match="nothing to decode"):
    streaming_perplexity(scorer, _windows(vocab, 1, 5))
  with pytest.raises(ValueError, match="reference_top1"):
    streaming_perplexity(scorer, _windows(vocab, 1, 8), reference_top1=np.zeros((1, 8)))
