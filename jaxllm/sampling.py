"""Token sampling: greedy, temperature, top-k and top-p, with explicit PRNG keys."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Temperatures below this mean greedy decoding, the T -> 0 limit of sampling: float32
# logits divided by a temperature far below it overflow to inf.
MIN_TEMPERATURE = 1e-6


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How `sample` draws a token.

  Attributes:
    temperature: logits are divided by it before sampling; 0, and any value below
      `MIN_TEMPERATURE` (1e-6), means greedy (argmax, the T -> 0 limit).
    top_k: keep the k most likely tokens; 0 switches the filter off.
    top_p: keep the smallest set of most likely tokens whose mass reaches it; 1
      switches the filter off.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
      raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0 = off), got {k!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {p!r}")

  @property
  def greedy(self) -> bool:
    """True for temperatures below `MIN_TEMPERATURE` (0 included): sampling is argmax."""
    return self.temperature < MIN_TEMPERATURE


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature-scaled logits [B, V] with tokens outside top-k / top-p set to -inf.

  Each row's max is subtracted before dividing, so the kept logits are <= 0 and
  finite for any temperature. A greedy config keeps only each row's maximum (at 0).
  """
  logits = logits.astype(jnp.float32)
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  if config.greedy:
    return jnp.where(logits < 0, -jnp.inf, logits)
  logits = logits / config.temperature
  if config.top_k and config.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always the top token).
    cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < config.top_p, axis=-1)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[:, None] - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
  """Draws one token id per row of `logits` [B, V] -> int32 [B] (argmax when greedy)."""
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)
