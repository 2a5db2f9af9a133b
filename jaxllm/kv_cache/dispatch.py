"""The ``quantized_kv_attention`` op: decode attention over a KIVI-packed cache.

Arguments (all implementations): ``(q [B, Hq, D], kv: QuantizedKV [B, Hkv, ...],
start, quantized_length, length, k_residual [B, Hkv, R, D], v_residual, *,
bits, group_size)`` -> [B, Hq, D]; see
`pallas_kernels.quantized_kv_attention.quantized_kv_attention_reference`.

* ``"pallas"``: the TPU-style kernel on TPU (and on CPU, where it runs with
  ``interpret=True``); the portable kernel on GPU. The portable kernel needs
  power-of-2 ``group_size / pf >= 16`` (Triton dot tiles), so 2-bit keys with
  G=32 (8 rows per bit slot) run the ``"xla"`` implementation on GPU instead.
* ``"xla"``: dequantization fused into the score and value products: per key
  group, ``q · (code * scale + zero) = (q * scale) · code + q · zero``, and
  value scales/zeros folded into the probabilities; the float K/V are never
  materialized.
* ``"reference"``: the kernel package's jnp reference (dequantize, then attend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.kv_cache.quantize import unpack_along
from pallas_kernels.quantized_kv_attention import (
  QuantizedKV,
  quantized_kv_attention_reference,
  quantized_kv_decode_attention,
  quantized_kv_decode_attention_portable,
)
from pallas_kernels.quantized_kv_attention.reference import MASK_VALUE, as_rows, slot_valid

QUANTIZED_KV_ATTENTION = "quantized_kv_attention"


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def portable_kernel_supports(head_dim: int, residual: int, bits: int, group_size: int) -> bool:
  """Whether the portable (Triton) kernel's tile constraints hold for this cache."""
  pf = 8 // bits
  rows = group_size // pf
  return (
    rows >= 16
    and _pow2(rows)
    and _pow2(head_dim)
    and _pow2(head_dim // pf)
    and (residual == 0 or _pow2(residual))
  )


@ops.register(QUANTIZED_KV_ATTENTION, "pallas")
def _pallas(
  q,
  kv,
  start,
  quantized_length,
  length=None,
  k_residual=None,
  v_residual=None,
  *,
  bits,
  group_size,
  interpret=False,
):
  args = (q, kv, start, quantized_length, length, k_residual, v_residual)
  if jax.default_backend() in ("gpu", "cuda", "rocm"):
    residual = 0 if k_residual is None else k_residual.shape[2]
    if portable_kernel_supports(q.shape[-1], residual, bits, group_size):
      return quantized_kv_decode_attention_portable(
        *args, bits=bits, group_size=group_size, interpret=interpret
      )
    return _xla(*args, bits=bits, group_size=group_size)
  return quantized_kv_decode_attention(*args, bits=bits, group_size=group_size, interpret=interpret)


@ops.register(QUANTIZED_KV_ATTENTION, "reference")
def _reference(
  q, kv, start, quantized_length, length=None, k_residual=None, v_residual=None, *, bits, group_size
):
  return quantized_kv_attention_reference(
    q, kv, start, quantized_length, length, k_residual, v_residual, bits=bits, group_size=group_size
  )


@ops.register(QUANTIZED_KV_ATTENTION, "xla")
def _xla(
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
