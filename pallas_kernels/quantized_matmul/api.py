"""The quantized matmul ops and their implementation tables.

Each op computes float rows ``x [M, K]`` times a quantized weight ``[K, N]``:

* ``w8a8_matmul(x, w_q int8 [K, N], w_scale f32 [1, N])``: x quantized to int8
  per token, int32 accumulation.
* ``w4a16_matmul(x, w_q int8 [K/2, N], scales [K/g, N], mins [K/g, N])``:
  group-wise asymmetric int4 (``w = q * scale + min``), float activations.
* ``w4a8_fireq_matmul(x, w_q int8 [K/2, N], w_scale f32 [K/g, N], tensor_scale
  f32 [1, 1])``: symmetric int4 weights, x quantized to FP8 e4m3 per token.

All take ``out_dtype=`` (default x's dtype). Implementations of each:
  * ``reference``: the variant module's jnp reference.
  * ``xla``: `xla.py` (differentiable).
  * ``mosaic_tpu``: the Pallas kernel with Mosaic TPU compiler parameters.
  * ``triton``: the same kernel with Triton compiler parameters (its block rules:
    power-of-2 tiles >= 16).
A Pallas implementation supports the inputs when its wrapper's tiling and dtype
checks pass (`op_api.supported_by_tracing`) and the chip takes the variant's dtypes.

Variants (per-chip forms, picked at trace time from the device kind through
`pallas_kernels.chips`; `variant=` asks for one):
  * ``w8a8_matmul``: ``int8_dot`` (int8 operands, int32 accumulation; where the
    chip has native int8: TPU v5e/v6e, every CUDA chip, and unknown chips) or
    ``bf16_dot`` (the int8 codes converted to bf16 in the kernel, exact; TPU v4,
    which rejects int8 operands, and TPU 7x, which has no native int8).
  * ``w4a8_fireq_matmul``: ``fp8_dot`` (native fp8 dot: TPU v6e/7x, sm89+),
    ``bf16_dot`` (fp8 activations converted in the kernel; the default elsewhere
    and on unknown chips) or ``bf16_inputs`` (activations rounded to fp8 by XLA and
    handed to the kernel as bf16: no fp8 in the kernel, for sm80).
  * ``w4a16_matmul``: one form (a dot in the activations' dtype).
On TPU the VMEM limit is the chip's where it has less than 64 MiB (v4: 16 MiB) and
the kernels shrink their default blocks to fit it.

Sharding (`W8A8_SHARDING`, ...): rows and output columns split freely, K into partial
sums; int4 K splits as halves (see `op_api.Halves`). W8A8 and FireQ implementations
also take ``x_absmax=`` (f32 [M, 1]): x is then a K shard and is quantized on the
whole row's scale, exactly as the unsplit call quantizes it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import chips
from pallas_kernels.op_api import (
  MATMUL_IN,
  MATMUL_OUT,
  MATMUL_ROWS,
  Halves,
  Implementation,
  Op,
  Sharding,
  supported_by_tracing,
)

from . import common, w4a8_fireq, w4a16, w8a8
from .w4a8_fireq import quantize_activations_fp8
from .w8a8 import quantize_activations_int8
from .xla import w4a8_fireq_matmul_xla, w4a16_matmul_xla, w8a8_matmul_xla


def _check_out_dtype(name, out_dtype):
  if out_dtype is not None:
    common.check_dtype(name, "out_dtype", out_dtype, (jnp.float32, jnp.bfloat16))


def _check_absmax(name, x, x_absmax):
  if x_absmax is not None:
    common.check_array(name, "x_absmax", x_absmax)
    common.check_dtype(name, "x_absmax", x_absmax, (jnp.float32,))
    common.check_shape(name, "x_absmax", x_absmax, (x.shape[0], 1))


def _validate_w8a8(x, w_q, w_scale, *, out_dtype=None, x_absmax=None):
  w8a8._validate_float_x(x)
  _check_absmax(w8a8._NAME, x, x_absmax)
  for arg, a in (("w_q", w_q), ("w_scale", w_scale)):
    common.check_array(w8a8._NAME, arg, a)
  common.check_dtype(w8a8._NAME, "w_q", w_q, (jnp.int8,))
  common.check_dtype(w8a8._NAME, "w_scale", w_scale, (jnp.float32,))
  if w_q.ndim != 2 or w_q.shape[0] != x.shape[1]:
    raise ValueError(
      f"{w8a8._NAME}: w_q shape {tuple(w_q.shape)} does not contract with x {tuple(x.shape)}"
    )
  common.check_shape(w8a8._NAME, "w_scale", w_scale, (1, w_q.shape[1]))
  _check_out_dtype(w8a8._NAME, out_dtype)


def _validate_w4a16(x, w_q, scales, mins, *, out_dtype=None):
  w4a16._validate(x, w_q, scales, mins)
  _check_out_dtype(w4a16._NAME, out_dtype)


def _validate_fireq(x, w_q, w_scale, tensor_scale, *, out_dtype=None, x_absmax=None):
  name = w4a8_fireq._NAME
  common.check_array(name, "x", x)
  if x.ndim != 2:
    raise ValueError(f"{name}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
  _check_absmax(name, x, x_absmax)
  common.check_dtype(name, "x", x, w4a8_fireq._X_DTYPES)
  x_fp8 = jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn)
  x_scale = jax.ShapeDtypeStruct((x.shape[0], 1), jnp.float32)
  w4a8_fireq._validate(x_fp8, x_scale, w_q, w_scale, tensor_scale)
  _check_out_dtype(name, out_dtype)


def _quantize_rows(quantize, x, x_absmax):
  """`quantize(x)` (per-row activation quantization) with each row's scale taken from
  `x_absmax` [M, 1] instead of x's own maximum: x is then a K shard of rows whose
  maximum over all of K is `x_absmax`. The maximum rides along as one extra column
  (never below x's own), so the scale and codes are exactly those of the whole row."""
  x_q, x_scale = quantize(jnp.concatenate([x.astype(jnp.float32), x_absmax], axis=1))
  return x_q[:, :-1], x_scale


def _row_quantized(float_fn, quantized_fn, quantize):
  """An implementation taking ``x_absmax=`` (see `Sharding.row_absmax`): without it,
  `float_fn` unchanged; with it, x quantized on the whole row's scale, then
  ``quantized_fn(x_q, x_scale, *weight, **kwargs)``."""

  def run(x, *weight, x_absmax=None, out_dtype=None, **kwargs):
    if x_absmax is None:
      return float_fn(x, *weight, out_dtype=out_dtype, **kwargs)
    x_q, x_scale = _quantize_rows(quantize, x, x_absmax)
    return quantized_fn(x_q, x_scale, *weight, out_dtype=out_dtype or x.dtype, **kwargs)

  return run


def _w8a8_quantized_xla(x_q, x_scale, w_q, w_scale, *, out_dtype):
  """`w8a8_matmul_xla` on int8 rows already quantized."""
  acc = jnp.dot(x_q, w_q, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * x_scale * w_scale).astype(out_dtype)


def _fireq_quantized_xla(x_fp8, x_scale, w_q, w_scale, tensor_scale, *, out_dtype):
  """`w4a8_fireq_matmul_xla` on FP8 rows already quantized."""
  w = w4a8_fireq.dequantize_w4_fireq(w_q, w_scale, tensor_scale)
  return (jnp.dot(x_fp8.astype(jnp.float32), w) * x_scale).astype(out_dtype)


# The matmul ops split as rows x [M, K] @ weight [K, N]: rows, output columns
# (column-parallel) or K (row-parallel: partial sums). Int4 codes pack rows j and
# j + K/2 into one byte, so K splits as halves in x and in the group scales: shard i of
# the packed rows then meets the same rows of x and the same groups.
_M, _K, _N = MATMUL_ROWS, MATMUL_IN, MATMUL_OUT
W8A8_SHARDING = Sharding(
  args=((_M, _K), (_K, _N), (None, _N)), out=(_M, _N), summed=(_K,), row_absmax=True
)
W4A16_SHARDING = Sharding(
  args=((_M, Halves(_K)), (_K, _N), (Halves(_K), _N), (Halves(_K), _N)),
  out=(_M, _N),
  summed=(_K,),
)
W4A8_FIREQ_SHARDING = Sharding(
  args=((_M, Halves(_K)), (_K, _N), (Halves(_K), _N), (None, None)),
  out=(_M, _N),
  summed=(_K,),
  row_absmax=True,
)


# variant name -> the kernel's keyword arguments
W8A8_VARIANTS = {
  "int8_dot": {"dot_dtype": jnp.int8},
  "bf16_dot": {"dot_dtype": jnp.bfloat16},
}
FIREQ_VARIANTS = {
  "bf16_dot": {"dot_dtype": jnp.bfloat16, "kernel_x_dtype": jnp.float8_e4m3fn},
  "fp8_dot": {"dot_dtype": jnp.float8_e4m3fn, "kernel_x_dtype": jnp.float8_e4m3fn},
  "bf16_inputs": {"dot_dtype": jnp.bfloat16, "kernel_x_dtype": jnp.bfloat16},
}


def _pick_w8a8(platform) -> str:
  chip = chips.chip_of(platform)
  return "int8_dot" if chip is None or chip.native(jnp.int8) else "bf16_dot"


def _pick_fireq(platform) -> str:
  chip = chips.chip_of(platform)
  if chip is None:
    return "bf16_dot"
  if chip.native(jnp.float8_e4m3fn):
    return "fp8_dot"
  return "bf16_inputs" if chip.rejects_values(jnp.float8_e4m3fn) else "bf16_dot"


def _chip_refusal(platform, kwargs) -> str | None:
  """Why the chip cannot take the variant's dtypes (None if it can, or is unknown)."""
  chip = chips.chip_of(platform)
  if chip is None:
    return None
  dot = kwargs.get("dot_dtype")
  x_in = kwargs.get("kernel_x_dtype")
  if dot is not None and chip.rejects(dot):
    return chip.rejection("matmul operands", dot)
  for dtype in (x_in, dot):
    if dtype is not None and chip.rejects_values(dtype):
      return chip.rejection("kernel values", dtype)
  return None


def _op(name, reference, xla, kernel, validate, sharding, variants=None, pick=None) -> Op:
  def pallas(backend):
    def params(platform):
      if backend == "gpu":
        return common.triton_params()
      chip = chips.chip_of(platform) if platform else None
      return common.tpu_params(chip.onchip_bytes if chip else None)

    def forms_of(variant, platform):
      if not variants:
        return {}
      if variant is None:  # called directly, not through the op
        variant = pick(platform) if platform is not None else next(iter(variants))
      return variants[variant]

    def run(*args, interpret=False, variant=None, platform=None, **kwargs):
      forms = forms_of(variant, platform)
      return kernel(*args, interpret=interpret, compiler_params=params(platform), **forms, **kwargs)

    def supports(platform, *args, variant=None, **kwargs):
      forms = forms_of(variant, platform)
      reason = _chip_refusal(platform, forms)
      if reason is None:
        traced = supported_by_tracing(functools.partial(run, platform=platform, variant=variant))
        reason = traced(platform, *args, **kwargs)
      return reason

    return Implementation(
      "mosaic_tpu" if backend == "tpu" else "triton",
      "pallas",
      run,
      backend=backend,
      supports=supports,
      variants=tuple(variants or ()),
      pick_variant=pick,
    )

  return Op(
    name,
    (
      Implementation("reference", "reference", reference),
      Implementation("xla", "xla", xla),
      pallas("tpu"),
      pallas("gpu"),
    ),
    validate=validate,
    sharding=sharding,
  )


_w8a8 = functools.partial(_row_quantized, quantize=quantize_activations_int8)
_fireq = functools.partial(_row_quantized, quantize=quantize_activations_fp8)

W8A8_MATMUL = _op(
  "w8a8_matmul",
  _w8a8(w8a8.w8a8_matmul_reference, w8a8.w8a8_matmul_quantized_reference),
  _w8a8(w8a8_matmul_xla, _w8a8_quantized_xla),
  _w8a8(w8a8.w8a8_matmul, w8a8.w8a8_matmul_quantized),
  _validate_w8a8,
  W8A8_SHARDING,
  W8A8_VARIANTS,
  _pick_w8a8,
)
W4A16_MATMUL = _op(
  "w4a16_matmul",
  w4a16.w4a16_matmul_reference,
  w4a16_matmul_xla,
  w4a16.w4a16_matmul,
  _validate_w4a16,
  W4A16_SHARDING,
)
W4A8_FIREQ_MATMUL = _op(
  "w4a8_fireq_matmul",
  _fireq(w4a8_fireq.w4a8_fireq_matmul_reference, w4a8_fireq.w4a8_fireq_matmul_quantized_reference),
  _fireq(w4a8_fireq_matmul_xla, _fireq_quantized_xla),
  _fireq(w4a8_fireq.w4a8_fireq_matmul, w4a8_fireq.w4a8_fireq_matmul_quantized),
  _validate_fireq,
  W4A8_FIREQ_SHARDING,
  FIREQ_VARIANTS,
  _pick_fireq,
)
