"""Shared quantization numerics (`jaxllm.quant.numerics`) against numpy references."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxllm.quant.numerics import (
  FP8_E4M3_MAX,
  RANGE_SHRINK,
  dequantize_asymmetric,
  inverse_hessian_factor,
  pack_along,
  quantize_asymmetric,
  quantize_symmetric,
  round_up_fp8,
  unpack_along,
)
from pallas_kernels.quantized_kv_attention import dequantize_keys, dequantize_values

# ------------------------------------------------------------------------- packing


def _numpy_pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """Element j * (n / pf) + r of `axis` in bits [j * bits, (j + 1) * bits) of entry r."""
  pf = 8 // bits
  codes = np.moveaxis(codes.astype(np.uint32), axis, -1)
  n = codes.shape[-1] // pf
  out = np.zeros(codes.shape[:-1] + (n,), np.uint32)
  for j in range(pf):
    out |= codes[..., j * n : (j + 1) * n] << (bits * j)
  return np.moveaxis(out.astype(np.uint8), -1, axis)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, -1])
def test_pack_along_layout_and_round_trip(bits, axis):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, size=(8, 16, 32), dtype=np.uint8)
  packed = pack_along(jnp.asarray(codes), bits, axis)
  assert packed.dtype == jnp.uint8
  np.testing.assert_array_equal(packed, _numpy_pack(codes, bits, axis))
  back = unpack_along(packed, bits, axis)
  assert back.dtype == jnp.int32
  np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cache_side_codes_read_back_by_the_kernel_package(bits):
  """Codes quantized and packed the way the KIVI cache stores them (keys per channel
  over groups of 32 tokens, packed along tokens; values per token, packed along
  channels) dequantize through the kernel package's readers to `dequantize_asymmetric`
  of the same codes."""
  rng = np.random.default_rng(10 + bits)
  k = jnp.asarray(rng.standard_normal((2, 3, 64, 16)) * 3, jnp.float32)
  grouped = k.reshape(2, 3, 2, 32, 16)
  codes, scale, zero = quantize_asymmetric(grouped, bits, -2, jnp.float32)
  packed = pack_along(codes, bits, -2).reshape(2, 3, -1, 16)
  got = dequantize_keys(packed, scale[..., 0, :], zero[..., 0, :], bits, 32)
  want = dequantize_asymmetric(codes, scale, zero).reshape(k.shape)
  np.testing.assert_array_equal(got, want)
  codes, scale, zero = quantize_asymmetric(k, bits, -1, jnp.float32)
  got = dequantize_values(pack_along(codes, bits, -1), scale[..., 0], zero[..., 0], bits)
  np.testing.assert_array_equal(got, dequantize_asymmetric(codes, scale, zero))


def test_pack_along_refuses_bad_bits_and_sizes():
  codes = jnp.zeros((4, 6), jnp.uint8)
  with pytest.raises(ValueError, match="bits must be one of"):
    pack_along(codes, 3, -1)
  with pytest.raises(ValueError, match="size 6 is not a multiple of 4"):
    pack_along(codes, 2, -1)


# -------------------------------------------------------------- integer grids


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
def test_asymmetric_codes_lie_on_the_stored_grid(scale_dtype):
  """Scale and zero are rounded to their dtype first; the codes are the nearest on
  that stored grid, so the reconstruction error stays within half a stored step."""
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((6, 5, 40)) * 2 + 0.3).astype(np.float32)
  x[0, 0] = 1.5  # a constant slice: scale 1, every code 0
  codes, scale, zero = quantize_asymmetric(jnp.asarray(x), 4, -1, scale_dtype)
  assert codes.dtype == jnp.uint8 and scale.dtype == scale_dtype and zero.dtype == scale_dtype
  s, z = np.asarray(scale, np.float32), np.asarray(zero, np.float32)
  want = np.clip(np.round((x - z) / s), 0, 15)
  np.testing.assert_array_equal(codes, want)
  err = np.abs(np.asarray(dequantize_asymmetric(codes, scale, zero)) - x)
  top = z + 15 * s  # the stored grid's top may fall a rounding below the slice's max
  assert (err[x <= top] <= s.repeat(40, -1)[x <= top] / 2 * (1 + 1e-6)).all()
  assert float(scale[0, 0, 0]) == 1.0 and not np.asarray(codes[0, 0]).any()


def test_symmetric_codes():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((7, 33)).astype(np.float32)
  x[3] = 0.0
  codes, scale = quantize_symmetric(jnp.asarray(x), 8, -1, jnp.float32)
  amax = np.abs(x).max(-1, keepdims=True)
  np.testing.assert_allclose(scale, np.where(amax > 0, amax / 127, 1.0), rtol=1e-7)
  np.testing.assert_array_equal(codes, np.clip(np.round(x / np.asarray(scale)), -127, 127))
  assert np.abs(np.asarray(codes)).max() == 127 and not np.asarray(codes[3]).any()
  codes, scale = quantize_symmetric(jnp.asarray(x), 4, -1, jnp.float32)
  assert np.abs(np.asarray(codes)).max() == 7


def _numpy_best_range_error(row: np.ndarray, bits: int) -> float:
  """Least squared rounding error of one slice over the shrunk (lo, hi) candidates, by loops."""
  qmax = 2**bits - 1
  lo, hi = row.min(), row.max()
  mid = (lo + hi) / 2
  best = np.inf
  for r_lo in RANGE_SHRINK:
    for r_hi in RANGE_SHRINK:
      c_lo, c_hi = mid + r_lo * (lo - mid), mid + r_hi * (hi - mid)
      step = (c_hi - c_lo) / qmax
      deq = np.clip(np.round((row - c_lo) / step), 0, qmax) * step + c_lo
      best = min(best, float(((deq - row) ** 2).sum()))
  return best


@pytest.mark.parametrize("bits", [2, 4])
def test_range_search_picks_the_least_error_range(bits):
  """Per slice, the searched range's error equals a loop over the candidates, is never
  above min/max's, and at 2 bits on heavy-tailed data is well below it."""
  rng = np.random.default_rng(bits)
  x = rng.standard_t(4, size=(48, 64)).astype(np.float32)
  plain = np.asarray(dequantize_asymmetric(*quantize_asymmetric(jnp.asarray(x), bits, -1, "f4")))
  searched = quantize_asymmetric(jnp.asarray(x), bits, -1, jnp.float32, least_error=True)
  searched = np.asarray(dequantize_asymmetric(*searched))
  err_plain = ((plain - x) ** 2).sum(-1)
  err_searched = ((searched - x) ** 2).sum(-1)
  want = np.array([_numpy_best_range_error(row, bits) for row in x])
  np.testing.assert_allclose(err_searched, want, rtol=1e-4)
  assert (err_searched <= err_plain * (1 + 1e-5)).all()
  if bits == 2:
    assert err_searched.sum() < 0.7 * err_plain.sum()


