"""Implementations of the ``quantized_linear`` op: rows [M, K] @ QTensor -> [M, N].

* ``xla``: dequantize and dot; XLA fuses the dequantization into the matmul's
  operand on CPU. W8A8 quantizes activations per token first, as the kernel does.
* ``pallas``: the `pallas_kernels.quantized_matmul` kernels.
* ``reference``: the kernels' own jnp references.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxllm import ops
from pallas_kernels import quantized_matmul as qmm


@ops.register("quantized_linear", "xla")
def _xla(x, w):
  if w.method == "w8a8":
    x_q, x_scale = qmm.quantize_activations_int8(x)
    acc = jnp.dot(x_q, w.values, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale * w.scales).astype(x.dtype)
  wf = w.dequantize(x.dtype).reshape(x.shape[-1], -1)  # [K, N]
  return jnp.dot(x, wf, preferred_element_type=jnp.float32).astype(x.dtype)


@ops.register("quantized_linear", "pallas")
def _pallas(x, w, *, interpret=False):
  if w.method == "w8a8":
    return qmm.w8a8_matmul(x, w.values, w.scales, interpret=interpret)
  return qmm.w4a16_matmul(x, w.values, w.scales, w.zeros, interpret=interpret)


@ops.register("quantized_linear", "reference")
def _reference(x, w):
  if w.method == "w8a8":
    return qmm.w8a8_matmul_reference(x, w.values, w.scales)
  return qmm.w4a16_matmul_reference(x, w.values, w.scales, w.zeros)
