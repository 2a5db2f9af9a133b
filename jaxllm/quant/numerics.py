"""Quantization numerics shared by the KV caches and the weight formats.

Integer codes on a grid (asymmetric ``x ~= code * scale + zero``, symmetric
``x ~= code * scale``), the search for the range of least rounding error, GPTQ's
inverse-Hessian factor and its rounding of a row on a fixed grid, FP8 e4m3 rounding,
and the bit packing of codes (the `pallas_kernels.quantized_kv_attention` layout,
which the kernels read). Scales and zero points are rounded to their storage dtype
*before* the codes are computed, so stored codes and stored scales agree.

This module depends only on jax and `pallas_kernels`, so both `jaxllm.kv_cache`
and `jaxllm.quant` build on it without importing each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_kv_attention.packing import pack_along, unpack_along
from pallas_kernels.quantized_matmul.common import FP8_E4M3_MAX

# Candidate shrink factors of a slice's range (each end moved toward the middle on its
# own) for `quantize_asymmetric(..., least_error=True)`.
RANGE_SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)

__all__ = [
  "FP8_E4M3_MAX",
  "RANGE_SHRINK",
  "dequantize_asymmetric",
  "gptq_codes",
  "inverse_hessian_factor",
  "least_error_range",
  "pack_along",
  "quantize_asymmetric",
  "quantize_symmetric",
  "round_up_fp8",
  "unpack_along",
]


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


def dequantize_asymmetric(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """``code * scale + zero`` in float32 (scale and zero broadcast against codes)."""
  return codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)


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


def inverse_hessian_factor(
  hessian: jax.Array, k_padded: int, damp: float = 0.01, order=None
) -> jax.Array:
  """Upper Cholesky factor U of ``(H + lambda I)^-1`` [K', K'], H zero-padded to K' rows
  (and, given `order` [K'], its rows and columns taken in that order);
  ``lambda = damp * mean(diag H)`` (1 for an all-zero H: plain round-to-nearest)."""
  k = hessian.shape[0]
  h = jnp.asarray(hessian, jnp.float32)
  lam = damp * jnp.mean(jnp.diag(h))
  lam = jnp.where(lam > 0, lam, 1.0)
  h = jnp.pad(h, ((0, k_padded - k), (0, k_padded - k)))
  h = h + lam * jnp.eye(k_padded, dtype=jnp.float32)
  if order is not None:
    h = h[order][:, order]
  lower = jnp.linalg.cholesky(h)
  eye = jnp.eye(k_padded, dtype=jnp.float32)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
  return jnp.linalg.cholesky(h_inv).T


def gptq_codes(x, scale, zero, code_range: tuple[int, int], u) -> jax.Array:
  """Codes of x [..., D] on a fixed grid (``x ~= code * scale + zero``), rounded by GPTQ.

  The channels are rounded in order 0..D-1; each one's rounding error is pushed
  onto the channels after it through `u`, so that the error ``e`` of the whole
  row leaves ``e^T H e`` least for the Hessian H of which ``u`` is the upper
  Cholesky factor of the (damped) inverse: ``H^-1 = u^T u`` (`inverse_hessian_factor`).
  With ``u = I`` this is round-to-nearest.

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


def round_up_fp8(x: jax.Array) -> jax.Array:
  """Smallest float8_e4m3fn value >= x, for 0 < x <= `FP8_E4M3_MAX` (x below 2^-9
  gives 2^-9).

  (Above the maximum the next bit pattern is e4m3fn's NaN, hence the bound.)
  """
  near = x.astype(jnp.float8_e4m3fn)
  bits = jax.lax.bitcast_convert_type(near, jnp.uint8)
  up = jax.lax.bitcast_convert_type(bits + jnp.uint8(1), jnp.float8_e4m3fn)
  return jnp.where(near.astype(jnp.float32) < x, up, near)
