"""Per-token caches: INT8 (K, V, symmetric) and FireQ INT4 (K, V) with FP8 queries.

Each (token, KV head) has, for its key and for its value, one scale per channel
group (`CacheSpec.key_groups` / `channel_groups`, default 1) and, with `CacheSpec.zero_point`
(FireQ's default), one zero point per scale (asymmetric min/max: a 4-bit code
then spans the row's actual range instead of a symmetric +-amax). FireQ
adds a per-channel post-RoPE key scale ``s`` [L, Hkv, D]: keys are stored as
``k / s`` and queries multiplied by ``s`` (so q·k is unchanged), and queries
are rounded to FP8 e4m3 for the score product. Its pre-RoPE scale lives in the
weights (see `jaxllm.kv_cache.fireq`), so the cache never sees it.

Codes: 8-bit symmetric as int8; asymmetric as uint8 in [0, 2**bits); 4-bit
symmetric as ``code + 8``; 4-bit nibbles packed two per uint8 along
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
  quantize_asymmetric,
  quantize_symmetric,
  unpack_along,
)
from jaxllm.kv_cache.spec import CacheSpec


class SymmetricLayer(NamedTuple):
  """One layer: codes [B, Hkv, T, D * bits / 8]; scales (and zero points, or None)
  [B, Hkv, T, groups] (the spec's key groups for k_*, channel groups for v_*)."""

  k_codes: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array | None
  v_codes: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array | None


def encode(x: jax.Array, spec: CacheSpec, groups: int):
  """[..., D] float -> (codes [..., D * bits / 8], scale [..., groups], zero [..., groups] or None).

  Each of the `groups` equal channel sub-groups of a row gets its own scale (and
  zero point when `spec.zero_point`).
  """
  bits = spec.bits
  *lead, d = x.shape
  xg = x.reshape(*lead, groups, d // groups)
  if spec.zero_point:
    codes, scale, zero = quantize_asymmetric(xg, bits, -1, spec.scale_jnp_dtype)
    codes, zero = codes.reshape(*lead, d), zero[..., 0]
    return pack_along(codes, bits, -1), scale[..., 0], zero
  codes, scale = quantize_symmetric(xg, bits, -1, spec.scale_jnp_dtype)
  codes = codes.reshape(*lead, d)
  if bits == 8:
    return codes.astype(jnp.int8), scale[..., 0], None
  offset = 2 ** (bits - 1)
  return pack_along((codes + offset).astype(jnp.uint8), bits, -1), scale[..., 0], None


def decode(codes: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int) -> jax.Array:
  """Inverse of `encode` up to rounding: float32 [..., D]."""
  if codes.dtype == jnp.int8:
    values = codes.astype(jnp.float32)
  else:
    values = unpack_along(codes, bits, -1).astype(jnp.float32)
    if zero is None and bits < 8:
      values = values - 2 ** (bits - 1)
  *lead, d = values.shape
  groups = scale.shape[-1]
  values = values.reshape(*lead, groups, d // groups) * scale.astype(jnp.float32)[..., None]
  if zero is not None:
    values = values + zero.astype(jnp.float32)[..., None]
  return values.reshape(*lead, d)


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
    for groups in {spec.key_groups, spec.channel_groups}:
      if d % groups:
        raise ValueError(f"{spec.name}: head_dim {d} does not split into {groups} channel groups")
    if key_scale is not None and key_scale.shape != (config.num_layers, config.num_kv_heads, d):
      raise ValueError(
        f"{spec.name}: key scale shape {key_scale.shape}, expected "
        f"{(config.num_layers, config.num_kv_heads, d)}"
      )
    rows = (batch, config.num_kv_heads, capacity)
    code_dtype = jnp.int8 if bits == 8 and not spec.zero_point else jnp.uint8
    codes = jnp.zeros((*rows, d * bits // 8), code_dtype)
    k_scale = jnp.zeros((*rows, spec.key_groups), spec.scale_jnp_dtype)
    v_scale = jnp.zeros((*rows, spec.channel_groups), spec.scale_jnp_dtype)
    k_zero, v_zero = (k_scale, v_scale) if spec.zero_point else (None, None)
    layer = SymmetricLayer(codes, k_scale, k_zero, codes, v_scale, v_zero)
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
    k_buf = insert_chunk(
      decode(stored.k_codes, stored.k_scale, stored.k_zero, bits), k, self.length
    )
    v_buf = insert_chunk(
      decode(stored.v_codes, stored.v_scale, stored.v_zero, bits), v, self.length
    )
    out = ops.attention(q.astype(jnp.float32), k_buf, v_buf, q_slots, self.start, kernels)

    def write(codes_buf, scale_buf, zero_buf, x):
      groups = scale_buf.shape[-1]
      codes, scale, zero = encode(x.transpose(0, 2, 1, 3), self.spec, groups)
      at = (0, 0, self.length, 0)
      put = jax.lax.dynamic_update_slice
      zero_buf = None if zero is None else put(zero_buf, zero, at)
      return put(codes_buf, codes, at), put(scale_buf, scale, at), zero_buf

    new = SymmetricLayer(
      *write(stored.k_codes, stored.k_scale, stored.k_zero, k),
      *write(stored.v_codes, stored.v_scale, stored.v_zero, v),
    )
    return out.astype(v.dtype), new

  def advance(self, layer_states, num_tokens: int) -> "SymmetricKVCache":
    return self.replace(layers=tuple(layer_states), length=self.length + num_tokens)

  def memory(self) -> dict:
    """Exact bytes: per token and KV head, for K and V each: D*bits/8 code bytes
    + one scale (and one zero point with `zero_point`) per channel group."""
    c, spec = self.config, self.spec
    scale_bytes = jnp.dtype(spec.scale_dtype).itemsize * (2 if spec.zero_point else 1)
    groups = spec.key_groups + spec.channel_groups
    per_head = 2 * c.head_dim * spec.bits // 8 + groups * scale_bytes
    bf16 = bf16_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim)
    total = tree_bytes((self.layers, self.key_scale))
    return memory_report(bf16, c.num_layers * c.num_kv_heads * per_head, 0, total)
