"""Quantized matmul kernels: interpret mode vs reference vs f32, export lowering, bad inputs.

Tolerances:
  * int8 x int8 -> int32 core: exact.
  * kernel vs jnp reference (same quantized inputs, only f32 summation order
    differs): max abs error <= 1e-5 * max|ref| for f32 outputs, 1e-2 for bf16 outputs.
  * reference and kernel vs the unquantized f32 product x @ w (relative Frobenius):
    W4A16 g32/g128 < 0.12, W8A8 < 0.03, W4A8 per-channel < 0.2, group-wise < 0.15.
    These catch a reference that is wrong in the same way as the kernel.
Large shapes (SmolLM2 576x49152, Llama-3-8B) are only export-lowered for TPU (Mosaic)
and CUDA (Triton); interpret mode runs the small and medium ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import quantized_matmul as qm
from pallas_kernels.quantized_matmul import common, w4a8_fireq, w4a16, w8a8

# (K, N) per linear layer.
SMOLLM2 = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
LLAMA3_8B = [(4096, 4096), (4096, 14336)]
EXPORT_SHAPES = SMOLLM2 + LLAMA3_8B
# M=1 and M=8 pad to the same 16-row block, so M=1 (the padding path) runs on one shape.
INTERPRET_CASES = [(8, k, n) for (k, n) in SMOLLM2[:4]] + [(1, 576, 192), (128, 576, 192)]
_TRITON_CHECK = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _group(k: int) -> int:
  """W4A16 group size: 128 where K allows it, else 32 (SmolLM2 K=576)."""
  return 128 if k % 256 == 0 else 32


def _data(m, k, n, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
  return x, w


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _close(out, ref, rtol) -> None:
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=rtol * float(np.abs(ref).max()))


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


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
  packed = qm.pack_int4(q)
  assert packed.dtype == jnp.int8 and packed.shape == (k2, n)
  np.testing.assert_array_equal(qm.unpack_int4_full(packed, signed), q)


# ---------------------------------------------------------------- W4A16


@pytest.mark.parametrize("m,k,n", INTERPRET_CASES)
def test_w4a16_interpret(m, k, n):
  x, w = _data(m, k, n)
  w_q, s, z = qm.quantize_w4a16(w, _group(k))
  out = qm.w4a16_matmul(x, w_q, s, z, interpret=True)
  ref = qm.w4a16_matmul_reference(x, w_q, s, z)
  _close(out, ref, 1e-5)
  exact = x @ w
  assert _rel(ref, exact) < 0.12 and _rel(out, exact) < 0.12


def test_w4a16_bf16_activations():
  x, w = _data(8, 576, 192)
  w_q, s, z = qm.quantize_w4a16(w, 32)
  xb = x.astype(jnp.bfloat16)
  out = qm.w4a16_matmul(xb, w_q, s, z, interpret=True)
  assert out.dtype == jnp.bfloat16
  _close(out, qm.w4a16_matmul_reference(xb, w_q, s, z), 1e-2)
  assert _rel(out, x @ w) < 0.12


@settings(max_examples=2, deadline=None)
@given(m=st.integers(1, 40), kg=st.integers(1, 4), nb=st.integers(1, 2), seed=st.integers(0, 99))
def test_w4a16_generated(m, kg, nb, seed):
  k, n = 64 * kg, 128 * nb
  x, w = _data(m, k, n, seed)
  w_q, s, z = qm.quantize_w4a16(w, 32)
  out = qm.w4a16_matmul(x, w_q, s, z, interpret=True)
  _close(out, qm.w4a16_matmul_reference(x, w_q, s, z), 1e-5)
  assert _rel(out, x @ w) < 0.12


@pytest.mark.parametrize("k,g", [(576, 64), (640, 128), (1536, 128)])
def test_w4a16_groups_straddling_the_half(k, g):
  """g | K but not 2g | K: the kernel steps over gcd(g, K/2)-row chunks (K=640: 64)."""
  x, w = _data(8, k, 128)
  w_q, s, mn = qm.quantize_w4a16(w, g)
  assert s.shape == (k // g, 128)
  out = qm.w4a16_matmul(x, w_q, s, mn, interpret=True)
  ref = qm.w4a16_matmul_reference(x, w_q, s, mn)
  _close(out, ref, 1e-5)
  # independent reference: numpy dequantization from the unpacked codes
  codes = np.asarray(qm.unpack_int4_full(w_q, signed=False), np.float64)
  w_np = codes * np.repeat(np.asarray(s), g, 0) + np.repeat(np.asarray(mn), g, 0)
  _close(out, np.asarray(x, np.float64) @ w_np, 1e-5)
  assert _rel(out, x @ w) < 0.12


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


def _w4a16_export_args(m, k, n):
  g = _group(k)
  return [
    _sds((m, k), jnp.bfloat16),
    _sds((k // 2, n), jnp.int8),
    _sds((k // g, n), jnp.float32),
    _sds((k // g, n), jnp.float32),
  ]


# ---------------------------------------------------------------- W8A8


@pytest.mark.parametrize("m,k,n", INTERPRET_CASES)
def test_w8a8_interpret(m, k, n):
  x, w = _data(m, k, n)
  w_q, w_s = qm.quantize_w8(w)
  x_q, x_s = qm.quantize_activations_int8(x)
  acc = qm.int8_matmul(x_q, w_q, interpret=True)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(acc, qm.int8_matmul_reference(x_q, w_q))
  out = qm.w8a8_matmul(x, w_q, w_s, interpret=True)
  ref = qm.w8a8_matmul_reference(x, w_q, w_s)
  _close(out, ref, 1e-6)
  exact = x @ w
  assert _rel(ref, exact) < 0.03 and _rel(out, exact) < 0.03


def test_w8a8_extreme_values_exact():
  """Saturated int8 inputs: the int32 accumulation must still be exact."""
  x_q = jnp.full((8, 1536), -128, jnp.int8)
  w_q = jnp.full((1536, 256), 127, jnp.int8).at[::2].set(-128)
  acc = qm.int8_matmul(x_q, w_q, interpret=True)
  np.testing.assert_array_equal(acc, qm.int8_matmul_reference(x_q, w_q))


@settings(max_examples=2, deadline=None)
@given(m=st.integers(1, 40), kb=st.integers(1, 4), nb=st.integers(1, 2), seed=st.integers(0, 99))
def test_w8a8_generated(m, kb, nb, seed):
  k, n = 128 * kb, 128 * nb
  x, w = _data(m, k, n, seed)
  w_q, w_s = qm.quantize_w8(w)
  x_q, _ = qm.quantize_activations_int8(x)
  np.testing.assert_array_equal(
    qm.int8_matmul(x_q, w_q, interpret=True), qm.int8_matmul_reference(x_q, w_q)
  )
  assert _rel(qm.w8a8_matmul(x, w_q, w_s, interpret=True), x @ w) < 0.03


def _w8a8_export_args(m, k, n):
  return [_sds((m, k), jnp.bfloat16), _sds((k, n), jnp.int8), _sds((1, n), jnp.float32)]


# ---------------------------------------------------------------- W4A8 (FireQ)

_FIREQ_CASES = [(m, k, n, None) for (m, k, n) in INTERPRET_CASES] + [
  (8, 576, 192, 32),
  (8, 1536, 576, 128),
]


@pytest.mark.parametrize("m,k,n,group", _FIREQ_CASES)
def test_w4a8_fireq_interpret(m, k, n, group):
  x, w = _data(m, k, n)
  w_q, w_s, t_s = qm.quantize_w4_fireq(w, group)
  out = qm.w4a8_fireq_matmul(x, w_q, w_s, t_s, interpret=True)
  ref = qm.w4a8_fireq_matmul_reference(x, w_q, w_s, t_s)
  _close(out, ref, 1e-5)
  bound = 0.2 if group is None else 0.15
  exact = x @ w
  assert _rel(ref, exact) < bound and _rel(out, exact) < bound


@pytest.mark.parametrize("per_token", [True, False])
def test_w4a8_fireq_fp8_dot_and_per_tensor(per_token):
  x, w = _data(8, 256, 256)
  w_q, w_s, t_s = qm.quantize_w4_fireq(w)
  out = qm.w4a8_fireq_matmul(
    x, w_q, w_s, t_s, per_token=per_token, dot_dtype=jnp.float8_e4m3fn, interpret=True
  )
  ref = qm.w4a8_fireq_matmul_reference(x, w_q, w_s, t_s, per_token=per_token)
  _close(out, ref, 1e-5)
  assert _rel(out, x @ w) < 0.2


@settings(max_examples=2, deadline=None)
@given(m=st.integers(1, 40), kg=st.integers(1, 4), nb=st.integers(1, 2), seed=st.integers(0, 99))
def test_w4a8_fireq_generated(m, kg, nb, seed):
  k, n = 64 * kg, 128 * nb
  x, w = _data(m, k, n, seed)
  w_q, w_s, t_s = qm.quantize_w4_fireq(w, 32 if seed % 2 else None)
  out = qm.w4a8_fireq_matmul(x, w_q, w_s, t_s, interpret=True)
  _close(out, qm.w4a8_fireq_matmul_reference(x, w_q, w_s, t_s), 1e-5)
  assert _rel(out, x @ w) < 0.2


def _w4a8_export_args(m, k, n, group=None):
  g = k if group is None else group
  return [
    _sds((m, k), jnp.bfloat16),
    _sds((k // 2, n), jnp.int8),
    _sds((k // g, n), jnp.float32),
    _sds((1, 1), jnp.float32),
  ]


# ---------------------------------------------------------------- export lowering

_EXPORTS = {
  "w4a16": (w4a16.w4a16_matmul, _w4a16_export_args),
  "w8a8": (w8a8.w8a8_matmul, _w8a8_export_args),
  "w4a8": (w4a8_fireq.w4a8_fireq_matmul, _w4a8_export_args),
  "w4a8_g": (
    w4a8_fireq.w4a8_fireq_matmul,
    lambda m, k, n: _w4a8_export_args(m, k, n, _group(k)),
  ),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("variant", list(_EXPORTS))
@pytest.mark.parametrize("k,n", EXPORT_SHAPES)
def test_export_lowers(platform, variant, k, n):
  fn, make_args = _EXPORTS[variant]
  cp = common.triton_params() if platform == "cuda" else None
  for m in (1, 128):  # M=8 pads to the same 16-row block as M=1: identical kernel
    args = make_args(m, k, n)
    f = jax.jit(lambda *a, fn=fn, cp=cp: fn(*a, compiler_params=cp))
    exp = jax.export.export(f, platforms=[platform], disabled_checks=_TRITON_CHECK)(*args)
    assert exp.out_avals[0].shape == (m, n)
    text = exp.mlir_module()
    assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_w4a16_g128_padded_k_lowers(platform):
  """SmolLM2's K=576 padded to 640 for g=128 (chunks of 64 rows straddle the half)."""
  cp = common.triton_params() if platform == "cuda" else None
  f = jax.jit(lambda *a: qm.w4a16_matmul(*a, compiler_params=cp))
  args = [_sds((8, 640), jnp.bfloat16), _sds((320, 576), jnp.int8)]
  args += [_sds((5, 576), jnp.bfloat16)] * 2
  exp = jax.export.export(f, platforms=[platform], disabled_checks=_TRITON_CHECK)(*args)
  assert exp.out_avals[0].shape == (8, 576)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_fp8_dot_lowers(platform):
  cp = common.triton_params() if platform == "cuda" else None
  f = jax.jit(lambda *a: qm.w4a8_fireq_matmul(*a, dot_dtype=jnp.float8_e4m3fn, compiler_params=cp))
  args = _w4a8_export_args(128, 4096, 14336)
  jax.export.export(f, platforms=[platform], disabled_checks=_TRITON_CHECK)(*args)


