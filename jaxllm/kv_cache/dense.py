"""Dense (float) static-shape key/value cache: the reference cache layout.

Each row has its own length: row b's next chunk is written at slots
``length[b] ..`` (rows of one prompt batch all have the same length; they part
after a per-row `rollback`, e.g. the rejected tails of speculative drafts).
Rows with shorter prompts are left-padded, their first valid slot recorded in
``start``. A token's RoPE position is ``slot - start[row]``.

Visibility is decided from query slots (see `jaxllm.ops.attention`), so
shortening ``length`` (`rollback`) is all it takes to drop tokens; stale entries
are never read.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.kv_cache.base import (
  SlotCacheMixin,
  bf16_bytes_per_token,
  initial_lengths,
  insert_chunk,
  memory_report,
  no_overflow,
  no_refused_rollback,
  overflow_after,
  update_rows,
)


@flax.struct.dataclass
class DenseKVCache(SlotCacheMixin):
  """Float keys and values, one dense buffer per layer (no quantization).

  `KVCache` is a deprecated alias of this class.

  Buffers are stored [B, Hkv, T, D], the layout attention reads, so under a mesh each
  device holds its batch block of its KV-head block (`array_axes`) and a decode step
  moves no cache data between devices. A batch-1 cache stores [Hkv, T, D]: XLA:CPU
  copies a donated buffer with a unit batch dim each time a dot reads it after an
  in-place update, which made batch-1 decode 1.8x slower; `view` gives [B, Hkv, T, D]
  either way.

  Attributes:
    keys, values: one [B, Hkv, T, D] array per layer ([Hkv, T, D] at batch 1).
    length: [B] int32, slots written so far in each row.
    start: [B] int32, first valid slot of each row.
    overflow: bool scalar, set once a write went past the capacity (see
      `SlotCacheMixin.check_overflow`); replicated, no logical axes.
    refused_rollback: [B] bool, set for a row once a rollback under jit asked it to go
      below 0 tokens (see `SlotCacheMixin`).
    attention: static, the attention method (`jaxllm.sparse_attention`; None: dense);
      set with `with_attention`.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  length: jax.Array
  start: jax.Array
  overflow: jax.Array
  refused_rollback: jax.Array
  attention: Any = flax.struct.field(pytree_node=False, default=None)

  LOGICAL_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")
  # Logical names of every array, by its field name (`jaxllm.sharded.shard_cache`; see
  # `array_axes` for a batch-1 cache).
  ARRAY_AXES = {
    "keys": LOGICAL_AXES,
    "values": LOGICAL_AXES,
    "length": ("cache_batch",),
    "start": ("cache_batch",),
    "overflow": (),
    "refused_rollback": ("cache_batch",),
  }

  @classmethod
  def create(
    cls,
    config: ModelConfig,
    batch: int,
    capacity: int,
    dtype=jnp.float32,
    start: jax.Array | None = None,
  ) -> "DenseKVCache":
    if capacity <= 0 or batch <= 0:
      raise ValueError(f"KV cache needs batch > 0 and capacity > 0, got {batch=}, {capacity=}")
    shape = (config.num_kv_heads, capacity, config.head_dim)
    if batch > 1:
      shape = (batch, *shape)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return cls(
      keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
      values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
      length=initial_lengths(batch),
      start=start,
      overflow=no_overflow(),
      refused_rollback=no_refused_rollback(batch),
    )

  @classmethod
  def from_views(cls, keys, values, start: jax.Array) -> "DenseKVCache":
    """A full cache holding [B, Hkv, S, D] views (e.g. a prefill chunk), every row length S."""
    batch = keys[0].shape[0]
    return cls(
      keys=tuple(_stored(k) for k in keys),
      values=tuple(_stored(v) for v in values),
      length=initial_lengths(batch, keys[0].shape[2]),
      start=start,
      overflow=no_overflow(),
      refused_rollback=no_refused_rollback(batch),
    )

  @property
  def capacity(self) -> int:
    return self.keys[0].shape[-2]

  @property
  def head_dim(self) -> int:
    return self.keys[0].shape[-1]

  @property
  def num_bytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in self.keys + self.values)

  def array_axes(self) -> dict:
    """`ARRAY_AXES` of this cache: a batch-1 cache's buffers have no batch dim."""
    if self.batch > 1:
      return self.ARRAY_AXES
    return {**self.ARRAY_AXES, "keys": self.LOGICAL_AXES[1:], "values": self.LOGICAL_AXES[1:]}

  def view(self, buf: jax.Array) -> jax.Array:
    """One stored buffer as [B, Hkv, T, D] (a free reshape)."""
    return buf.reshape(self.batch, *buf.shape[-3:])

  def write(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes [B, S, Hkv, D] chunks, row b at slot `length[b]`, into `layer`; returns
    [B, Hkv, T, D] views of the buffers."""
    return self._put(self.keys[layer], k), self._put(self.values[layer], v)

  def _put(self, buf: jax.Array, chunk: jax.Array) -> jax.Array:
    if buf.ndim == 4:
      return insert_chunk(buf, chunk, self.length)
    # batch 1: one dynamic_update_slice of the [Hkv, T, D] buffer, in place on XLA:CPU
    rows = chunk[0].astype(buf.dtype).transpose(1, 0, 2)
    return self.view(update_rows(buf, rows, self.length, 1))

  def attend(self, layer: int, q, k_pre_rope, k, v, q_slots, kernels=ops.KernelConfig()):
    """Writes this chunk's keys (after RoPE) and values, then attends over the cache.

    Args:
      layer: layer index.
      q: [B, S, Hq, D] queries after RoPE.
      k_pre_rope: [B, S, Hkv, D] keys before RoPE (unused by the dense cache).
      k, v: [B, S, Hkv, D] keys after RoPE and values.
      q_slots: [B, S] slot of each query.
      kernels: implementation choice for `ops.attention`.

    Returns:
      (out [B, S, Hq, D], layer state) where the state goes to `advance`.
    """
    del k_pre_rope
    self.check_room(q.shape[1])
    k_buf, v_buf = self.write(layer, k, v)
    return self.attend_slots(q, k_buf, v_buf, q_slots, kernels), (k_buf, v_buf)

  def for_chunked_decode(self, first: int, chunk: int) -> "DenseKVCache":
    """This cache: K/V are stored exactly, so decoding `chunk` tokens per step
    (from position `first`) scores as one token per step does."""
    del first, chunk
    return self

  def advance(self, layer_states, num_tokens: int) -> "DenseKVCache":
    """New cache holding each layer's written (k, v) [B, Hkv, T, D] buffers, `num_tokens` longer."""
    return self.replace(
      keys=tuple(_stored(k) for k, _ in layer_states),
      values=tuple(_stored(v) for _, v in layer_states),
      length=self.length + num_tokens,
      overflow=overflow_after(self.overflow, self.length, num_tokens, self.capacity),
    )

  def grow(self, capacity: int) -> "DenseKVCache":
    """The same cache with room for `capacity` slots (new slots zero)."""
    extra = capacity - self.capacity
    if extra < 0:
      raise ValueError(f"cannot shrink a KV cache from {self.capacity} to {capacity} slots")
    pad = ((0, 0),) * (self.keys[0].ndim - 2) + ((0, extra), (0, 0))
    return self.replace(
      keys=tuple(jnp.pad(k, pad) for k in self.keys),
      values=tuple(jnp.pad(v, pad) for v in self.values),
    )

  def memory(self) -> dict:
    """Exact bytes: K and V in the cache dtype, no scales, no residual window."""
    kv_heads, _, head_dim = self.keys[0].shape[-3:]
    bf16 = bf16_bytes_per_token(len(self.keys), kv_heads, head_dim)
    per_token = bf16 * self.keys[0].dtype.itemsize // 2
    return memory_report(bf16, per_token, 0, self.num_bytes)


KVCache = DenseKVCache  # deprecated alias (the name before issue 23)


def _stored(x: jax.Array) -> jax.Array:
  """A [B, Hkv, T, D] view as stored: [Hkv, T, D] at batch 1."""
  return x.reshape(x.shape[1:]) if x.shape[0] == 1 else x
