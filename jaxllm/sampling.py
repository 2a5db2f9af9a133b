"""Token sampling: greedy, temperature, top-k and top-p, with explicit PRNG keys."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
      raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0 = off), got {k!r}")
    if not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {p!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature-scaled logits [B, V] with tokens outside top-k / top-p set to -inf."""
  logits = logits.astype(jnp.float32) / config.temperature
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
  """Draws one token id per row of `logits` [B, V] -> int32 [B]."""
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)