# ---------------------------------------------------------------- bad inputs


def test_bad_dtype_raises():
  x, w = _data(8, 256, 128)
  w_q, s, z = qm.quantize_w4a16(w, 128)
  with pytest.raises(ValueError, match="x has dtype int32"):
    qm.w4a16_matmul(x.astype(jnp.int32), w_q, s, z)
  with pytest.raises(ValueError, match="w_q has dtype float32"):
    qm.w8a8_matmul(x, w.astype(jnp.float32), jnp.ones((1, 128)))
  w4, ws, ts = qm.quantize_w4_fireq(w)
  x_q, x_s = qm.quantize_activations_int8(x)
  w8, w8s = qm.quantize_w8(w)
  with pytest.raises(ValueError, match="out_dtype has dtype int32"):
    qm.w8a8_matmul_quantized(x_q, x_s, w8, w8s, out_dtype=np.int32)
  with pytest.raises(ValueError, match="x_fp8 has dtype bfloat16"):
    qm.w4a8_fireq_matmul_quantized(x.astype(jnp.bfloat16), jnp.ones((8, 1)), w4, ws, ts)


def _kernel_calls(x):
  """Every matmul kernel entry point, called on activations `x` [M, 256] (any M)."""
  _, w = _data(1, 256, 128)
  w8, w8s = qm.quantize_w8(w)
  w4, s4, z4 = qm.quantize_w4a16(w, 128)
  wf, wfs, ts = qm.quantize_w4_fireq(w)
  m = len(x) if isinstance(x, list) else x.shape[0]
  x_q, x_fp8 = jnp.zeros((m, 256), jnp.int8), jnp.zeros((m, 256), jnp.float8_e4m3fn)
  x_s = jnp.ones((m, 1), jnp.float32)
  if isinstance(x, list):  # the already-quantized entries get the list as their x too
    x_q = x_fp8 = x
  kw = dict(interpret=True)
  return {
    "int8_matmul": lambda: qm.int8_matmul(x_q, w8, **kw),
    "w8a8_matmul_quantized": lambda: qm.w8a8_matmul_quantized(x_q, x_s, w8, w8s, **kw),
    "w8a8_matmul": lambda: qm.w8a8_matmul(x, w8, w8s, **kw),
    "w4a16_matmul": lambda: qm.w4a16_matmul(x, w4, s4, z4, **kw),
    "w4a8_fireq_matmul_quantized": lambda: qm.w4a8_fireq_matmul_quantized(
      x_fp8, x_s, wf, wfs, ts, **kw
    ),
    "w4a8_fireq_matmul": lambda: qm.w4a8_fireq_matmul(x, wf, wfs, ts, **kw),
  }


