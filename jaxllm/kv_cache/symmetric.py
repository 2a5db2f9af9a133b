"""Per-token symmetric caches: INT8 (K, V) and FireQ INT4 (K, V) with FP8 queries.

Each (token, KV head) has one scale for its key and one for its value. FireQ
adds a per-channel post-RoPE key scale ``s`` [L, Hkv, D]: keys are stored as
``k / s`` and queries multiplied by ``s`` (so q·k is unchanged), and queries
are rounded to FP8 e4m3 for the score product. Its pre-RoPE scale lives in the
weights (see `jaxllm.kv_cache.fireq`), so the cache never sees it.

Codes: 8-bit as int8; 4-bit as ``code + 8`` nibbles packed two per uint8 along
channels (lane c holds channels c and c + D/2).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.kv_cache.base import (
  SlotCacheMixin,
  bf16_bytes_per_token,
  check_room,
  insert_chunk,
  memory_report,
  repeat_kv_heads,
  tree_bytes,
)
from jaxllm.kv_cache.quantize import (
  fp8_quantize_dequantize,
  pack_along,
  quantize_symmetric,
  unpack_along,
)
from jaxllm.kv_cache.spec import CacheSpec


class SymmetricLayer(NamedTuple):
  """One layer's codes and scales; [B, Hkv, T, D * bits / 8] codes, [B, Hkv, T] scales."""

  k_codes: jax.Array
  k_scale: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array


def encode(x: jax.Array, bits: int, scale_dtype):
  """[..., D] float -> (codes [..., D * bits / 8], scale [...])."""
  codes, scale = quantize_symmetric(x, bits, -1, scale_dtype)
  if bits == 8:
    return codes.astype(jnp.int8), scale[..., 0]
  offset = 2 ** (bits - 1)
  return pack_along((codes + offset).astype(jnp.uint8), bits, -1), scale[..., 0]


def decode(codes: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """Inverse of `encode` up to rounding: float32 [..., D]."""
  if bits == 8:
    values = codes.astype(jnp.float32)
  else:
    values = (unpack_along(codes, bits, -1) - 2 ** (bits - 1)).astype(jnp.float32)
  return values * scale.astype(jnp.float32)[..., None]


@flax.struct.dataclass
class SymmetricKVCache(SlotCacheMixin):
  """INT8 / FireQ cache.

  Attributes:
    layers: one `SymmetricLayer` per layer.
    key_scale: [L, Hkv, D] post-RoPE per-channel key scale, or None.
    length: int32 scalar, slots written.
    start: [B] int32 first valid slot per row.
    spec, config: static.
  """

  layers: tuple[SymmetricLayer, ...]
  key_scale: jax.Array | None
  length: jax.Array
  start: jax.Array
  spec: CacheSpec = flax.struct.field(pytree_node=False)
  config: ModelConfig = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, spec, config, batch, capacity, start, key_scale=None) -> "SymmetricKVCache":
    d, bits = config.head_dim, spec.bits
    if d % (8 // bits):
      raise ValueError(f"{spec.name}: head_dim {d} cannot be packed {8 // bits} codes per byte")
    if key_scale is not None and key_scale.shape != (config.num_layers, config.num_kv_heads, d):
      raise ValueError(
        f"{spec.name}: key scale shape {key_scale.shape}, expected "
        f"{(config.num_layers, config.num_kv_heads, d)}"
      )
    rows = (batch, config.num_kv_heads, capacity)
    code_dtype = jnp.int8 if bits == 8 else jnp.uint8
    codes = jnp.zeros((*rows, d * bits // 8), code_dtype)
    scale = jnp.zeros(rows, spec.scale_jnp_dtype)
    layer = SymmetricLayer(codes, scale, codes, scale)
    return cls(
      layers=tuple(layer for _ in range(config.num_layers)),
      key_scale=None if key_scale is None else jnp.asarray(key_scale, jnp.float32),
      length=jnp.zeros((), jnp.int32),
      start=start,
      spec=spec,
      config=config,
    )

  @property
  def capacity(self) -> int:
    return self.layers[0].k_scale.shape[2]

  def attend(self, layer, q, k_pre_rope, k, v, q_slots, kernels=ops.KernelConfig()):
    """Attends q [B, S, Hq, D] over the stored (quantized) tokens and this chunk
    (full precision, causal), then writes the chunk; returns (out [B, S, Hq, D], layer state)."""
    del k_pre_rope
    check_room(self.length, q.shape[1], self.capacity)
    bits, stored = self.spec.bits, self.layers[layer]
    if self.key_scale is not None:
      scale = self.key_scale[layer]  # [Hkv, D]
      k = k.astype(jnp.float32) / scale
      q = q.astype(jnp.float32) * repeat_kv_heads(scale, self.config)
    if self.spec.fp8_queries:
      q = fp8_quantize_dequantize(q)
    k_buf = insert_chunk(decode(stored.k_codes, stored.k_scale, bits), k, self.length)
    v_buf = insert_chunk(decode(stored.v_codes, stored.v_scale, bits), v, self.length)
    out = ops.attention(q.astype(jnp.float32), k_buf, v_buf, q_slots, self.start, kernels)

    def write(codes_buf, scale_buf, x):
      codes, scale = encode(x.transpose(0, 2, 1, 3), bits, self.spec.scale_jnp_dtype)
      at = (0, 0, self.length)
      return (
        jax.lax.dynamic_update_slice(codes_buf, codes, (*at, 0)),
        jax.lax.dynamic_update_slice(scale_buf, scale, at),
      )

    new = SymmetricLayer(
      *write(stored.k_codes, stored.k_scale, k), *write(stored.v_codes, stored.v_scale, v)
    )
    return out.astype(v.dtype), new

  def advance(self, layer_states, num_tokens: int) -> "SymmetricKVCache":
    return self.replace(layers=tuple(layer_states), length=self.length + num_tokens)

  def memory(self) -> dict:
    """Exact bytes: per token and KV head, D*bits/8 code bytes + one scale, for K and V."""
    c = self.config
    scale_bytes = jnp.dtype(self.spec.scale_dtype).itemsize
    per_head = 2 * (c.head_dim * self.spec.bits // 8 + scale_bytes)
    bf16 = bf16_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim)
    total = tree_bytes((self.layers, self.key_scale))
    return memory_report(bf16, c.num_layers * c.num_kv_heads * per_head, 0, total)
