"""What the model needs of a cache (`Cache`), and the pieces the caches share: per-row
lengths and writes, room checks, rollback, chunk insertion, memory reports."""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sparse_attention
from jaxllm.config import ModelConfig


class Cache(Protocol):
  """A KV cache as `jaxllm.model.Llama` uses it; every cache of `jaxllm.kv_cache` is one.

  Attributes:
    start: [B] int32, first valid slot of each row (left padding).
    length: [B] int32, slots written so far in each row; row b's next chunk goes to
      slots ``length[b] .. length[b] + S - 1`` (rows may differ, e.g. after `rollback`).
  """

  start: jax.Array
  length: jax.Array

  def attend(self, layer: int, q, k_pre_rope, k, v, q_slots, kernels) -> tuple[jax.Array, Any]:
    """Attention of one layer's queries q [B, S, Hq, D] (after RoPE) over everything
    cached and, causally, over the chunk's keys (before and after RoPE) and values
    [B, S, Hkv, D]; returns (output [B, S, Hq, D], the layer's new state)."""
    ...

  def advance(self, layer_states, num_tokens: int) -> Cache:
    """The cache holding every layer's new state, every row `num_tokens` slots longer."""
    ...

  def rollback(self, length) -> Cache:
    """The cache truncated to `length` tokens: a scalar (every row) or [B] (per row)."""
    ...