def test_range_search_ignores_invalid_entries():
  """Entries outside `valid` move neither the searched scale nor the zero."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 32, 16)).astype(np.float32)
  valid = np.arange(32)[None, :, None] >= 5
  y = np.where(valid, x, 100.0).astype(np.float32)
  a = quantize_asymmetric(jnp.asarray(x), 2, -2, jnp.float32, jnp.asarray(valid), True)
  b = quantize_asymmetric(jnp.asarray(y), 2, -2, jnp.float32, jnp.asarray(valid), True)
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(a[2], b[2])
  np.testing.assert_array_equal(np.where(valid, a[0], 0), np.where(valid, b[0], 0))


# --------------------------------------------------------------------------- GPTQ


def test_inverse_hessian_factor_against_numpy():
  """U is upper triangular with U^T U = (H + lambda I)^-1 (H zero-padded, then permuted)."""
  rng = np.random.default_rng(3)
  a = rng.standard_normal((64, 12))
  h = a.T @ a
  k_padded, order = 16, rng.permutation(16)
  lam = 0.05 * np.mean(np.diag(h))
  padded = np.zeros((16, 16))
  padded[:12, :12] = h
  damped = (padded + lam * np.eye(16))[order][:, order]
  u = np.asarray(inverse_hessian_factor(jnp.asarray(h, jnp.float32), k_padded, 0.05, order))
  np.testing.assert_array_equal(u, np.triu(u))
  np.testing.assert_allclose(u.T @ u, np.linalg.inv(damped), rtol=2e-3, atol=2e-6)
  # an all-zero Hessian damps with 1: U = I, plain round-to-nearest
  eye = inverse_hessian_factor(jnp.zeros((8, 8)), 8)
  np.testing.assert_allclose(eye, np.eye(8), atol=1e-6)


# ---------------------------------------------------------------------------- FP8


def test_round_up_fp8_is_the_next_representable_value():
  grid = np.unique(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
  grid = grid[np.isfinite(grid) & (grid > 0)]
  assert FP8_E4M3_MAX == grid.max() == 448.0
  x = np.concatenate([grid, grid[:-1] * 1.01, np.geomspace(1e-4, FP8_E4M3_MAX, 200)])
  x = x.astype(np.float32)
  got = np.asarray(round_up_fp8(jnp.asarray(x)).astype(jnp.float32))
  want = grid[np.searchsorted(grid, x, side="left")]
  np.testing.assert_array_equal(got, want)
