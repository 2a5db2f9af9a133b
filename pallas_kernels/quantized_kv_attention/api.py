"""The ``quantized_kv_attention`` op: decode attention over a KIVI-packed cache.

``(q [B, Hq, D], kv: QuantizedKV [B, Hkv, ...], start, quantized_length,
length=None, k_residual [B, Hkv, R, D] = None, v_residual = None, *, bits,
group_size) -> [B, Hq, D]``; see `reference.quantized_kv_attention_reference`.

Implementations:
  * ``reference``: dequantize, then attend (`reference.py`).
  * ``xla``: dequantization fused into the score and value products (`xla.py`).
  * ``mosaic_tpu``: the TPU kernel (`tpu_kernel.py`: scalar prefetch, VMEM scratch).
  * ``triton``: the portable kernel (`portable_kernel.py`: grid (B, Hkv), a loop
    over key groups, the GQA group padded to a power of 2). Its Triton dot tiles
    need power-of-2 ``group_size / pf >= 16``, head_dim and residual: 2-bit keys
    with group 32 (8 rows per bit slot) are refused, so on GPU the default for
    such a cache is ``xla``.
"""

from __future__ import annotations

from pallas_kernels.op_api import (
  Implementation,
  Op,
  Sharding,
  supported_by_tracing,
  without_platform,
)

from .packing import QuantizedKV
from .portable_kernel import quantized_kv_decode_attention_portable
from .reference import quantized_kv_attention_reference
from .tpu_kernel import quantized_kv_decode_attention
from .validation import validate as _validate_inputs
from .xla import quantized_kv_attention_xla


def _validate(
  q, kv, start, quantized_length, length=None, k_residual=None, v_residual=None, *, bits, group_size
):
  del start, quantized_length, length
  _validate_inputs(q, kv, k_residual, v_residual, bits, group_size)


# Batch rows and heads split (whole GQA groups per shard); slots, groups and head_dim
# (packed or not) never do. start/quantized_length/length are [B] or scalars (replicated).
_H = ("batch", "act_kv_heads", None, None)
_ROW = ("batch", "act_kv_heads", None)
QUANTIZED_KV_ATTENTION_SHARDING = Sharding(
  args=(
    ("batch", "act_heads", None),
    QuantizedKV(k_packed=_H, k_scale=_H, k_zero=_H, v_packed=_H, v_scale=_ROW, v_zero=_ROW),
    ("batch",),
    ("batch",),
    ("batch",),
    _H,
    _H,
  ),
  out=("batch", "act_heads", None),
  tied=(("act_heads", "act_kv_heads"),),
)

QUANTIZED_KV_ATTENTION = Op(
  "quantized_kv_attention",
  (
    Implementation("reference", "reference", quantized_kv_attention_reference),
    Implementation("xla", "xla", quantized_kv_attention_xla),
    Implementation(
      "mosaic_tpu",
      "pallas",
      without_platform(quantized_kv_decode_attention),
      backend="tpu",
      supports=supported_by_tracing(quantized_kv_decode_attention),
    ),
    Implementation(
      "triton",
      "pallas",
      without_platform(quantized_kv_decode_attention_portable),
      backend="gpu",
      supports=supported_by_tracing(quantized_kv_decode_attention_portable),
    ),
  ),
  validate=_validate,
  sharding=QUANTIZED_KV_ATTENTION_SHARDING,
)