def concrete_ints(x) -> np.ndarray | None:
  """`x` as a host int64 array when it is concrete, None under tracing."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(jax.device_get(x), np.int64)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def initial_lengths(batch: int, value: int = 0) -> jax.Array:
  """The `length` of a cache holding `value` tokens in each of `batch` rows: [B] int32."""
  return jnp.full((batch,), value, jnp.int32)


def row_lengths(length, batch: int, owner: str) -> jax.Array:
  """`length` (a scalar for every row, or one per row) as [batch] int32; ValueError,
  naming `owner`, for any other shape (shapes are static, so this holds under jit)."""
  length = jnp.asarray(length)
  if length.ndim == 0:
    length = jnp.broadcast_to(length, (batch,))
  if length.shape != (batch,):
    raise ValueError(
      f"{owner}: a length must be a scalar or one per row, shape ({batch},); "
      f"got shape {tuple(length.shape)}"
    )
  if not jnp.issubdtype(length.dtype, jnp.integer):
    raise ValueError(f"{owner}: lengths must be integers, got {length.dtype}")
  return length.astype(jnp.int32)


def check_room(length, num_tokens: int, capacity: int) -> None:
  """Raises ValueError if writing `num_tokens` at `length` ([B] or a scalar) overflows
  `capacity` in any row (when concrete)."""
  n = concrete_ints(length)
  if n is not None and n.size and int(n.max()) + num_tokens > capacity:
    row = int(np.argmax(n.reshape(-1)))
    raise ValueError(
      f"KV cache overflow: {int(n.max())} cached + {num_tokens} new tokens > capacity "
      f"{capacity} (row {row}); create the cache with a larger capacity"
    )


def no_overflow() -> jax.Array:
  """The `overflow` flag of a new cache: a bool scalar, False."""
  return jnp.zeros((), jnp.bool_)


def no_refused_rollback(batch: int) -> jax.Array:
  """The `refused_rollback` flags of a new cache: [B] bool, False."""
  return jnp.zeros((batch,), jnp.bool_)


def overflow_after(overflow, length, num_tokens: int, capacity: int) -> jax.Array:
  """The `overflow` flag (a bool scalar) after writing `num_tokens` at `length` ([B]):
  set (and kept) once a write in any row goes past `capacity`. Works under jit, where
  `check_room` cannot."""
  return jnp.logical_or(overflow, jnp.any(length + num_tokens > capacity))


def update_rows(buf: jax.Array, new: jax.Array, at: jax.Array, axis: int) -> jax.Array:
  """`buf` [R, ...] with row r's `new[r]` written from index `at[r]` along `axis`
  (an axis of `buf`, > 0): a per-row `dynamic_update_slice` (start indices clamped
  so the update fits, as `lax.dynamic_update_slice` does). `at` is [R], or [1]: one
  index for every row.

  One index is a plain `dynamic_update_slice` (in place on XLA:CPU, as a decode step
  at batch 1 needs); one per row is a scatter."""
  if at.shape[0] == 1:
    index = [0] * buf.ndim
    index[axis] = at[0]
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), index)

  def one(row, update, a):
    index = [0] * row.ndim
    index[axis - 1] = a
    return jax.lax.dynamic_update_slice(row, update, index)

  return jax.vmap(one)(buf, new.astype(buf.dtype), at)


def slice_rows(buf: jax.Array, at: jax.Array, size: int, axis: int) -> jax.Array:
  """Row r of `buf` [R, ...] sliced to `size` entries from `at[r]` along `axis` (> 0);
  `at` is [R] or [1] (one index for every row)."""
  if at.shape[0] == 1:
    return jax.lax.dynamic_slice_in_dim(buf, at[0], size, axis)
  return jax.vmap(lambda row, a: jax.lax.dynamic_slice_in_dim(row, a, size, axis - 1))(buf, at)


class SlotCacheMixin:
  """`check_room`, `check_overflow`, `check_rollback` and `rollback` for caches with
  per-row `length` [B], `capacity`, an `overflow` flag and `refused_rollback` flags.

  Writes past the capacity under jit (a traced `length`, e.g. in `lax.scan` or a
  jitted decode step) cannot raise; they are clamped to the last slots and set
  `overflow`, a bool scalar that every later cache (`advance`, `rollback`, `grow`,
  `for_chunked_decode`) keeps. `check_overflow` raises on the host when it is set.

  Rollback: each row can go back to any length from its `rollback_floor()` (0, or
  the tokens a compressed cache has already quantized) up to its current length.
  `check_rollback` is the host-side check (like `Generator.validate`: run it outside
  jit, before the work); `rollback` runs it itself when its argument and the lengths
  are concrete (eager calls). Under jit nothing can raise: a row asked to go below
  its floor is left at its floor and its `refused_rollback` flag is set (kept from
  then on), which `check_overflow` reports on the host; that row's later logits are
  not those of the requested sequence. A length above a row's current length leaves
  that row as it is (rollback never lengthens).
  """

  def check_room(self, num_tokens: int) -> None:
    """Raises ValueError if `num_tokens` more tokens do not fit (checked when length is concrete)."""
    check_room(self.length, num_tokens, self.capacity)

  @property
  def batch(self) -> int:
    return self.start.shape[0]

  @property
  def name(self) -> str:
    """The cache as errors name it: class and, for compressed caches, preset name."""
    spec = getattr(self, "spec", None)
    return type(self).__name__ + (f" ({spec.name})" if spec is not None else "")

  def with_attention(self, method):
    """This cache attending by `method` (`jaxllm.sparse_attention.MoBA` / `SparQ`; None:
    dense attention) from now on; ValueError if the method cannot run over this cache's
    capacity and head dim (e.g. top_k above the blocks, k above the slots, r above D)."""
    sparse_attention.check_method(method)
    if method is not None:
      method.check_call(self.head_dim, self.capacity)
    return self.replace(attention=method)

  def attend_slots(self, q, k, v, q_slots, kernels, block_keys=None):
    """Attention of q over slot buffers k, v [B, Hkv, T, D] by this cache's method."""
    return sparse_attention.attend(
      self.attention, q, k, v, q_slots, self.start, kernels, block_keys
    )

  def check_overflow(self) -> None:
    """Raises ValueError, on the host (fetches the flags), if a write under jit went past
    the capacity or a rollback under jit asked a row for fewer tokens than it can keep."""
    if bool(jax.device_get(self.overflow)):
      raise ValueError(
        f"KV cache overflow: a write under jit went past the capacity of {self.capacity} "
        f"tokens (lengths now {np.asarray(jax.device_get(self.length)).tolist()}); the "
        "writes past it were clamped and what followed is wrong; create the cache with a "
        "larger capacity"
      )
    refused = np.asarray(jax.device_get(self.refused_rollback))
    if refused.any():
      row = int(np.flatnonzero(refused)[0])
      floor = int(np.asarray(jax.device_get(self.rollback_floor()))[row])
      raise ValueError(
        f"{self.name}: a rollback under jit asked row {row} for fewer tokens than it can "
        f"roll back to (its floor, {floor} tokens now); the row was held at its floor and "
        "what followed is wrong; check rollbacks on the host first (cache.check_rollback)"
      )

  def rollback_floor(self) -> jax.Array:
    """[B] int32: the fewest tokens each row can roll back to (0: any length)."""
    return jnp.zeros_like(self.length)

  def check_rollback(self, length) -> None:
    """Host-side check of `rollback(length)` (a scalar or [B]): raises ValueError, naming
    the cache, the row, the requested length and the minimum that row can roll back to,
    if a row cannot roll back that far. Fetches the lengths: call it outside jit."""
    want = concrete_ints(row_lengths(length, self.batch, f"{self.name}.rollback"))
    floor = concrete_ints(self.rollback_floor())
    current = concrete_ints(self.length)
    if want is None or floor is None or current is None:
      raise ValueError(
        f"{self.name}.check_rollback is a host-side check: call it outside jit with concrete "
        "lengths (under jit a refused rollback sets refused_rollback; see check_overflow)"
      )
    bad = np.flatnonzero(want < floor)
    if bad.size:
      row = int(bad[0])
      quantized = " (the tokens before it are already quantized)" if floor[row] else ""
      raise ValueError(
        f"{self.name}: cannot roll back row {row} to {int(want[row])} tokens: the least it "
        f"can roll back to is {int(floor[row])}{quantized}; it holds {int(current[row])} "
        f"(at most {int(current[row] - floor[row])} newest tokens can be rolled back)"
      )

  def rollback(self, length):
    """Cache truncated to `length` tokens: a scalar (every row) or [B] (per row); a row is
    never made longer than it is. Checked on the host (`check_rollback`) when `length`
    and the cache are concrete; under jit see the class docstring (`refused_rollback`)."""
    target = row_lengths(length, self.batch, f"{self.name}.rollback")
    if concrete_ints(target) is not None and concrete_ints(self.length) is not None:
      self.check_rollback(target)
    floor = self.rollback_floor()
    refused = target < floor
    return self.replace(
      length=jnp.maximum(jnp.minimum(self.length, target), floor),
      refused_rollback=self.refused_rollback | refused,
    )


def insert_chunk(buf: jax.Array, chunk: jax.Array, at) -> jax.Array:
  """Writes chunk [B, S, H, D] into buf [B, H, T, D], row b at slot `at[b]` (`at`: [B])."""
  return update_rows(buf, chunk.astype(buf.dtype).transpose(0, 2, 1, 3), at, 2)


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
