"""Quantized matmul Pallas kernels: W4A16 (group-wise), W8A8 and W4A8 (FireQ).

Each variant module has the Pallas kernel, a pure-jnp reference, a frozen
`BlockSizes`, input validation (ValueError before lowering) and a quantize helper.
All kernels use the portable form: grid over (M, N) blocks, whole-K blocks and a
`fori_loop` over K, so the same code lowers for Mosaic TPU and Triton
(`compiler_params=common.triton_params()`).
"""

from pallas_kernels.quantized_matmul.common import pack_int4, triton_params, unpack_int4_full
from pallas_kernels.quantized_matmul.w4a8_fireq import (
  dequantize_w4_fireq,
  quantize_activations_fp8,
  quantize_w4_fireq,
  w4a8_fireq_matmul,
  w4a8_fireq_matmul_quantized,
  w4a8_fireq_matmul_quantized_reference,
  w4a8_fireq_matmul_reference,
)
from pallas_kernels.quantized_matmul.w4a16 import (
  dequantize_w4a16,
  quantize_w4a16,
  w4a16_matmul,
  w4a16_matmul_reference,
)
from pallas_kernels.quantized_matmul.w8a8 import (
  int8_codes,
  int8_matmul,
  int8_matmul_reference,
  quantize_activations_int8,
  quantize_w8,
  w8a8_matmul,
  w8a8_matmul_quantized,
  w8a8_matmul_quantized_reference,
  w8a8_matmul_reference,
)
from pallas_kernels.quantized_matmul.xla import fake_quantize_activations_fp8

__all__ = [
  "dequantize_w4_fireq",
  "dequantize_w4a16",
  "fake_quantize_activations_fp8",
  "int8_codes",
  "int8_matmul",
  "int8_matmul_reference",
  "pack_int4",
  "quantize_activations_fp8",
  "quantize_activations_int8",
  "quantize_w4_fireq",
  "quantize_w4a16",
  "quantize_w8",
  "triton_params",
  "unpack_int4_full",
  "w4a16_matmul",
  "w4a16_matmul_reference",
  "w4a8_fireq_matmul",
  "w4a8_fireq_matmul_quantized",
  "w4a8_fireq_matmul_quantized_reference",
  "w4a8_fireq_matmul_reference",
  "w8a8_matmul",
  "w8a8_matmul_quantized",
  "w8a8_matmul_quantized_reference",
  "w8a8_matmul_reference",
]
