"""Streaming perplexity: score a text by really decoding it through a KV cache.

A one-pass forward sees every key in full precision, so it cannot show what a
compressed cache costs (KIVI notes that fake-quantizing one pass misstates the
residual window's effect). Here each window is run the way a server runs it:

1. prefill the first `prefill` tokens into an empty cache (they attend to each
   other in full precision, then are stored in the cache's format);
2. feed the remaining tokens one at a time, each step attending to the cache as
   stored, and score the next token from that step's logits.

Every token after the first is scored (the protocol of `jaxllm.perplexity`):
positions 1..prefill from the prefill logits, the rest from decode steps. Decode
steps run in blocks of `block` steps under one `lax.scan`, so the host
dispatches once per block, not once per token.

Chunked decoding (`StreamingConfig.chunk` > 1) feeds `chunk` tokens per step,
through the cache that ``cache.for_chunked_decode(prefill, chunk)`` returns
after the prefill: the dense cache as it is; KIVI / RotateKV as they are, when
the chunks end where groups leave their full-precision window (else
ValueError: a flush inside a step would change what its later tokens read);
the per-token caches set to read the chunk's earlier tokens as stored, as
one-token steps would. The scores then equal those of one-token steps up to
float rounding, and a window costs context/chunk steps instead of context.

Float rounding matters more for some caches than others. A 32-row matmul rounds
differently from 32 one-row ones; where that moves a value across a code
boundary (an INT4 key code, an FP8 query), every later token reads a
slightly different cache, so the two runs become two draws of the rounding.
KIVI's and RotateKV's perplexity agrees between the two orders up to float
rounding (chunk tokens are read exactly until a flush quantizes them all at once);
the per-token caches', FireQ INT4's most of all, differ by a draw, which short-text
figures carry (`colab/kv_cache_compression.ipynb`; docs/results.md, "Chunked
decoding and rounding draws").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.kv_cache import CacheFactory, check_cache_factory
from jaxllm.perplexity import check_windows


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
  """How windows are streamed.

  Attributes:
    prefill: tokens of each window run as one prefill chunk (>= 1).
    block: decode steps per jitted `lax.scan` call.
    chunk: tokens fed per decode step (see the module docstring; the cache
      must accept it, else `StreamingScorer` raises ValueError).
    batch_size: windows decoded side by side.
    capacity_multiple: the cache capacity is rounded up to this (block and
      group sizes of compressed caches divide it).
  """

  prefill: int = 32
  block: int = 64
  batch_size: int = 8
  capacity_multiple: int = 128
  chunk: int = 1

  def __post_init__(self):
    for name in ("prefill", "block", "batch_size", "capacity_multiple", "chunk"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"StreamingConfig.{name} must be an int >= 1, got {value!r}")

  def layout(self, context: int) -> tuple[int, int]:
    """(decode blocks, cache capacity) for windows of `context` tokens."""
    if context < self.prefill + 2:
      raise ValueError(
        f"context={context} leaves nothing to decode after prefill={self.prefill}; "
        "use a longer context or a shorter prefill"
      )
    steps = -(-(context - 1 - self.prefill) // self.chunk)
    blocks = -(-steps // self.block)
    capacity = self.prefill + blocks * self.block * self.chunk
    capacity = -(-capacity // self.capacity_multiple) * self.capacity_multiple
    return blocks, capacity


def _scores(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """NLL f32 and argmax int32 of `targets` [B, S] under `logits` [B, S, V]."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked, jnp.argmax(logits, axis=-1).astype(jnp.int32)


