"""Quantized matmul ops: one `OpSuite` per op (w8a8, w4a16, w4a8_fireq) over every
implementation in its table, plus the kernels' own rules (packing, block sizes, the
already-quantized entry points, fp8 dots, Mosaic compiles).

Tolerances:
  * int8 x int8 -> int32 core: exact.
  * implementation vs the op's jnp reference (same quantized inputs, only f32
    summation order differs): max abs error <= 1e-5 * max|ref| for f32 outputs
    (W8A8: 1e-6), 1e-2 for bf16 outputs.
  * every implementation, the reference included, vs the unquantized f32 product
    x @ w (relative Frobenius): W4A16 g32/g128 < 0.12, W8A8 < 0.03, W4A8
    per-channel < 0.2, group-wise < 0.15. These catch a reference that is wrong in
    the same way as the kernel.
Shapes come from `pallas_kernels.shapes`. Large ones (SmolLM2's lm_head, Llama-3-8B)
are only export-lowered for TPU (Mosaic) and CUDA (Triton); interpret mode runs the
small and medium ones.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from op_test_base import (
  EXPORT_PLATFORMS,
  BadInput,
  Case,
  Export,
  OpSuite,
  fast_jit,
  rel_frobenius,
  rel_max,
  sds,
)

from pallas_kernels import quantized_matmul as qm
from pallas_kernels import registry, shapes
from pallas_kernels.quantized_matmul import common, w8a8

SMOLLM2 = shapes.SMOLLM2.matmul_shapes()  # (K, N) of each linear
LLAMA3_8B = shapes.LLAMA3_8B.matmul_shapes(("attn_q_o", "mlp_gate_up"))
EXPORT_SHAPES = SMOLLM2 + LLAMA3_8B
# M=1 and M=8 pad to the same 16-row block, so M=1 (the padding path) runs on one shape.
INTERPRET_CASES = [(8, k, n) for (k, n) in SMOLLM2[:4]] + [(1, *SMOLLM2[1]), (128, *SMOLLM2[1])]
# The suites' export cases (every implementation): SmolLM2's q/o at M=1, Llama-3-8B's
# gate/up at M=128. `test_kernel_exports_lower` sweeps the kernels over EXPORT_SHAPES.
SUITE_EXPORTS = ((1, *SMOLLM2[0]), (128, *LLAMA3_8B[1]))
_TRITON_CHECK = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

_quantize_w4a16 = fast_jit(qm.quantize_w4a16, static_argnums=(1, 2))
_quantize_w8 = fast_jit(qm.quantize_w8)
_quantize_w4_fireq = fast_jit(qm.quantize_w4_fireq, static_argnums=1)
_quantize_activations_int8 = fast_jit(qm.quantize_activations_int8)


def _interpret(kernel, **kwargs):
  """`kernel` in interpret mode under `fast_jit` (one compile)."""
  return fast_jit(functools.partial(kernel, interpret=True, **kwargs))


def _group(k: int) -> int:
  """W4A16 group size: 128 where K allows it, else 32 (SmolLM2 K=576)."""
  return 128 if k % 256 == 0 else 32


@functools.cache
def _data(m, k, n, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
  return x, w


def _close(out, ref, rtol) -> None:
  rel_max(rtol)(out, ref)


def _matmul_case(case_id, m, k, n, quantize, bound, tol=1e-5, x_dtype=jnp.float32):
  """A numerics case: x [m, k] (in x_dtype) times the weight quantize(w [k, n]).

  Every implementation must be within `tol` (relative max) of the op's reference,
  and within `bound` (relative Frobenius) of the unquantized f32 product.
  """

  def make():
    x, w = _data(m, k, n)
    return (x.astype(x_dtype), *quantize(w)), {}

  def check(out, args, kwargs):
    del args, kwargs
    x, w = _data(m, k, n)
    err = rel_frobenius(out, x @ w)
    assert err < bound, f"||out - x @ w|| / ||x @ w|| = {err:.3g} >= {bound}"

  return Case(case_id, make, rel_max(tol), check, dtype=x_dtype)


def _bad(case_id, exc, match, make):
  return BadInput(case_id, lambda: (make(), {}), exc, match)


def _export_cases(make_args, tag=""):
  return tuple(
    Export(f"m{m}-k{k}-n{n}{tag}", tuple(make_args(m, k, n)), {}, (m, n))
    for (m, k, n) in SUITE_EXPORTS
  )


# ---------------------------------------------------------------- packing


@settings(max_examples=4, deadline=None)
@given(
  k2=st.sampled_from([1, 4]),
  n=st.sampled_from([1, 3]),
  signed=st.booleans(),
  seed=st.integers(0, 99),
)
def test_pack_unpack_roundtrip(k2, n, signed, seed):
  lo, hi = (-8, 8) if signed else (0, 16)
  q = jax.random.randint(jax.random.key(seed), (2 * k2, n), lo, hi, jnp.int32)
  packed = jax.jit(qm.pack_int4)(q)
  assert packed.dtype == jnp.int8 and packed.shape == (k2, n)
  np.testing.assert_array_equal(jax.jit(qm.unpack_int4_full, static_argnums=1)(packed, signed), q)


# ---------------------------------------------------------------- W4A16


def _w4a16_export_args(m, k, n):
  g = _group(k)
  return [
    sds((m, k), jnp.bfloat16),
    sds((k // 2, n), jnp.int8),
    sds((k // g, n), jnp.float32),
    sds((k // g, n), jnp.float32),
  ]


def _w4a16_weights(k):
  return lambda w: _quantize_w4a16(w, _group(k))


class TestW4A16Matmul(OpSuite):
  OP = registry.get("w4a16_matmul")
  NUMERICS = tuple(
    _matmul_case(f"m{m}-k{k}-n{n}", m, k, n, _w4a16_weights(k), 0.12)
    for (m, k, n) in INTERPRET_CASES
  ) + (_matmul_case("bf16_x", 8, 576, 192, _w4a16_weights(576), 0.12, 1e-2, jnp.bfloat16),)
  BAD_INPUTS = (
    BadInput(
      "out_dtype",
      lambda: (
        (jnp.zeros((8, 256)), *_quantize_w4a16(_data(1, 256, 128)[1], 128)),
        dict(out_dtype=jnp.int32),
      ),
      ValueError,
      "^w4a16_matmul: out_dtype has dtype int32",
    ),
    _bad(
      "x_dtype",
      ValueError,
      "w4a16_matmul: x has dtype int32",
      lambda: (jnp.zeros((8, 256), jnp.int32), *_quantize_w4a16(_data(1, 256, 128)[1], 128)),
    ),
    _bad(
      "zero_rows",
      ValueError,
      r"^w4a16_matmul: x has shape \(0, 256\); every dimension",
      lambda: (jnp.zeros((0, 256)), *_quantize_w4a16(_data(1, 256, 128)[1], 128)),
    ),
    _bad(
      "x_list",
      TypeError,
      r"^w4a16_matmul: x must be a jax or numpy array, got list",
      lambda: ([[0.0] * 256] * 8, *_quantize_w4a16(_data(1, 256, 128)[1], 128)),
    ),
    _bad(
      "odd_group",  # g = 576 / 192 = 3
      ValueError,
      "group_size must be an even",
      lambda: (
        jnp.zeros((8, 576)),
        jnp.zeros((288, 128), jnp.int8),
        jnp.ones((192, 128)),
        jnp.zeros((192, 128)),
      ),
    ),
    _bad(
      "groups_not_dividing_k",  # 576 % 7 != 0
      ValueError,
      r"\(7, 128\)",
      lambda: (
        jnp.zeros((8, 576)),
        jnp.zeros((288, 128), jnp.int8),
        jnp.ones((7, 128)),
        jnp.zeros((7, 128)),
      ),
    ),
    _bad(
      "w_q_shape",
      ValueError,
      r"\(128, 256\)",
      lambda: (
        jnp.zeros((8, 512)),
        jnp.zeros((128, 256), jnp.int8),
        jnp.ones((4, 256)),
        jnp.ones((4, 256)),
      ),
    ),
  )
  EXPORTS = _export_cases(_w4a16_export_args) + (
    # SmolLM2's K=576 padded to 640 for g=128 (chunks of 64 rows straddle the half).
    Export(
      "g128_padded_k640",
      (
        sds((8, 640), jnp.bfloat16),
        sds((320, 576), jnp.int8),
        sds((5, 576), jnp.bfloat16),
        sds((5, 576), jnp.bfloat16),
      ),
      {},
      (8, 576),
    ),
  )


@settings(max_examples=2, deadline=None)
@given(m=st.integers(1, 40), kg=st.integers(1, 4), nb=st.integers(1, 2), seed=st.integers(0, 99))
def test_w4a16_generated(m, kg, nb, seed):
  k, n = 64 * kg, 128 * nb
  x, w = _data(m, k, n, seed)
  w_q, s, z = _quantize_w4a16(w, 32)
  out = _interpret(qm.w4a16_matmul)(x, w_q, s, z)
  _close(out, fast_jit(qm.w4a16_matmul_reference)(x, w_q, s, z), 1e-5)
  assert rel_frobenius(out, x @ w) < 0.12


@pytest.mark.parametrize("k,g", [(576, 64), (640, 128), (1536, 128)])
def test_w4a16_groups_straddling_the_half(k, g):
  """g | K but not 2g | K: the kernel steps over gcd(g, K/2)-row chunks (K=640: 64)."""
  x, w = _data(8, k, 128)
  w_q, s, mn = _quantize_w4a16(w, g)
  assert s.shape == (k // g, 128)
  out = _interpret(qm.w4a16_matmul)(x, w_q, s, mn)
  ref = fast_jit(qm.w4a16_matmul_reference)(x, w_q, s, mn)
  _close(out, ref, 1e-5)
  # independent reference: numpy dequantization from the unpacked codes
  codes = np.asarray(qm.unpack_int4_full(w_q, signed=False), np.float64)
  w_np = codes * np.repeat(np.asarray(s), g, 0) + np.repeat(np.asarray(mn), g, 0)
  _close(out, np.asarray(x, np.float64) @ w_np, 1e-5)
  assert rel_frobenius(out, x @ w) < 0.12


def test_w4a16_q4_1_grid_round_trips_exactly():
  """A weight on a 4-bit min/max grid of group 32 (like Q4_1) is reproduced exactly."""
  rng = np.random.default_rng(0)
  k, n, g = 576, 64, 32
  codes = rng.integers(0, 16, size=(k // g, g, n))
  codes[:, 0], codes[:, 1] = 0, 15  # every group spans the whole grid, as Q4_1's does
  d = rng.uniform(0.001, 0.02, size=(k // g, 1, n)).astype(np.float16).astype(np.float32)
  m = -rng.uniform(0.0, 0.15, size=(k // g, 1, n)).astype(np.float16).astype(np.float32)
  w = (codes * d + m).reshape(k, n).astype(np.float32)
  w_q, s, mn = qm.quantize_w4a16(jnp.asarray(w), g)
  np.testing.assert_array_equal(qm.unpack_int4_full(w_q, signed=False), codes.reshape(k, n))
  back = np.asarray(qm.dequantize_w4a16(w_q, s, mn))
  np.testing.assert_allclose(back, w, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(w).max())


# ---------------------------------------------------------------- W8A8


def _w8a8_export_args(m, k, n):
  return [sds((m, k), jnp.bfloat16), sds((k, n), jnp.int8), sds((1, n), jnp.float32)]


class TestW8A8Matmul(OpSuite):
  OP = registry.get("w8a8_matmul")
  NUMERICS = tuple(
    _matmul_case(f"m{m}-k{k}-n{n}", m, k, n, _quantize_w8, 0.03, 1e-6)
    for (m, k, n) in INTERPRET_CASES
  ) + (
    # out_dtype given as a numpy dtype object (what `x.dtype` is), bf16 output rounding
    dataclasses.replace(
      _matmul_case("out_dtype_bf16", 8, 256, 128, _quantize_w8, 0.03, 1e-2),
      make=lambda: (
        (_data(8, 256, 128)[0], *_quantize_w8(_data(8, 256, 128)[1])),
        dict(out_dtype=jnp.dtype(jnp.bfloat16)),
      ),
      dtype=jnp.bfloat16,
    ),
  )
  BAD_INPUTS = (
    BadInput(
      "out_dtype",
      lambda: (
        (jnp.zeros((8, 256)), *_quantize_w8(_data(1, 256, 128)[1])),
        dict(out_dtype=jnp.int32),
      ),
      ValueError,
      "^w8a8_matmul: out_dtype has dtype int32",
    ),
    _bad(
      "w_q_dtype",
      ValueError,
      "w8a8_matmul: w_q has dtype float32",
      lambda: (jnp.zeros((8, 256)), jnp.zeros((256, 128)), jnp.ones((1, 128))),
    ),
    _bad(
      "zero_rows",
      ValueError,
      r"^w8a8_matmul: x has shape \(0, 256\); every dimension",
      lambda: (jnp.zeros((0, 256)), *_quantize_w8(_data(1, 256, 128)[1])),
    ),
    _bad(
      "x_list",
      TypeError,
      r"^w8a8_matmul: x must be a jax or numpy array, got list",
      lambda: ([[0.0] * 256] * 8, *_quantize_w8(_data(1, 256, 128)[1])),
    ),
    _bad(
      "w_scale_shape",
      ValueError,
      r"\(1, 64\)",
      lambda: (jnp.zeros((8, 512)), jnp.zeros((512, 128), jnp.int8), jnp.ones((1, 64))),
    ),
  )
  EXPORTS = _export_cases(_w8a8_export_args)


@pytest.mark.parametrize("m,k,n", INTERPRET_CASES)
def test_int8_matmul_exact(m, k, n):
  """The integer core of W8A8 on its own: int32 accumulation, exact."""
  x, w = _data(m, k, n)
  w_q, _ = _quantize_w8(w)
  x_q, _ = _quantize_activations_int8(x)
  acc = _interpret(qm.int8_matmul)(x_q, w_q)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(acc, qm.int8_matmul_reference(x_q, w_q))


def test_w8a8_extreme_values_exact():
  """Saturated int8 inputs: the int32 accumulation must still be exact."""
  x_q = jnp.full((8, 1536), -128, jnp.int8)
  w_q = jnp.full((1536, 256), 127, jnp.int8).at[::2].set(-128)
  acc = _interpret(qm.int8_matmul)(x_q, w_q)
  np.testing.assert_array_equal(acc, qm.int8_matmul_reference(x_q, w_q))


@settings(max_examples=2, deadline=None)
@given(m=st.integers(1, 40), kb=st.integers(1, 4), nb=st.integers(1, 2), seed=st.integers(0, 99))
def test_w8a8_generated(m, kb, nb, seed):
  k, n = 128 * kb, 128 * nb
  x, w = _data(m, k, n, seed)
  w_q, w_s = _quantize_w8(w)
  x_q, _ = _quantize_activations_int8(x)
  np.testing.assert_array_equal(
    _interpret(qm.int8_matmul)(x_q, w_q), qm.int8_matmul_reference(x_q, w_q)
  )
  assert rel_frobenius(_interpret(qm.w8a8_matmul)(x, w_q, w_s), x @ w) < 0.03


# ---------------------------------------------------------------- W4A8 (FireQ)


def _w4a8_export_args(m, k, n, group=None):
  g = k if group is None else group
  return [
    sds((m, k), jnp.bfloat16),
    sds((k // 2, n), jnp.int8),
    sds((k // g, n), jnp.float32),
    sds((1, 1), jnp.float32),
  ]


def _fireq_weights(group):
  return lambda w: _quantize_w4_fireq(w, group)


class TestW4A8FireqMatmul(OpSuite):
  OP = registry.get("w4a8_fireq_matmul")
  NUMERICS = tuple(
    _matmul_case(f"m{m}-k{k}-n{n}-g{group}", m, k, n, _fireq_weights(group), bound)
    for (m, k, n, group, bound) in [(m, k, n, None, 0.2) for (m, k, n) in INTERPRET_CASES]
    + [(8, 576, 192, 32, 0.15), (8, 1536, 576, 128, 0.15)]
  )
  BAD_INPUTS = (
    BadInput(
      "out_dtype",
      lambda: (
        (jnp.zeros((8, 256)), *_quantize_w4_fireq(_data(1, 256, 128)[1], None)),
        dict(out_dtype=jnp.int32),
      ),
      ValueError,
      "^w4a8_fireq_matmul: out_dtype has dtype int32",
    ),
    _bad(
      "x_dtype",
      ValueError,
      "w4a8_fireq_matmul: x has dtype int32",
      lambda: (jnp.zeros((8, 256), jnp.int32), *_quantize_w4_fireq(_data(1, 256, 128)[1], None)),
    ),
    _bad(
      "zero_rows",
      ValueError,
      r"^w4a8_fireq_matmul: x has shape \(0, 256\); every dimension",
      lambda: (jnp.zeros((0, 256)), *_quantize_w4_fireq(_data(1, 256, 128)[1], None)),
    ),
    _bad(
      "x_list",
      TypeError,
      r"^w4a8_fireq_matmul: x must be a jax or numpy array, got list",
      lambda: ([[0.0] * 256] * 8, *_quantize_w4_fireq(_data(1, 256, 128)[1], None)),
    ),
    _bad(
      "w_q_shape",
      ValueError,
      r"w4a8_fireq_matmul: .*\(64, 128\)",
      lambda: (
        jnp.zeros((8, 256)),
        jnp.zeros((64, 128), jnp.int8),
        jnp.ones((1, 128)),
        jnp.ones((1, 1)),
      ),
    ),
  )
  EXPORTS = _export_cases(_w4a8_export_args) + _export_cases(
    lambda m, k, n: _w4a8_export_args(m, k, n, _group(k)), tag="-grouped"
  )


@pytest.mark.parametrize("per_token", [True, False])
def test_w4a8_fireq_fp8_dot_and_per_tensor(per_token):
  x, w = _data(8, 256, 256)
  w_q, w_s, t_s = qm.quantize_w4_fireq(w)
  out = _interpret(qm.w4a8_fireq_matmul, per_token=per_token, dot_dtype=jnp.float8_e4m3fn)(
    x, w_q, w_s, t_s
  )
  ref = fast_jit(functools.partial(qm.w4a8_fireq_matmul_reference, per_token=per_token))(
    x, w_q, w_s, t_s
  )
  _close(out, ref, 1e-5)
  assert rel_frobenius(out, x @ w) < 0.2


@settings(max_examples=2, deadline=None)
@given(m=st.integers(1, 40), kg=st.integers(1, 4), nb=st.integers(1, 2), seed=st.integers(0, 99))
def test_w4a8_fireq_generated(m, kg, nb, seed):
  k, n = 64 * kg, 128 * nb
  x, w = _data(m, k, n, seed)
  w_q, w_s, t_s = _quantize_w4_fireq(w, 32 if seed % 2 else None)
  out = _interpret(qm.w4a8_fireq_matmul)(x, w_q, w_s, t_s)
  _close(out, fast_jit(qm.w4a8_fireq_matmul_reference)(x, w_q, w_s, t_s), 1e-5)
  assert rel_frobenius(out, x @ w) < 0.2


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_fp8_dot_lowers(platform):
  cp = common.triton_params() if platform == "cuda" else None
  f = jax.jit(lambda *a: qm.w4a8_fireq_matmul(*a, dot_dtype=jnp.float8_e4m3fn, compiler_params=cp))
  args = _w4a8_export_args(128, 4096, 14336)
  jax.export.export(f, platforms=[platform], disabled_checks=_TRITON_CHECK)(*args)


_SWEEP = {
  "w4a16": ("w4a16_matmul", _w4a16_export_args),
  "w8a8": ("w8a8_matmul", _w8a8_export_args),
  "w4a8": ("w4a8_fireq_matmul", _w4a8_export_args),
  "w4a8_g": ("w4a8_fireq_matmul", lambda m, k, n: _w4a8_export_args(m, k, n, _group(k))),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("variant", list(_SWEEP))
@pytest.mark.parametrize("k,n", EXPORT_SHAPES)
def test_kernel_exports_lower(platform, variant, k, n):
  """Each op's Pallas implementation for the platform (mosaic_tpu, triton) lowers at
  every SmolLM2 and Llama-3-8B linear shape."""
  op_name, make_args = _SWEEP[variant]
  op, (op_platform, kernel_call) = registry.get(op_name), EXPORT_PLATFORMS[platform]
  # The implementation's own function (the op's selection is the suites' export cases).
  kernel = op.get("mosaic_tpu" if platform == "tpu" else "triton").fn
  assert op.select("pallas", op_platform, *make_args(1, k, n)).fn is kernel
  for m in (1, 128):  # M=8 pads to the same 16-row block as M=1: identical kernel
    f = jax.jit(kernel)
    exp = jax.export.export(f, platforms=[platform], disabled_checks=_TRITON_CHECK)(
      *make_args(m, k, n)
    )
    assert exp.out_avals[0].shape == (m, n)
    assert kernel_call in exp.mlir_module()


# ---------------------------------------------------------------- kernel entry points


def test_bad_dtype_of_quantized_entry_points_raises():
  """The already-quantized entry points (no op of their own) check their dtypes."""
  x, w = _data(8, 256, 128)
  w4, ws, ts = qm.quantize_w4_fireq(w)
  x_q, x_s = qm.quantize_activations_int8(x)
  w8, w8s = qm.quantize_w8(w)
  with pytest.raises(ValueError, match="out_dtype has dtype int32"):
    qm.w8a8_matmul_quantized(x_q, x_s, w8, w8s, out_dtype=np.int32)
  with pytest.raises(ValueError, match="x_fp8 has dtype bfloat16"):
    qm.w4a8_fireq_matmul_quantized(x.astype(jnp.bfloat16), jnp.ones((8, 1)), w4, ws, ts)


def _quantized_entry_calls(x):
  """The kernel entry points that take already-quantized activations `x` [M, 256]."""
  _, w = _data(1, 256, 128)
  w8, w8s = _quantize_w8(w)
  wf, wfs, ts = _quantize_w4_fireq(w, None)
  m = len(x) if isinstance(x, list) else x.shape[0]
  x_q, x_fp8 = jnp.zeros((m, 256), jnp.int8), jnp.zeros((m, 256), jnp.float8_e4m3fn)
  x_s = jnp.ones((m, 1), jnp.float32)
  if isinstance(x, list):
    x_q = x_fp8 = x
  kw = dict(interpret=True)
  return {
    "int8_matmul": lambda: qm.int8_matmul(x_q, w8, **kw),
    "w8a8_matmul_quantized": lambda: qm.w8a8_matmul_quantized(x_q, x_s, w8, w8s, **kw),
    "w4a8_fireq_matmul_quantized": lambda: qm.w4a8_fireq_matmul_quantized(
      x_fp8, x_s, wf, wfs, ts, **kw
    ),
  }


@pytest.mark.parametrize(
  "kernel", ["int8_matmul", "w8a8_matmul_quantized", "w4a8_fireq_matmul_quantized"]
)
def test_zero_rows_and_list_input_raise_before_lowering(kernel):
  """M=0 is a ValueError naming the argument and its shape (it used to fail inside
  the HLO interpreter); a Python list is a TypeError naming the argument and type
  (it used to be an AttributeError). The ops' entry points: their suites' bad inputs."""
  with pytest.raises(ValueError, match=r"^\w+: x(_q|_fp8)? has shape \(0, 256\); every dimension"):
    _quantized_entry_calls(jnp.zeros((0, 256), jnp.float32))[kernel]()
  with pytest.raises(TypeError, match=r"^\w+: x(_q|_fp8)? must be a jax or numpy array, got list"):
    _quantized_entry_calls([[0.0] * 256] * 8)[kernel]()


def test_group_not_dividing_k_raises():
  _, w = _data(1, 576, 128)
  with pytest.raises(ValueError, match="K=576"):
    qm.quantize_w4a16(w, 128)  # 576 % 256 != 0
  with pytest.raises(ValueError, match="K=576"):
    qm.quantize_w4_fireq(w, 64)
  with pytest.raises(ValueError, match="K=576 is not divisible by group_size=128"):
    qm.quantize_w4a16(w, 128)


def test_mismatched_shapes_of_quantized_entry_points_raise():
  with pytest.raises(ValueError, match=r"\(256, 128\)"):
    qm.int8_matmul(jnp.zeros((8, 512), jnp.int8), jnp.zeros((256, 128), jnp.int8))
  with pytest.raises(ValueError, match=r"\(4, 1\)"):
    qm.w4a8_fireq_matmul_quantized(
      jnp.zeros((8, 512), jnp.float8_e4m3fn),
      jnp.ones((4, 1)),
      jnp.zeros((256, 128), jnp.int8),
      jnp.ones((1, 128)),
      jnp.ones((1, 1)),
    )


def test_bad_block_sizes_raise():
  x_q = jnp.zeros((8, 512), jnp.int8)
  w_q = jnp.zeros((512, 384), jnp.int8)
  with pytest.raises(ValueError, match="N=384"):
    qm.int8_matmul(x_q, w_q, block_sizes=w8a8.BlockSizes(block_n=256))
  with pytest.raises(ValueError, match="K=512"):
    qm.int8_matmul(x_q, w_q, block_sizes=w8a8.BlockSizes(block_k=384))
  with pytest.raises(ValueError, match="Triton"):
    qm.int8_matmul(
      x_q,
      w_q,
      block_sizes=w8a8.BlockSizes(block_n=384),
      compiler_params=common.triton_params(),
    )
