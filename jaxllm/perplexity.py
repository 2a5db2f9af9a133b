"""Perplexity over non-overlapping windows (the GPTQ-style protocol).

The whole text is tokenized once without special tokens and cut into
non-overlapping windows of `context` tokens; the ragged tail is dropped. Every
token of a window after the first is scored, so a window contributes
``context - 1`` tokens. Perplexity is exp(mean NLL) over all scored tokens.

Log-softmax runs in float32 inside the jitted forward, which returns one NLL
sum per window: the [B, S, V] logits never leave the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def tokenize_windows(tokenizer: Any, text: str, context: int) -> np.ndarray:
  """Token windows int32 [N, context] of `text`, ragged tail dropped.

  Args:
    tokenizer: anything with ``encode(text) -> list[int]`` that adds no special
      tokens by default (jaxllm's `Tokenizer` does not).
    text: the whole evaluation text, tokenized in one call.
    context: tokens per window, >= 2 (one context token plus one scored token).

  Raises:
    ValueError: context < 2, or the text has fewer than `context` tokens.
  """
  if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 2:
    raise ValueError(f"context must be an int >= 2 (one scored token per window), got {context!r}")
  ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
  n = len(ids) // context
  if n == 0:
    raise ValueError(f"text has {len(ids)} tokens, fewer than one window of context={context}")
  return ids[: n * context].reshape(n, context).astype(np.int32)


def check_windows(windows, vocab_size: int | None = None) -> np.ndarray:
  """`windows` as int32 [N >= 1, context >= 2], ids checked against `vocab_size` when given."""
  windows = np.asarray(windows)
  if (
    windows.ndim != 2
    or windows.shape[0] == 0
    or windows.shape[1] < 2
    or not np.issubdtype(windows.dtype, np.integer)
  ):
    raise ValueError(
      f"windows must be int [N >= 1, context >= 2], got {windows.dtype}{list(windows.shape)}"
    )
  if vocab_size is not None and (windows.min() < 0 or windows.max() >= vocab_size):
    raise ValueError(
      f"token ids must lie in [0, {vocab_size}), got [{windows.min()}, {windows.max()}]"
    )
  return windows.astype(np.int32)


def _nll_sums(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Sum over positions 1..S-1 of -log p(token | prefix), per row: f32 [B]."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(logz - picked, axis=-1)


def make_nll_fn(model_or_forward: Any, make_cache=None) -> Callable[[np.ndarray], jax.Array]:
  """A jitted ``tokens [B, S] -> NLL sums f32 [B]``.

  Args:
    model_or_forward: a `Pipeline` (anything with a ``.model``), an NNX `Llama`,
      or a traceable ``forward(tokens [B, S]) -> logits [B, S, V]``.
    make_cache: with a model, a `jaxllm.kv_cache.CacheFactory`: the window runs as one
      chunk into an empty cache of S slots from it (its format and attention method,
      e.g. a sparse one), instead of the cacheless causal forward.
  """
  model = getattr(model_or_forward, "model", model_or_forward)
  if make_cache is not None and not isinstance(model, nnx.Module):
    raise TypeError("make_nll_fn: make_cache needs a model, not a forward function")
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)

    @jax.jit
    def from_state(state, tokens):
      cache = None
      if make_cache is not None:
        b, s = tokens.shape
        cache = make_cache(b, s, jnp.zeros((b,), jnp.int32))
      logits, _ = nnx.merge(graphdef, state)(tokens, cache=cache, logits_at="all")
      return _nll_sums(logits, tokens)

    return lambda tokens: from_state(state, jnp.asarray(tokens, jnp.int32))
  if callable(model):
    forward = jax.jit(lambda tokens: _nll_sums(model(tokens), tokens))
    return lambda tokens: forward(jnp.asarray(tokens, jnp.int32))
  raise TypeError(f"expected a Pipeline, an nnx.Module or a callable, got {type(model).__name__}")


def window_nll(
  model_or_forward: Any, windows: np.ndarray, batch_size: int = 1, make_cache=None
) -> Iterator[tuple[float, int]]:
  """Iterator of (sum of NLL in nats, scored-token count) per window, in order.

  Args:
    model_or_forward: see `make_nll_fn`.
    windows: int [N, context] from `tokenize_windows`.
    batch_size: windows per forward pass; a short last batch is padded with
      copies of its last window (results dropped), so one compile serves all.
    make_cache: see `make_nll_fn`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  model = getattr(model_or_forward, "model", model_or_forward)
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  windows = check_windows(windows, vocab)
  return _scores(make_nll_fn(model_or_forward, make_cache), windows, batch_size)


def _scores(nll_fn, windows: np.ndarray, batch_size: int) -> Iterator[tuple[float, int]]:
  count = windows.shape[1] - 1
  for lo in range(0, len(windows), batch_size):
    batch = windows[lo : lo + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    sums = np.asarray(nll_fn(batch), np.float64)
    for s in sums[:real]:
      yield float(s), count


def perplexity(
  model_or_forward: Any,
  windows: np.ndarray,
  batch_size: int = 1,
  progress: bool = False,
  make_cache=None,
) -> dict:
  """Perplexity of `windows` (see `tokenize_windows`).

  Args:
    model_or_forward: see `make_nll_fn`.
    windows: int [N, context].
    batch_size: windows per forward pass.
    progress: show a tqdm bar on stderr.
    make_cache: see `make_nll_fn` (one chunk into an empty cache from it).

  Returns:
    dict(ppl, nll (mean per scored token, nats), tokens (scored), windows, context).
  """
  windows = np.asarray(windows)
  results = window_nll(model_or_forward, windows, batch_size, make_cache)
  if progress:
    import tqdm  # pylint: disable=import-outside-toplevel

    results = tqdm.tqdm(results, total=len(windows), desc="windows", unit="win", leave=False)
  total, tokens = 0.0, 0
  for s, c in results:
    total += s
    tokens += c
  nll = total / tokens
  return {
    "ppl": math.exp(nll),
    "nll": nll,
    "tokens": tokens,
    "windows": len(windows),
    "context": int(windows.shape[1]),
  }