class StreamingScorer:
  """Scores windows by prefill + token-by-token decode through caches from `make_cache`.

  Args:
    model: an NNX `Llama` (already prepared for the cache, e.g. with scales folded in).
    make_cache: a `jaxllm.kv_cache.CacheFactory` (``make_cache(batch, capacity,
      start)``; e.g. ``kv_cache.cache_factory(spec, config, dtype, calibration)``).
    config: see `StreamingConfig`.
  """

  def __init__(self, model: nnx.Module, make_cache: CacheFactory, config=StreamingConfig()):
    check_cache_factory(make_cache, "StreamingScorer")
    self.config = config
    self.make_cache = make_cache
    self.vocab_size = model.config.vocab_size
    self.graphdef, self.state = nnx.split(model)
    self._prefill = jax.jit(self._prefill_fn)
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))

  def _prefill_fn(self, state, cache, tokens, targets):
    logits, cache = nnx.merge(self.graphdef, state)(tokens, cache=cache)
    nll, top1 = _scores(logits, targets)
    return nll, top1, cache

  def _decode_fn(self, state, cache, tokens, targets):
    """`tokens`, `targets` [B, block * chunk]: one decode step per `chunk` columns."""
    model = nnx.merge(self.graphdef, state)
    b, chunk = tokens.shape[0], self.config.chunk
    logits_at = "last" if chunk == 1 else "all"

    def step(cache, columns):
      token, target = columns  # [B, chunk]
      logits, cache = model(token, cache=cache, logits_at=logits_at)
      return cache, _scores(logits, target)

    by_step = lambda x: x.reshape(b, -1, chunk).transpose(1, 0, 2)
    cache, (nll, top1) = jax.lax.scan(step, cache, (by_step(tokens), by_step(targets)))
    by_row = lambda x: x.transpose(1, 0, 2).reshape(b, -1)
    return by_row(nll), by_row(top1), cache

  def score_batch(self, windows: np.ndarray, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NLL f32 [B, L-1] and argmax int32 [B, L-1] for token windows [B, L].

    Raises ValueError if a score is not finite (NaN/inf logits: the weights or
    activations hold NaN/inf), naming the window (`first` + row) and position, or
    if the cache overflowed."""
    cfg = self.config
    b, length = windows.shape
    blocks, capacity = cfg.layout(length)
    steps = length - 1 - cfg.prefill
    span = cfg.block * cfg.chunk  # tokens per scan call
    # Padding past the window's end keeps every scan block the same shape; those
    # steps run on token 0 and their scores are dropped.
    padded = np.zeros((b, cfg.prefill + blocks * span + 1), np.int32)
    padded[:, :length] = windows
    cache = self.make_cache(b, capacity, jnp.zeros((b,), jnp.int32))  # no left padding
    cache.for_chunked_decode(cfg.prefill, cfg.chunk)  # raises before any work if refused
    nll, top1, cache = self._prefill(
      self.state,
      cache,
      jnp.asarray(padded[:, : cfg.prefill]),
      jnp.asarray(padded[:, 1 : cfg.prefill + 1]),
    )
    cache = cache.for_chunked_decode(cfg.prefill, cfg.chunk)
    nlls, tops = [np.asarray(nll)], [np.asarray(top1)]
    for i in range(blocks):
      lo = cfg.prefill + i * span
      tokens = jnp.asarray(padded[:, lo : lo + span])
      targets = jnp.asarray(padded[:, lo + 1 : lo + span + 1])
      nll, top1, cache = self._decode(self.state, cache, tokens, targets)
      nlls.append(np.asarray(nll))
      tops.append(np.asarray(top1))
    keep = cfg.prefill + steps
    nll, top1 = np.concatenate(nlls, 1)[:, :keep], np.concatenate(tops, 1)[:, :keep]
    # Scores are already on the host: checking them costs no device sync.
    bad = ~np.isfinite(nll)
    if bad.any():
      row, pos = (int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
        f"logits of window {first + row} at position {pos} are not finite: the weights or "
        "activations hold NaN/inf"
      )
    cache.check_overflow()  # cannot fire: `layout` sizes the cache, nothing rolls back
    return nll, top1

  def score(self, windows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per window, in order: (NLL [L-1], argmax [L-1]). A short last batch is
    padded with copies of its last window (results dropped)."""
    windows = check_windows(windows, self.vocab_size)
    bs = self.config.batch_size
    for lo in range(0, len(windows), bs):
      batch = windows[lo : lo + bs]
      real = len(batch)
      if real < bs:
        batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, axis=0)])
      nll, top1 = self.score_batch(batch, first=lo)
      for i in range(real):
        yield nll[i], top1[i]


def streaming_perplexity(
  scorer: StreamingScorer,
  windows: np.ndarray,
  reference_top1: np.ndarray | None = None,
  progress: bool = False,
) -> tuple[dict, np.ndarray]:
  """Streaming perplexity of `windows` [N, L].

  Args:
    scorer: a `StreamingScorer`.
    windows: int [N, L] token windows (see `jaxllm.perplexity.tokenize_windows`).
    reference_top1: optional int [N, L-1] argmaxes of another run (e.g. the dense
      cache) to report top-1 agreement against.
    progress: tqdm bar on stderr.

  Returns:
    (dict(ppl, nll, tokens, windows, context, prefill[, top1_agree]), argmax [N, L-1]).
  """
  windows = check_windows(windows, scorer.vocab_size)
  if reference_top1 is not None and np.shape(reference_top1) != (
    windows.shape[0],
    windows.shape[1] - 1,
  ):
    raise ValueError(
      f"reference_top1 must have shape {(windows.shape[0], windows.shape[1] - 1)}, "
      f"got {np.shape(reference_top1)}"
    )
  results = scorer.score(windows)
  if progress:
    import tqdm  # pylint: disable=import-outside-toplevel

    results = tqdm.tqdm(results, total=len(windows), desc="windows", unit="win", leave=False)
  total, tops = 0.0, []
  for nll, top1 in results:
    total += float(np.sum(nll, dtype=np.float64))
    tops.append(top1)
  top1 = np.stack(tops)
  tokens = top1.size
  out = {
    "ppl": math.exp(total / tokens),
    "nll": total / tokens,
    "tokens": int(tokens),
    "windows": int(windows.shape[0]),
    "context": int(windows.shape[1]),
    "prefill": scorer.config.prefill,
    "chunk": scorer.config.chunk,
  }
  if reference_top1 is not None:
    out["top1_agree"] = float(np.mean(top1 == np.asarray(reference_top1)))
  return out, top1
