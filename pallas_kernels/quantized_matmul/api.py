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
checks pass (`op_api.supported_by_tracing`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.op_api import Implementation, Op, supported_by_tracing

from . import common, w4a8_fireq, w4a16, w8a8
from .xla import w4a8_fireq_matmul_xla, w4a16_matmul_xla, w8a8_matmul_xla


def _check_out_dtype(name, out_dtype):
  if out_dtype is not None:
    common.check_dtype(name, "out_dtype", out_dtype, (jnp.float32, jnp.bfloat16))


def _validate_w8a8(x, w_q, w_scale, *, out_dtype=None):
  w8a8._validate_float_x(x)
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


def _validate_fireq(x, w_q, w_scale, tensor_scale, *, out_dtype=None):
  name = w4a8_fireq._NAME
  common.check_array(name, "x", x)
  if x.ndim != 2:
    raise ValueError(f"{name}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
  common.check_dtype(name, "x", x, w4a8_fireq._X_DTYPES)
  x_fp8 = jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn)
  x_scale = jax.ShapeDtypeStruct((x.shape[0], 1), jnp.float32)
  w4a8_fireq._validate(x_fp8, x_scale, w_q, w_scale, tensor_scale)
  _check_out_dtype(name, out_dtype)


def _op(name, reference, xla, kernel, validate) -> Op:
  def pallas(params_fn, backend):
    def run(*args, interpret=False, **kwargs):
      return kernel(*args, interpret=interpret, compiler_params=params_fn(), **kwargs)

    return Implementation(
      "mosaic_tpu" if backend == "tpu" else "triton",
      "pallas",
      run,
      backend=backend,
      supports=supported_by_tracing(run),
    )

  return Op(
    name,
    (
      Implementation("reference", "reference", reference),
      Implementation("xla", "xla", xla),
      pallas(common.tpu_params, "tpu"),
      pallas(common.triton_params, "gpu"),
    ),
    validate=validate,
  )


W8A8_MATMUL = _op(
  "w8a8_matmul", w8a8.w8a8_matmul_reference, w8a8_matmul_xla, w8a8.w8a8_matmul, _validate_w8a8
)
W4A16_MATMUL = _op(
  "w4a16_matmul",
  w4a16.w4a16_matmul_reference,
  w4a16_matmul_xla,
  w4a16.w4a16_matmul,
  _validate_w4a16,
)
W4A8_FIREQ_MATMUL = _op(
  "w4a8_fireq_matmul",
  w4a8_fireq.w4a8_fireq_matmul_reference,
  w4a8_fireq_matmul_xla,
  w4a8_fireq.w4a8_fireq_matmul,
  _validate_fireq,
)
