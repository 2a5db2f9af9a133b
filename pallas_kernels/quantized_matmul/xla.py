"""Fused-jnp implementations of the quantized matmul ops (dequantize, or integer dot).

Same arguments and results as the kernels. XLA:CPU does not fuse a dequantization
into the dot: it materializes the float weight. W8A8 quantizes the activations to
int8 per token and FireQ to FP8 e4m3 per token, as the kernels do. These paths are
differentiable: FireQ's FP8 rounding of the activations passes gradients straight
through (as in quantization-aware training), which block reconstruction uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .w4a8_fireq import dequantize_w4_fireq, quantize_activations_fp8
from .w4a16 import dequantize_w4a16
from .w8a8 import quantize_activations_int8


def w8a8_matmul_xla(x, w_q, w_scale, *, out_dtype=None):
  x_q, x_scale = quantize_activations_int8(x)
  acc = jnp.dot(x_q, w_q, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * x_scale * w_scale).astype(out_dtype or x.dtype)


def w4a16_matmul_xla(x, w_q, scales, mins, *, out_dtype=None):
  w = dequantize_w4a16(w_q, scales, mins).astype(x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


@jax.custom_jvp
def _fp8_activations(x):
  """x [M, K] -> (FP8 e4m3 values as f32, per-token f32 scale [M, 1])."""
  x_fp8, x_scale = quantize_activations_fp8(x)
  return x_fp8.astype(jnp.float32), x_scale


@_fp8_activations.defjvp
def _fp8_activations_jvp(primals, tangents):
  """Straight through: the values move as x / scale, the scale is held fixed."""
  values, scale = _fp8_activations(*primals)
  return (values, scale), (tangents[0].astype(jnp.float32) / scale, jnp.zeros_like(scale))


def fake_quantize_activations_fp8(x):
  """x [M, K] rounded to FP8 e4m3 with a per-token scale, back in float32; the
  gradient passes straight through (as in quantization-aware training)."""
  values, scale = _fp8_activations(x)
  return values * scale


def w4a8_fireq_matmul_xla(x, w_q, w_scale, tensor_scale, *, out_dtype=None):
  x_values, x_scale = _fp8_activations(x)
  acc = jnp.dot(x_values, dequantize_w4_fireq(w_q, w_scale, tensor_scale))
  return (acc * x_scale).astype(out_dtype or x.dtype)
