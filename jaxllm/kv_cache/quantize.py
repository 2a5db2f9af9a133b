"""The caches' quantize-dequantize helpers, built on `jaxllm.quant.numerics` (codes,
range search, packing in the `pallas_kernels.quantized_kv_attention` layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.quant.numerics import FP8_E4M3_MAX, dequantize_asymmetric, quantize_asymmetric


def fake_quantize_asymmetric(x, bits, axis, valid=None, scale_dtype=jnp.float32, least_error=False):
  """Quantize-dequantize (float32) with `quantize_asymmetric`'s rounding."""
  return dequantize_asymmetric(*quantize_asymmetric(x, bits, axis, scale_dtype, valid, least_error))


def fp8_quantize_dequantize(x: jax.Array, axis: int = -1) -> jax.Array:
  """FP8 e4m3 with one float32 scale per slice along `axis` (amax -> the e4m3 maximum);
  returns float32."""
  x = x.astype(jnp.float32)
  amax = jnp.abs(x).max(axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / FP8_E4M3_MAX, 1.0)
  return (x / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
