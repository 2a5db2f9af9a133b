"""Streaming perplexity: decoding through a dense cache must reproduce the one-pass scores."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import kv_cache
from jaxllm.kv_cache import GroupQuantizedKVCache, TokenQuantizedKVCache, spec_for
from jaxllm.perplexity import perplexity
from jaxllm.quant.kv_calibration import prepare_model
from jaxllm.streaming import StreamingConfig, StreamingScorer, streaming_perplexity


def _windows(vocab: int, n: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(n, length), dtype=np.int32)


def _dense_scorer(model, **config):
  make_cache = kv_cache.cache_factory("dense", model.config)
  return StreamingScorer(model, make_cache, StreamingConfig(capacity_multiple=16, **config))


@pytest.mark.parametrize("prefill,block,chunk", [(1, 8, 1), (5, 7, 1), (12, 64, 1), (3, 2, 4)])
def test_dense_streaming_matches_one_pass(tiny_model, prefill, block, chunk):
  # 3 windows with batch 2: a padded short last batch; blocks that overrun the window.
  windows = _windows(tiny_model.config.vocab_size, 3, 24)
  scorer = _dense_scorer(tiny_model, prefill=prefill, block=block, batch_size=2, chunk=chunk)
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
  cfg = StreamingConfig(prefill=32, block=8, chunk=32, capacity_multiple=128)
  blocks, capacity = cfg.layout(1024)
  assert blocks == 4  # 991 tokens in 31 steps of 32
  assert capacity == 1152  # 32 + 4 * 8 * 32 = 1056


# Grouped caches small enough that 160-token windows cross several flushes, and
# per-token caches (with a window shorter than the chunk, too).
_CHUNK_EXACT = {
  "int8": spec_for("int8"),
  "fireq_int4": spec_for("fireq_int4"),
  "fireq_int4_r8_s2": spec_for("fireq_int4").replace(residual=8, n_sink=2),
  "fireq_int4_gptq_r8_s2": spec_for("fireq_int4_gptq").replace(residual=8, n_sink=2),
  "kivi2_r32_s2": spec_for("kivi2").replace(residual=32, n_sink=2),
  "kivi4_g16_r48": spec_for("kivi4").replace(group_size=16, residual=48),
  "rotatekv2_r32": spec_for("rotatekv2").replace(residual=32),
  "pre_rope_r64": spec_for("kivi2_pre_rope_r128_s4").replace(residual=64),
}


def _cache_scorer(model, spec, **config):
  model, calibration = prepare_model(model, spec, _windows(512, 2, 64, seed=5))
  make = kv_cache.cache_factory(spec, model.config, calibration=calibration)
  return StreamingScorer(model, make, StreamingConfig(capacity_multiple=32, batch_size=2, **config))


@pytest.mark.parametrize("name", sorted(_CHUNK_EXACT))
def test_chunked_decode_scores_as_one_token_per_step(tiny_model, name):
  """Where the cache accepts a chunk, scoring 16 tokens per step equals one per step."""
  spec = _CHUNK_EXACT[name]
  windows = _windows(tiny_model.config.vocab_size, 2, 160, seed=2)
  one, one_top1 = _cache_scorer(tiny_model, spec, prefill=16, block=32).score_batch(windows)
  scorer = _cache_scorer(tiny_model, spec, prefill=16, block=4, chunk=16)
  chunked, chunked_top1 = scorer.score_batch(windows)
  # The tiny model's NLLs are near 100: float rounding differs by a few 1e-6 relative
  # between thread counts; a cache read wrongly moves them by more than 1e-2.
  np.testing.assert_allclose(chunked, one, rtol=1e-5, atol=2e-4)
  np.testing.assert_array_equal(chunked_top1, one_top1)


@pytest.mark.parametrize(
  "name,prefill,chunk,match",
  [
    ("kivi2_no_residual", 16, 16, "residual window"),
    ("kivi2", 20, 16, "position 20"),  # flushes at lengths 96 + 32k
    ("kivi2", 16, 24, "must divide group_size 32"),
  ],
)
def test_chunked_decode_refused_where_it_would_change_scores(
  tiny_model, name, prefill, chunk, match
):
  spec = spec_for(name)
  model, calibration = prepare_model(tiny_model, spec, _windows(512, 2, 64))
  cfg = model.config
  make = kv_cache.cache_factory(spec, cfg, calibration=calibration)
  scorer = StreamingScorer(model, make, StreamingConfig(prefill=prefill, chunk=chunk, block=2))
  with pytest.raises(ValueError, match=match):
    scorer.score_batch(_windows(cfg.vocab_size, 1, 200))


@pytest.mark.parametrize(
  "name,residual,prefill", [("kivi2", 32, 20), ("kivi2", 0, 16), ("int8", 0, 16)]
)
def test_chunked_decode_needs_its_checks(tiny_model, monkeypatch, name, residual, prefill):
  """What `for_chunked_decode` does matters: forced through as plain chunks, a
  misaligned KIVI chunk (a flush inside a step), KIVI with no exact window, or a
  per-token cache reading its chunk exactly, each scores differently."""
  for cls in (GroupQuantizedKVCache, TokenQuantizedKVCache):
    monkeypatch.setattr(cls, "for_chunked_decode", lambda self, *_: self)
  spec = spec_for(name).replace(residual=residual)
  windows = _windows(tiny_model.config.vocab_size, 2, 160, seed=2)
  one, _ = _cache_scorer(tiny_model, spec, prefill=prefill, block=32).score_batch(windows)
  chunked, _ = _cache_scorer(tiny_model, spec, prefill=prefill, block=4, chunk=16).score_batch(
    windows
  )
  assert np.abs(chunked - one).max() > 1e-2


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"prefill": 0}, "prefill"),
    ({"block": 2.5}, "block"),
    ({"batch_size": True}, "batch_size"),
    ({"chunk": 0}, "chunk"),
  ],
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


def test_non_finite_logits_in_a_decode_step_raise_naming_window_and_position():
  # Untied embeddings: a NaN in token x's embedding reaches the logits only where x is read.
  import jaxllm
  from jaxllm.params import init_model

  cfg = jaxllm.TINY.replace(name="tiny-untied", tie_embeddings=False, num_layers=1)
  model = init_model(cfg, seed=0)
  x = 17
  windows = _windows(cfg.vocab_size, 2, 16, seed=2)
  windows[windows == x] = x + 1
  windows[1, 11] = x  # decoded after a prefill of 4
  model.embed.value = model.embed.value.at[:, x].set(np.nan)
  scorer = _dense_scorer(model, prefill=4, block=16, batch_size=2)
  with pytest.raises(ValueError, match=r"^logits of window 1 at position 11 are not finite"):
    streaming_perplexity(scorer, windows)