_KERNELS = [
  "int8_matmul",
  "w8a8_matmul_quantized",
  "w8a8_matmul",
  "w4a16_matmul",
  "w4a8_fireq_matmul_quantized",
  "w4a8_fireq_matmul",
]


@pytest.mark.parametrize("kernel", _KERNELS)
def test_zero_rows_and_list_input_raise_before_lowering(kernel):
  """M=0 is a ValueError naming the argument and its shape (it used to fail inside
  the HLO interpreter); a Python list is a TypeError naming the argument and type
  (it used to be an AttributeError)."""
  with pytest.raises(ValueError, match=r"^\w+: x(_q|_fp8)? has shape \(0, 256\); every dimension"):
    _kernel_calls(jnp.zeros((0, 256), jnp.float32))[kernel]()
  with pytest.raises(TypeError, match=r"^\w+: x(_q|_fp8)? must be a jax or numpy array, got list"):
    _kernel_calls([[0.0] * 256] * 8)[kernel]()


def test_group_not_dividing_k_raises():
  _, w = _data(1, 576, 128)
  with pytest.raises(ValueError, match="K=576"):
    qm.quantize_w4a16(w, 128)  # 576 % 256 != 0
  with pytest.raises(ValueError, match="K=576"):
    qm.quantize_w4_fireq(w, 64)
  with pytest.raises(ValueError, match="K=576 is not divisible by group_size=128"):
    qm.quantize_w4a16(w, 128)
  x = jnp.zeros((8, 576), jnp.float32)
  w_q = jnp.zeros((288, 128), jnp.int8)
  with pytest.raises(ValueError, match="group_size must be an even"):  # g = 576 / 192 = 3
    qm.w4a16_matmul(x, w_q, jnp.ones((192, 128)), jnp.zeros((192, 128)))
  with pytest.raises(ValueError, match=r"\(7, 128\)"):  # 576 % 7 != 0
    qm.w4a16_matmul(x, w_q, jnp.ones((7, 128)), jnp.zeros((7, 128)))


