"""Static-shape key/value cache.

Slots are shared by the whole batch: slot ``length`` is written next for every
row, and rows with shorter prompts are left-padded, their first valid slot
recorded in ``start``. A token's RoPE position is ``slot - start[row]``.

Visibility is decided from query slots (see `jaxllm.ops.attention`), so
shortening ``length`` (`rollback`) is all it takes to drop tokens, e.g. the
rejected tail of a speculative draft; stale entries are never read.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  """Per-layer dense K/V buffers in attention layout.

  Attributes:
    keys, values: one [B, Hkv, T, D] array per layer.
    length: int32 scalar, slots written so far (same for every row).
    start: [B] int32, first valid slot of each row.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  length: jax.Array
  start: jax.Array

  LOGICAL_AXES = ("batch", "act_kv_heads", "cache_length", "head_dim")

  @classmethod
  def create(cls, config: ModelConfig, batch: int, capacity: int, dtype=jnp.float32,
             start: jax.Array | None = None) -> "KVCache":
    if capacity <= 0 or batch <= 0:
      raise ValueError(f"KV cache needs batch > 0 and capacity > 0, got {batch=}, {capacity=}")
    shape = (batch, config.num_kv_heads, capacity, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in zeros),
               length=jnp.zeros((), jnp.int32), start=start)

  @property
  def capacity(self) -> int:
    return self.keys[0].shape[2]

  @property
  def batch(self) -> int:
    return self.keys[0].shape[0]

  @property
  def num_bytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in self.keys + self.values)

  def write(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes [B, S, Hkv, D] chunks at slot `length` of `layer`; returns the layer's buffers."""
    def put(buf, new):
      new = new.astype(buf.dtype).transpose(0, 2, 1, 3)
      return jax.lax.dynamic_update_slice(buf, new, (0, 0, self.length, 0))
    return put(self.keys[layer], k), put(self.values[layer], v)

  def advance(self, keys, values, num_tokens: int) -> "KVCache":
    """New cache holding the written buffers, `num_tokens` longer."""
    return self.replace(keys=tuple(keys), values=tuple(values), length=self.length + num_tokens)

  def rollback(self, length) -> "KVCache":
    """Cache truncated to `length` slots (must not exceed the current length)."""
    return self.replace(length=jnp.minimum(self.length, jnp.asarray(length, jnp.int32)))
