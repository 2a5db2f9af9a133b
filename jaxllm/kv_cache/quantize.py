"""Quantizers and bit packing shared by the compressed caches.

Scales and zero points are rounded to their storage dtype *before* the codes are
computed, so stored codes and stored scales are consistent. Packing follows
`pallas_kernels.quantized_kv_attention` (``pf = 8 // bits`` codes per uint8):
packing along an axis of size n splits it into (pf, n / pf) and puts slice j at
bits [j*bits, (j+1)*bits). Along channels (values) lane c, slot j holds channel
``j * D/pf + c``; along the tokens of one key group, row r, slot j holds token
``j * G/pf + r``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def pack_along(codes: jax.Array, bits: int, axis: int) -> jax.Array:
  """Packs uint8 codes < 2**bits along `axis` (size n, a multiple of pf) to n / pf."""
  pf = 8 // bits
  if pf == 1:
    return codes.astype(jnp.uint8)
  axis = axis % codes.ndim
  n = codes.shape[axis]
  split = codes.reshape(*codes.shape[:axis], pf, n // pf, *codes.shape[axis + 1 :])
  out = jnp.zeros(split.shape[:axis] + split.shape[axis + 1 :], jnp.uint8)
  for j in range(pf):
    out = out | (jnp.take(split, j, axis=axis).astype(jnp.uint8) << (bits * j)).astype(jnp.uint8)
  return out


def unpack_along(packed: jax.Array, bits: int, axis: int) -> jax.Array:
  """Inverse of `pack_along`: int32 codes, `axis` grows by pf."""
  pf = 8 // bits
  x = packed.astype(jnp.int32)
  if pf == 1:
    return x
  axis = axis % packed.ndim
  parts = [(x >> (bits * j)) & ((1 << bits) - 1) for j in range(pf)]
  out = jnp.stack(parts, axis=axis)
  return out.reshape(*packed.shape[:axis], -1, *packed.shape[axis + 1 :])


# Candidate shrink factors of a slice's range (each end moved toward the middle on its
# own) for `quantize_asymmetric(..., least_error=True)`.
RANGE_SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def quantize_asymmetric(x: jax.Array, bits: int, axis, scale_dtype, valid=None, least_error=False):
  """Asymmetric quantization, ``x ~= code * scale + zero``, reduced over `axis`.

  Args:
    x: float array.
    bits: code width; codes lie in [0, 2**bits - 1].
    axis: axis (or axes) the statistics are taken over.
    scale_dtype: storage dtype of scale and zero.
    valid: optional bool mask broadcastable to x; masked-out entries do not
      enter the statistics (their codes are still clipped into range).
    least_error: False: the grid spans the slice's min..max. True: each end of
      that range may shrink toward its middle by a factor of `RANGE_SHRINK`,
      independently; the pair with the least squared rounding error (over the
      valid entries, outliers clipped) wins. min/max is a candidate, so the
      error does not grow (up to rounding scale and zero to `scale_dtype`).

  Returns:
    (codes uint8 like x, scale, zero) with scale/zero shaped like x reduced
    over `axis` with keepdims, in `scale_dtype`.
  """
  x = x.astype(jnp.float32)
  if valid is None:
    lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
  else:
    lo = jnp.where(valid, x, jnp.inf).min(axis, keepdims=True)
    hi = jnp.where(valid, x, -jnp.inf).max(axis, keepdims=True)
    lo, hi = jnp.where(hi >= lo, lo, 0.0), jnp.where(hi >= lo, hi, 0.0)
  qmax = float(2**bits - 1)
  if least_error:
    lo, hi = least_error_range(x, lo, hi, qmax, axis, valid)
  zero = lo.astype(scale_dtype)
  scale = (hi - zero.astype(jnp.float32)) / qmax
  scale = jnp.where(scale > 0, scale, 1.0).astype(scale_dtype)
  codes = jnp.round((x - zero.astype(jnp.float32)) / scale.astype(jnp.float32))
  return jnp.clip(codes, 0, qmax).astype(jnp.uint8), scale, zero


def least_error_range(x, lo, hi, qmax: float, axis, valid=None, shrink=RANGE_SHRINK):
  """The asymmetric grid range of least squared rounding error of `x` over `axis`.

  Each end of lo..hi (shaped like x reduced over `axis` with keepdims) moves toward
  the middle by a factor of `shrink`, independently; of the pairs, the one whose
  grid of ``qmax + 1`` levels rounds the (`valid`) entries of x with the least
  squared error wins, the first in order on ties. Returns (lo, hi).
  """
  mid = (lo + hi) / 2
  best = (jnp.full_like(lo, jnp.inf), lo, hi)
  for r_lo in shrink:
    for r_hi in shrink:
      c_lo, c_hi = mid + r_lo * (lo - mid), mid + r_hi * (hi - mid)
      step = jnp.maximum((c_hi - c_lo) / qmax, 1e-30)
      err = (jnp.clip(jnp.round((x - c_lo) / step), 0, qmax) * step + c_lo - x) ** 2
      if valid is not None:
        err = jnp.where(valid, err, 0.0)
      err = err.sum(axis, keepdims=True)
      better = err < best[0]
      best = tuple(jnp.where(better, new, old) for new, old in zip((err, c_lo, c_hi), best))
  return best[1], best[2]


def gptq_codes(x, scale, zero, code_range: tuple[int, int], u) -> jax.Array:
  """Codes of x [..., D] on a fixed grid (``x ~= code * scale + zero``), rounded by GPTQ.

  The channels are rounded in order 0..D-1; each one's rounding error is pushed
  onto the channels after it through `u`, so that the error ``e`` of the whole
  row leaves ``e^T H e`` least for the Hessian H of which ``u`` is the upper
  Cholesky factor of the (damped) inverse: ``H^-1 = u^T u``. With ``u = I`` this
  is round-to-nearest.

  Args:
    x: float [..., D].
    scale, zero: float, broadcastable to x (per channel: a group's value repeated).
    code_range: (lowest, highest) code.
    u: [..., D, D] upper triangular, broadcastable against x with a trailing D.

  Returns:
    int32 codes like x.
  """
  x = x.astype(jnp.float32)
  scale = jnp.broadcast_to(scale, x.shape).astype(jnp.float32)
  zero = jnp.broadcast_to(zero, x.shape).astype(jnp.float32)
  lo, hi = code_range
  take = jax.lax.dynamic_index_in_dim

  def step(j, carry):
    w, codes = carry
    w_j, s_j, z_j = (take(a, j, -1, keepdims=False) for a in (w, scale, zero))
    c_j = jnp.clip(jnp.round((w_j - z_j) / s_j), lo, hi)
    row = take(u, j, -2, keepdims=False)  # [..., D], zero before channel j
    err = (w_j - (c_j * s_j + z_j)) / take(row, j, -1, keepdims=False)
    w = w - err[..., None] * row
    return w, jax.lax.dynamic_update_index_in_dim(codes, c_j.astype(jnp.int32), j, -1)

  init = (x, jnp.zeros(x.shape, jnp.int32))
  return jax.lax.fori_loop(0, x.shape[-1], step, init)[1]


def quantize_symmetric(x: jax.Array, bits: int, axis: int, scale_dtype):
  """Symmetric quantization ``x ~= code * scale``, codes in [-(2**(bits-1) - 1), 2**(bits-1) - 1].

  Returns (int32 codes like x, scale reduced over `axis` with keepdims, in scale_dtype).
  """
  x = x.astype(jnp.float32)
  qmax = float(2 ** (bits - 1) - 1)
  amax = jnp.abs(x).max(axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(scale_dtype)
  codes = jnp.clip(jnp.round(x / scale.astype(jnp.float32)), -qmax, qmax)
  return codes.astype(jnp.int32), scale


def fake_quantize_asymmetric(x, bits, axis, valid=None, scale_dtype=jnp.float32, least_error=False):
  """Quantize-dequantize (float32) with `quantize_asymmetric`'s rounding."""
  codes, scale, zero = quantize_asymmetric(x, bits, axis, scale_dtype, valid, least_error)
  return codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)


def fp8_quantize_dequantize(x: jax.Array, axis: int = -1) -> jax.Array:
  """FP8 e4m3 with one float32 scale per slice along `axis` (amax -> 448); returns float32."""
  x = x.astype(jnp.float32)
  amax = jnp.abs(x).max(axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
  return (x / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
