"""What the model needs of a cache (`Cache`), and the pieces the caches share: room
checks, rollback, chunk insertion, memory reports."""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


class Cache(Protocol):
  """A KV cache as `jaxllm.model.Llama` uses it; every cache of `jaxllm.kv_cache` is one.

  Attributes:
    start: [B] int32, first valid slot of each row (left padding).
    length: int32 scalar, slots written so far; the next chunk goes there.
  """

  start: jax.Array
  length: jax.Array

  def attend(self, layer: int, q, k_pre_rope, k, v, q_slots, kernels) -> tuple[jax.Array, Any]:
    """Attention of one layer's queries q [B, S, Hq, D] (after RoPE) over everything
    cached and, causally, over the chunk's keys (before and after RoPE) and values
    [B, S, Hkv, D]; returns (output [B, S, Hq, D], the layer's new state)."""
    ...

  def advance(self, layer_states, num_tokens: int) -> Cache:
    """The cache holding every layer's new state, `num_tokens` slots longer."""
    ...


def concrete_int(x) -> int | None:
  """`int(x)` when x is concrete, None under tracing."""
  try:
    return int(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    return None


def check_room(length, num_tokens: int, capacity: int) -> None:
  """Raises ValueError if writing `num_tokens` at `length` overflows `capacity` (when concrete)."""
  n = concrete_int(length)
  if n is not None and n + num_tokens > capacity:
    raise ValueError(
      f"KV cache overflow: {n} cached + {num_tokens} new tokens > capacity {capacity}; "
      "create the cache with a larger capacity"
    )


def no_overflow() -> jax.Array:
  """The `overflow` flag of a new cache: a bool scalar, False."""
  return jnp.zeros((), jnp.bool_)


def overflow_after(overflow, length, num_tokens: int, capacity: int) -> jax.Array:
  """The `overflow` flag after writing `num_tokens` at `length`: set (and kept) once
  a write goes past `capacity`. Works under jit, where `check_room` cannot."""
  return jnp.logical_or(overflow, length + num_tokens > capacity)


class SlotCacheMixin:
  """`check_room`, `check_overflow` and `rollback` for caches with `length`,
  `capacity` and an `overflow` flag.

  Writes past the capacity under jit (a traced `length`, e.g. in `lax.scan` or a
  jitted decode step) cannot raise; they are clamped to the last slots and set
  `overflow`, a bool scalar that every later cache (`advance`, `rollback`, `grow`,
  `for_chunked_decode`) keeps. `check_overflow` raises on the host when it is set.
  """

  def check_room(self, num_tokens: int) -> None:
    """Raises ValueError if `num_tokens` more tokens do not fit (checked when length is concrete)."""
    check_room(self.length, num_tokens, self.capacity)

  def check_overflow(self) -> None:
    """Raises ValueError if a write went past the capacity (host side: fetches the flag)."""
    if bool(jax.device_get(self.overflow)):
      raise ValueError(
        f"KV cache overflow: a write under jit went past the capacity of {self.capacity} "
        f"tokens (length now {int(jax.device_get(self.length))}); the writes past it were "
        "clamped and what followed is wrong; create the cache with a larger capacity"
      )

  def rollback(self, length):
    """Cache truncated to `length` slots (never longer than now)."""
    return self.replace(length=jnp.minimum(self.length, jnp.asarray(length, jnp.int32)))


def insert_chunk(buf: jax.Array, chunk: jax.Array, at) -> jax.Array:
  """Writes chunk [B, S, H, D] into buf [B, H, T, D] at slot `at`."""
  chunk = chunk.astype(buf.dtype).transpose(0, 2, 1, 3)
  return jax.lax.dynamic_update_slice(buf, chunk, (0, 0, at, 0))


def attend_two_copies(q, stored, exact, use_exact, q_slots, start) -> jax.Array:
  """Attention where each (query, slot) reads one of two copies of the keys and values.

  Args:
    q: [B, S, Hq, D] queries.
    stored: (k, v) [B, Hkv, T, D], the slots as stored (e.g. dequantized).
    exact: (k, v) [B, Hkv, T, D], full-precision copies (read only where `use_exact`).
    use_exact: [B or 1, S, T] bool, which copy each query reads at each slot.
    q_slots: [B, S] slot of each query (causal: slots <= it); start: [B] first valid slot.

  Returns:
    [B, S, Hq, D] float32.
  """
  b, s, hq, d = q.shape
  hkv = stored[0].shape[1]
  qg = q.astype(jnp.float32).reshape(b, s, hkv, hq // hkv, d) * d**-0.5

  def scores(k):
    return jnp.einsum("bshgd,bhtd->bhsgt", qg, k.astype(jnp.float32))

  pick = use_exact[:, None, :, None, :]  # [B, 1, S, 1, T]
  logits = jnp.where(pick, scores(exact[0]), scores(stored[0]))
  t = jnp.arange(stored[0].shape[2], dtype=jnp.int32)
  visible = (t[None, None] <= q_slots[:, :, None]) & (t[None, None] >= start[:, None, None])
  logits = jnp.where(visible[:, None, :, None, :], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhsgt,bhtd->bshgd", jnp.where(pick, probs, 0.0), exact[1].astype(jnp.float32))
  out += jnp.einsum("bhsgt,bhtd->bshgd", jnp.where(pick, 0.0, probs), stored[1].astype(jnp.float32))
  return out.reshape(b, s, hq, d)


def repeat_kv_heads(x: jax.Array, config: ModelConfig) -> jax.Array:
  """[..., Hkv, D] per-KV-head values -> [..., Hq, D] for the query heads that share them."""
  return jnp.repeat(x, config.queries_per_kv_head, axis=-2)


def bf16_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
  """Bytes one token's K and V take in bfloat16 over all layers."""
  return num_layers * num_kv_heads * head_dim * 2 * 2


def memory_report(bf16_per_token: int, bytes_per_token, residual_bytes: int, total_bytes: int):
  """The dict every `cache.memory()` returns.

  Keys: bytes_per_token (all layers, codes + scales + zero points; float when a
  key group's scales amortize to a fraction), residual_bytes (fixed per
  sequence: residual window, staging and sink buffers, all layers),
  bf16_bytes_per_token, ratio_vs_bf16 (residual excluded), total_bytes (every
  array of this cache object as allocated, batch and capacity included).
  """
  bf16 = bf16_per_token
  return {
    "bytes_per_token": bytes_per_token,
    "residual_bytes": int(residual_bytes),
    "bf16_bytes_per_token": bf16,
    "ratio_vs_bf16": bytes_per_token / bf16,
    "total_bytes": int(total_bytes),
  }


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