def test_mismatched_shapes_raise():
  x = jnp.zeros((8, 512), jnp.float32)
  with pytest.raises(ValueError, match=r"\(128, 256\)"):
    qm.w4a16_matmul(x, jnp.zeros((128, 256), jnp.int8), jnp.ones((4, 256)), jnp.ones((4, 256)))
  with pytest.raises(ValueError, match=r"\(256, 128\)"):
    qm.int8_matmul(jnp.zeros((8, 512), jnp.int8), jnp.zeros((256, 128), jnp.int8))
  with pytest.raises(ValueError, match=r"\(1, 64\)"):
    qm.w8a8_matmul(x, jnp.zeros((512, 128), jnp.int8), jnp.ones((1, 64)))
  with pytest.raises(ValueError, match=r"\(4, 1\)"):
    qm.w4a8_fireq_matmul_quantized(
      x.astype(jnp.float8_e4m3fn),
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


# ---------------------------------------------------------------- L2a: real Mosaic compile

_L2A_CASES = [
  ("w4a16", w4a16.w4a16_matmul, _w4a16_export_args(8, 576, 192)),
  ("w4a16", w4a16.w4a16_matmul, _w4a16_export_args(128, 4096, 14336)),
  ("w8a8", w8a8.w8a8_matmul, _w8a8_export_args(8, 576, 192)),
  ("w8a8", w8a8.w8a8_matmul, _w8a8_export_args(128, 4096, 14336)),
  ("w4a8", w4a8_fireq.w4a8_fireq_matmul, _w4a8_export_args(8, 576, 192, 32)),
  ("w4a8", w4a8_fireq.w4a8_fireq_matmul, _w4a8_export_args(128, 4096, 14336)),
  (
    "w4a8_fp8",
    lambda *a: w4a8_fireq.w4a8_fireq_matmul(*a, dot_dtype=jnp.float8_e4m3fn),
    _w4a8_export_args(128, 4096, 14336, 128),
  ),
]


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:1x1", "v6e:1x1", "tpu7x:1x1x1"])
def test_tpu_full_compile(topology, monkeypatch, tmp_path):
  """Compile with libtpu's compile-only topologies (needs the libtpu wheel; else skipped).

  TPU v4 is left out on purpose: it has no int8/fp8 MXU operands (E2001), so only
  W4A16 and W4A8 with the default bf16 dot compile there.
  """
  import libtpu  # noqa: F401  (installed by `make test-chips`)
  from jax.experimental import topologies

  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  monkeypatch.setenv("TPU_LOG_DIR", str(tmp_path))
  topo = topologies.get_topology_desc(
    topology_name=topology, platform="tpu", chips_per_host_bounds=(1, 1, 1)
  )
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
  for name, fn, args in _L2A_CASES:
    sds = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    try:
      jax.jit(fn).trace(*sds).lower().compile()
    except Exception as e:  # noqa: BLE001 - report which case failed
      pytest.fail(f"{name} {[a.shape for a in args]} on {topology}: {e}")
