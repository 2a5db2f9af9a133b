"""Pure-jnp reference: dequantize the cache, then masked softmax attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .packing import QuantizedKV, dequantize_kv

MASK_VALUE = -1e30


def as_rows(x, batch: int, name: str) -> jax.Array:
  """Broadcasts an int scalar or ``(B,)`` vector to int32 ``(B,)``."""
  x = jnp.asarray(x)
  if x.ndim == 0:
    x = jnp.broadcast_to(x, (batch,))
  if x.shape != (batch,):
    raise ValueError(f"{name} must be a scalar or shape ({batch},), got {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer, got dtype {x.dtype}")
  return x.astype(jnp.int32)


def dense_decode_attention(q, k, v, valid, sm_scale=None) -> jax.Array:
  """Float GQA decode attention over ``k``/``v`` ``(B, Hkv, S, D)`` with ``valid`` ``(B, S)``.

  Rows with no valid slot return zeros.
  """
  b, hq, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  sm_scale = d**-0.5 if sm_scale is None else sm_scale
  qg = q.astype(jnp.float32).reshape(b, hkv, g, d)
  s = jnp.einsum("bhgd,bhsd->bhgs", qg, k.astype(jnp.float32)) * sm_scale
  mask = valid[:, None, None, :]
  s = jnp.where(mask, s, MASK_VALUE)
  p = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhgs,bhsd->bhgd", p, v.astype(jnp.float32))
  return out.reshape(b, hq, d)


def slot_valid(start, quantized_length, length, t: int, r: int) -> jax.Array:
  """``(B, T + R)`` mask: quantized slot ``t`` and residual slot ``r`` at
  position ``quantized_length + r`` are valid when ``start <= pos < length``."""
  pos_q = jnp.arange(t)[None, :]
  pos_r = quantized_length[:, None] + jnp.arange(r)[None, :]
  lo = start[:, None]
  valid_q = (pos_q >= lo) & (pos_q < quantized_length[:, None])
  valid_r = (pos_r >= lo) & (pos_r < length[:, None])
  return jnp.concatenate([valid_q, valid_r], axis=1)


def quantized_kv_attention_reference(
  q: jax.Array,
  kv: QuantizedKV,
  start,
  quantized_length,
  length=None,
  k_residual: jax.Array | None = None,
  v_residual: jax.Array | None = None,
  *,
  bits: int,
  group_size: int,
  sm_scale: float | None = None,
) -> jax.Array:
  """Reference for ``quantized_kv_decode_attention`` (same arguments).

  Args:
    q: ``(B, Hq, D)`` query of the one decode token.
    kv: ``QuantizedKV`` with leading dims ``(B, Hkv)``.
    start: first valid slot per row (left padding); scalar or ``(B,)``.
    quantized_length: slots written to the quantized part; scalar or ``(B,)``.
    length: total positions (quantized + residual); defaults to
      ``quantized_length`` (no residual tokens).
    k_residual: optional float ``(B, Hkv, R, D)`` window; slot ``r`` holds
      position ``quantized_length + r``.
    v_residual: like ``k_residual``.
    bits: 2, 4 or 8.
    group_size: key quant group.
    sm_scale: softmax scale, default ``D ** -0.5``.

  Returns:
    float32 ``(B, Hq, D)``.
  """
  b = q.shape[0]
  start = as_rows(start, b, "start")
  qlen = as_rows(quantized_length, b, "quantized_length")
  length = qlen if length is None else as_rows(length, b, "length")
  k, v = dequantize_kv(kv, bits, group_size)
  r = 0
  if k_residual is not None:
    r = k_residual.shape[2]
    k = jnp.concatenate([k, k_residual.astype(jnp.float32)], axis=2)
    v = jnp.concatenate([v, v_residual.astype(jnp.float32)], axis=2)
  valid = slot_valid(start, qlen, length, k.shape[2] - r, r)
  return dense_decode_attention(q, k, v, valid, sm_scale)
