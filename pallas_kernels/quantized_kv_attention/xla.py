"""Fused-jnp decode attention over a KIVI-packed cache; the float K/V are never built.

Per key group, ``q . (code * scale + zero) = (q * scale) . code + q . zero``, and
the value scales and zeros are folded into the probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .packing import QuantizedKV, unpack_along
from .reference import MASK_VALUE, as_rows, slot_valid


def quantized_kv_attention_xla(
  q: jax.Array,
  kv: QuantizedKV,
  start,
  quantized_length,
  length=None,
  k_residual=None,
  v_residual=None,
  *,
  bits: int,
  group_size: int,
) -> jax.Array:
  """Fused dequantize + attention; returns [B, Hq, D] in q's dtype."""
  b, hq, d = q.shape
  hkv = kv.k_packed.shape[1]
  pf = 8 // bits
  t = kv.k_packed.shape[2] * pf
  ng = t // group_size
  start = as_rows(start, b, "start")
  qlen = as_rows(quantized_length, b, "quantized_length")
  length = qlen if length is None else as_rows(length, b, "length")
  qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d) * d**-0.5
  # keys: codes [B, Hkv, ng, G, D] in token order within each group
  k_codes = unpack_along(kv.k_packed.reshape(b, hkv, ng, group_size // pf, d), bits, -2)
  k_scale = kv.k_scale.astype(jnp.float32)  # [B, Hkv, ng, D]
  k_zero = kv.k_zero.astype(jnp.float32)
  scaled_q = qg[:, :, :, None, :] * k_scale[:, :, None]  # [B, Hkv, G', ng, D]
  scores = jnp.einsum("bhqnd,bhntd->bhqnt", scaled_q, k_codes.astype(jnp.float32))
  scores = scores + jnp.einsum("bhqd,bhnd->bhqn", qg, k_zero)[..., None]
  scores = scores.reshape(b, hkv, hq // hkv, t)
  r = 0
  if k_residual is not None:
    r = k_residual.shape[2]
    res_scores = jnp.einsum("bhqd,bhrd->bhqr", qg, k_residual.astype(jnp.float32))
    scores = jnp.concatenate([scores, res_scores], axis=-1)
  valid = slot_valid(start, qlen, length, t, r)[:, None, None, :]
  scores = jnp.where(valid, scores, MASK_VALUE)
  probs = jnp.where(valid, jnp.exp(scores - scores.max(-1, keepdims=True)), 0.0)
  denom = probs.sum(-1, keepdims=True)
  probs = probs / jnp.where(denom > 0, denom, 1.0)
  p_q, p_r = probs[..., :t], probs[..., t:]
  v_codes = unpack_along(kv.v_packed, bits, -1).astype(jnp.float32)  # [B, Hkv, T, D]
  out = jnp.einsum("bhqt,bhtd->bhqd", p_q * kv.v_scale.astype(jnp.float32)[:, :, None], v_codes)
  out = out + (p_q * kv.v_zero.astype(jnp.float32)[:, :, None]).sum(-1, keepdims=True)
  if r:
    out = out + jnp.einsum("bhqr,bhrd->bhqd", p_r, v_residual.astype(jnp.float32))
  return out.reshape(b, hq, d).astype(q.dtype)
