"""Decode attention over a KIVI-style 2/4/8-bit packed KV cache (Pallas).

Public API:
  * ``quantize_kv`` / ``dequantize_kv`` (+ per-tensor helpers): packed layouts.
  * ``quantized_kv_attention_reference``: jnp dequantize-then-attend.
  * ``quantized_kv_decode_attention``: TPU-style kernel (scalar prefetch, VMEM scratch).
  * ``quantized_kv_decode_attention_portable``: grid (B, Hkv) + ``fori_loop``
    variant that also lowers for Triton (GQA group padded to a power of 2).
  * ``BlockSizes``: tiling.
"""

from .block_sizes import BlockSizes
from .packing import (
  SUPPORTED_BITS,
  QuantizedKV,
  dequantize_keys,
  dequantize_kv,
  dequantize_values,
  pack_factor,
  quantize_keys,
  quantize_kv,
  quantize_values,
)
from .portable_kernel import quantized_kv_decode_attention_portable
from .reference import dense_decode_attention, quantized_kv_attention_reference
from .tpu_kernel import quantized_kv_decode_attention

__all__ = [
  "SUPPORTED_BITS",
  "BlockSizes",
  "QuantizedKV",
  "dense_decode_attention",
  "dequantize_keys",
  "dequantize_kv",
  "dequantize_values",
  "pack_factor",
  "quantize_keys",
  "quantize_kv",
  "quantize_values",
  "quantized_kv_attention_reference",
  "quantized_kv_decode_attention",
  "quantized_kv_decode_attention_portable",
]
