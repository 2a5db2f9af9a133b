"""Implementations of the ``quantized_linear`` op: rows [M, K] @ QTensor -> [M, N].

* ``xla``: dequantize and dot. XLA:CPU does not fuse the dequantization into the
  dot: it materializes the float weight, so on CPU a quantized matrix-vector
  product is slower than a float32 one (576x1536 at M = 1: w4a16 0.45 ms against
  0.13 ms; a fused multiply-reduce was slower still). W8A8 quantizes activations to
  int8 per token first and FireQ to FP8 e4m3 per token, as their kernels do.
* ``pallas``: the `pallas_kernels.quantized_matmul` kernels.
* ``reference``: the kernels' own jnp references.

A QTensor whose K was zero-padded (``k_pad``) gets zero-padded activations.
The ``xla`` path is differentiable: FireQ's FP8 rounding of the activations
passes gradients straight through (as in quantization-aware training), which
block reconstruction relies on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm import ops
from pallas_kernels import quantized_matmul as qmm

_ACTIVATION_DTYPES = ("float32", "bfloat16")


def _pad_k(x, w):
  """Checks the activations and zero-pads their K to the QTensor's padded K."""
  if jnp.dtype(x.dtype).name not in _ACTIVATION_DTYPES:
    raise ValueError(
      f"quantized_linear ({w.method}): activations have dtype {jnp.dtype(x.dtype).name}; "
      f"expected one of {', '.join(_ACTIVATION_DTYPES)}"
    )
  return jnp.pad(x, ((0, 0), (0, w.k_pad))) if w.k_pad else x


def _fireq_scales(w):
  """FireQ scales as the kernel takes them: f32 [K/g, N] (exact for FP8-stored scales)."""
  return w.scales.astype(jnp.float32)


@jax.custom_jvp
def _fp8_activations(x):
  """x [M, K] -> (FP8 e4m3 values as f32, per-token f32 scale [M, 1]), as the kernel takes them."""
  x_fp8, x_scale = qmm.quantize_activations_fp8(x)
  return x_fp8.astype(jnp.float32), x_scale


@_fp8_activations.defjvp
def _fp8_activations_jvp(primals, tangents):
  """Straight through: the values move as x / scale, the scale is held fixed."""
  values, scale = _fp8_activations(*primals)
  return (values, scale), (tangents[0].astype(jnp.float32) / scale, jnp.zeros_like(scale))


@ops.register("quantized_linear", "xla")
def _xla(x, w):
  x = _pad_k(x, w)
  if w.method == "w8a8":
    x_q, x_scale = qmm.quantize_activations_int8(x)
    acc = jnp.dot(x_q, w.values, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale * w.scales).astype(x.dtype)
  if w.method == "fireq_w4a8":
    x_values, x_scale = _fp8_activations(x)
    acc = jnp.dot(x_values, w.dequantize_padded(jnp.float32))
    return (acc * x_scale).astype(x.dtype)
  wf = w.dequantize_padded(x.dtype)  # [K', N]
  return jnp.dot(x, wf, preferred_element_type=jnp.float32).astype(x.dtype)


@ops.register("quantized_linear", "pallas")
def _pallas(x, w, *, interpret=False):
  x = _pad_k(x, w)
  if w.method == "w8a8":
    return qmm.w8a8_matmul(x, w.values, w.scales, interpret=interpret)
  if w.method == "fireq_w4a8":
    return qmm.w4a8_fireq_matmul(x, w.values, _fireq_scales(w), w.tensor_scale, interpret=interpret)
  return qmm.w4a16_matmul(x, w.values, w.scales, w.offsets, interpret=interpret)


@ops.register("quantized_linear", "reference")
def _reference(x, w):
  x = _pad_k(x, w)
  if w.method == "w8a8":
    return qmm.w8a8_matmul_reference(x, w.values, w.scales)
  if w.method == "fireq_w4a8":
    return qmm.w4a8_fireq_matmul_reference(x, w.values, _fireq_scales(w), w.tensor_scale)
  return qmm.w4a16_matmul_reference(x, w.values, w.scales, w.offsets)
