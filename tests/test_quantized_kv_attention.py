"""Quantized-KV (KIVI) decode attention: packing, reference, kernels, export, validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import triton as pltr

from pallas_kernels.quantized_kv_attention import (
  BlockSizes,
  compile_check,
  dense_decode_attention,
  dequantize_kv,
  quantize_keys,
  quantize_kv,
  quantized_kv_attention_reference,
  quantized_kv_decode_attention,
  quantized_kv_decode_attention_portable,
)

SMOLLM2 = (9, 3, 64)  # Hq, Hkv, D
LLAMA3_8B = (32, 8, 128)
TOL = 1e-3  # max |kernel - reference| / max |reference|
_quantize_kv = jax.jit(quantize_kv, static_argnums=(2, 3))  # one compile per shape, not per op


def _case(b, heads, t, r, bits, group_size, seed=0):
  """Random q/K/V, the packed cache, a residual window and ragged/left-padded lengths."""
  hq, hkv, d = heads
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, hkv, t, d)) + rng.standard_normal(d), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32)
  kv = _quantize_kv(k, v, bits, group_size)
  res = None
  if r:
    res = tuple(jnp.asarray(rng.standard_normal((b, hkv, r, d)), jnp.float32) for _ in range(2))
  # row 0: left padding, quantized part ends mid-block, partial residual;
  # row 1: no padding, full quantized part, full residual window.
  start = jnp.array([13, 0][:b], jnp.int32)
  qlen = jnp.array([t - group_size - 7, t][:b], jnp.int32)
  length = qlen + jnp.array([r // 2, r][:b], jnp.int32)
  return q, kv, res, start, qlen, length


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(out - ref).max() / np.abs(ref).max())


def _call(fn, q, kv, res, start, qlen, length, **kw):
  if res is None:
    return fn(q, kv, start, qlen, **kw)
  return fn(q, kv, start, qlen, length, *res, **kw)


# (heads, batch, T, residual, bits, group_size, block_t)
TPU_CASES = [
  (SMOLLM2, 2, 256, 32, 2, 32, 128),
  (SMOLLM2, 2, 512, 0, 8, 32, 256),
  (LLAMA3_8B, 1, 512, 64, 2, 128, 256),
  (LLAMA3_8B, 2, 256, 16, 4, 32, 128),
  (LLAMA3_8B, 1, 256, 32, 8, 64, 256),
]


def _case_id(c):
  return f"h{c[0][0]}-{c[0][1]}-d{c[0][2]}-b{c[1]}-t{c[2]}-r{c[3]}-{c[4]}bit-g{c[5]}"


@pytest.mark.parametrize("case", TPU_CASES, ids=_case_id)
def test_tpu_kernel_matches_reference(case):
  heads, b, t, r, bits, gs, bt = case
  q, kv, res, start, qlen, length = _case(b, heads, t, r, bits, gs)
  out = _call(
    quantized_kv_decode_attention,
    q,
    kv,
    res,
    start,
    qlen,
    length,
    bits=bits,
    group_size=gs,
    block_sizes=BlockSizes(bt),
    interpret=True,
  )
  ref = _call(
    quantized_kv_attention_reference, q, kv, res, start, qlen, length, bits=bits, group_size=gs
  )
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel_err(out, ref) <= TOL


# The portable kernel needs group_size // (8 // bits) >= 16 and power-of-2 sizes.
PORTABLE_CASES = [
  (SMOLLM2, 2, 256, 32, 2, 64, None),
  (LLAMA3_8B, 1, 256, 16, 4, 64, None),
  (SMOLLM2, 1, 256, 0, 8, 32, None),
]


@pytest.mark.parametrize("case", PORTABLE_CASES, ids=_case_id)
def test_portable_kernel_matches_reference(case):
  heads, b, t, r, bits, gs, _ = case
  q, kv, res, start, qlen, length = _case(b, heads, t, r, bits, gs, seed=1)
  out = _call(
    quantized_kv_decode_attention_portable,
    q,
    kv,
    res,
    start,
    qlen,
    length,
    bits=bits,
    group_size=gs,
    interpret=True,
  )
  ref = _call(
    quantized_kv_attention_reference, q, kv, res, start, qlen, length, bits=bits, group_size=gs
  )
  assert _rel_err(out, ref) <= TOL


@pytest.mark.parametrize(
  "kernel",
  [
    functools.partial(quantized_kv_decode_attention, block_sizes=BlockSizes(128)),
    quantized_kv_decode_attention_portable,
  ],
  ids=["tpu", "portable"],
)
def test_edge_rows(kernel):
  """Empty row -> zeros; padding reaching into the residual; residual-only row."""
  t, r, gs, bits = 256, 16, 64, 4
  q, kv, res, _, _, _ = _case(3, SMOLLM2, t, r, bits, gs, seed=2)
  start = jnp.array([40, t + 3, 0], jnp.int32)
  qlen = jnp.array([40, t, 0], jnp.int32)
  length = jnp.array([40, t + r, 9], jnp.int32)
  out = kernel(q, kv, start, qlen, length, *res, bits=bits, group_size=gs, interpret=True)
  ref = quantized_kv_attention_reference(q, kv, start, qlen, length, *res, bits=bits, group_size=gs)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert _rel_err(out, ref) <= TOL
  # Row 2 sees only residual slots 0..8 in float: plain attention over them.
  dense = dense_decode_attention(
    q[2:], res[0][2:, :, :9], res[1][2:, :, :9], jnp.ones((1, 9), bool)
  )
  np.testing.assert_allclose(np.asarray(out[2:]), np.asarray(dense), atol=1e-5)


def test_bf16_query():
  q, kv, res, start, qlen, length = _case(1, SMOLLM2, 256, 32, 4, 64, seed=3)
  qb = q.astype(jnp.bfloat16)
  out = quantized_kv_decode_attention(
    qb, kv, start, qlen, length, *res, bits=4, group_size=64, interpret=True
  )
  ref = quantized_kv_attention_reference(qb, kv, start, qlen, length, *res, bits=4, group_size=64)
  assert out.dtype == jnp.bfloat16
  assert _rel_err(out, ref) <= 1e-2  # bf16 output rounding


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip_error_bounded(bits):
  """|x - deq(q(x))| <= scale / 2 elementwise, for keys (per group/channel) and values (per token)."""
  rng = np.random.default_rng(4)
  k = jnp.asarray(rng.standard_normal((2, 3, 128, 64)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 3, 128, 64)), jnp.float32)
  gs = 32
  kv = _quantize_kv(k, v, bits, gs)
  pf = 8 // bits
  assert kv.k_packed.shape == (2, 3, 128 // pf, 64) and kv.k_packed.dtype == jnp.uint8
  assert kv.v_packed.shape == (2, 3, 128, 64 // pf)
  kd, vd = dequantize_kv(kv, bits, gs)
  k_half = jnp.repeat(kv.k_scale, gs, axis=-2) / 2
  v_half = kv.v_scale[..., None] / 2
  assert bool(jnp.all(jnp.abs(kd - k) <= k_half * (1 + 1e-5) + 1e-6))
  assert bool(jnp.all(jnp.abs(vd - v) <= v_half * (1 + 1e-5) + 1e-6))


def test_key_groups_pack_independently():
  """Packing group by group (as a cache appends full groups) equals packing all at once."""
  rng = np.random.default_rng(5)
  k = jnp.asarray(rng.standard_normal((3, 128, 64)), jnp.float32)
  whole = quantize_keys(k, 2, 32)
  parts = [quantize_keys(k[:, i : i + 32], 2, 32) for i in range(0, 128, 32)]
  for a, pieces in zip(whole, zip(*parts)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.concatenate(pieces, axis=-2)))


def test_reference_error_vs_float_attention_grows_as_bits_shrink():
  rng = np.random.default_rng(6)
  b, (hq, hkv, d), t = 2, SMOLLM2, 256
  q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32)
  start, qlen = jnp.array([0, 30]), jnp.array([t, 200])
  pos = jnp.arange(t)[None]
  exact = dense_decode_attention(q, k, v, (pos >= start[:, None]) & (pos < qlen[:, None]))
  errs = {}
  for bits in (8, 4, 2):
    kv = _quantize_kv(k, v, bits, 32)
    out = quantized_kv_attention_reference(q, kv, start, qlen, bits=bits, group_size=32)
    errs[bits] = _rel_err(out, exact)
  assert errs[8] < 0.02 and errs[4] < 0.25 and errs[2] < 1.0, errs
  assert errs[8] < errs[4] < errs[2], errs


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("heads", [SMOLLM2, LLAMA3_8B], ids=["smollm2", "llama3-8b"])
def test_tpu_kernel_exports_for_tpu(heads, bits):
  f = functools.partial(
    quantized_kv_decode_attention, bits=bits, group_size=128, block_sizes=BlockSizes(256)
  )
  exp = export.export(jax.jit(f), platforms=["tpu"])(
    *compile_check.abstract_inputs(2, heads, 1024, 128, bits, 128)
  )
  assert "tpu_custom_call" in exp.mlir_module()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("heads", [SMOLLM2, LLAMA3_8B], ids=["smollm2", "llama3-8b"])
def test_portable_kernel_exports_for_cuda_triton(heads, bits):
  f = functools.partial(
    quantized_kv_decode_attention_portable,
    bits=bits,
    group_size=128,
    compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
  )
  exp = export.export(
    jax.jit(f),
    platforms=["cuda"],
    disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*compile_check.abstract_inputs(2, heads, 1024, 128, bits, 128))
  assert "__gpu$xla.gpu.triton" in exp.mlir_module()


def _bad(**over):
  """Valid small inputs with one field replaced."""
  q, kv, res, start, qlen, length = _case(1, SMOLLM2, 256, 16, 4, 64, seed=7)
  args = dict(q=q, kv=kv, kr=res[0], vr=res[1], bits=4, group_size=64, block_t=128)
  args.update(over)
  return args


def _run_bad(kernel, a):
  kw = dict(bits=a["bits"], group_size=a["group_size"])
  if kernel is quantized_kv_decode_attention:
    kw["block_sizes"] = BlockSizes(a["block_t"])
  return kernel(a["q"], a["kv"], 0, 100, 110, a["kr"], a["vr"], interpret=True, **kw)


_kv = _bad()["kv"]
BAD_INPUTS = [
  ("bits", dict(bits=3), "bits must be one of"),
  ("gqa", dict(q=jnp.zeros((1, 8, 64))), "GQA mismatch"),
  ("head_dim_pack", dict(q=jnp.zeros((1, 9, 63))), "head_dim 63 .* not a multiple of 2"),
  (
    "head_dim",
    dict(q=jnp.zeros((1, 9, 32))),
    r"k_packed has shape \(1, 3, 128, 64\), expected \(1, 3, 128, 32\)",
  ),
  ("q_dtype", dict(q=jnp.zeros((1, 9, 64), jnp.int32)), "q must be a float array, got dtype int32"),
  (
    "k_dtype",
    dict(kv=_kv._replace(k_packed=_kv.k_packed.astype(jnp.int8))),
    "k_packed must be uint8",
  ),
  (
    "scale_shape",
    dict(kv=_kv._replace(v_scale=_kv.v_scale[..., :128])),
    r"v_scale has shape \(1, 3, 128\)",
  ),
  ("group", dict(group_size=40), "group_size 40 must be a positive multiple of 16"),
  ("t_vs_group", dict(group_size=96), "multiple of 16|not a multiple of group_size"),
  ("residual", dict(vr=None), "given together"),
  ("residual_dtype", dict(kr=jnp.zeros((1, 3, 16, 64), jnp.int8)), "k_residual must be a float"),
]


@pytest.mark.parametrize(
  "kernel",
  [quantized_kv_decode_attention, quantized_kv_decode_attention_portable],
  ids=["tpu", "portable"],
)
@pytest.mark.parametrize("name,over,msg", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise(kernel, name, over, msg):
  with pytest.raises(ValueError, match=msg):
    _run_bad(kernel, _bad(**over))


def _empty(axis: int):
  """Valid small inputs with the batch (axis 0) or the cache length (axis 2) emptied."""
  a = _bad()
  cut = lambda x: jax.lax.slice_in_dim(x, 0, 0, axis=min(axis, x.ndim - 1))
  a["kv"] = type(a["kv"])(*(cut(x) for x in a["kv"]))
  if axis == 0:
    a.update(q=a["q"][:0], kr=a["kr"][:0], vr=a["vr"][:0])
  return a


BAD_TYPES_AND_EMPTY = [
  ("q_list", lambda: _bad(q=np.zeros((1, 9, 64)).tolist()), TypeError, "q must be a jax or numpy"),
  ("kv_tuple", lambda: _bad(kv=tuple(_kv)), TypeError, "kv must be a QuantizedKV, got tuple"),
  (
    "residual_list",
    lambda: _bad(kr=np.zeros((1, 3, 16, 64)).tolist()),
    TypeError,
    "k_residual must be a jax or numpy array, got list",
  ),
  ("empty_batch", lambda: _empty(0), ValueError, r"q has shape \(0, 9, 64\); batch, heads"),
  ("empty_cache", lambda: _empty(2), ValueError, r"k_packed has shape \(1, 3, 0, 64\): an empty"),
]


@pytest.mark.parametrize(
  "kernel",
  [quantized_kv_decode_attention, quantized_kv_decode_attention_portable],
  ids=["tpu", "portable"],
)
@pytest.mark.parametrize(
  "name,make,exc,msg", BAD_TYPES_AND_EMPTY, ids=[c[0] for c in BAD_TYPES_AND_EMPTY]
)
def test_non_arrays_and_empty_dims_raise_before_lowering(kernel, name, make, exc, msg):
  """A list or a plain tuple is a TypeError naming the argument; an empty batch or
  cache is a ValueError naming the shape, before any lowering."""
  with pytest.raises(exc, match=msg):
    _run_bad(kernel, make())


@pytest.mark.parametrize(
  "block_t,msg",
  [
    (80, "block_t 80 is not a multiple of group_size 32"),
    (192, "not a multiple of block_t"),
    (64, "multiple of 128"),
  ],
)
def test_bad_block_sizes_raise(block_t, msg):
  q, kv, res, *_ = _case(1, SMOLLM2, 256, 16, 4, 32)
  a = dict(q=q, kv=kv, kr=res[0], vr=res[1], bits=4, group_size=32, block_t=block_t)
  with pytest.raises(ValueError, match=msg):
    _run_bad(quantized_kv_decode_attention, a)


def test_portable_rejects_unsupported_sizes():
  q, kv, res, *_ = _case(1, SMOLLM2, 256, 16, 2, 32)  # 2-bit g32: 8 rows per slot
  a = dict(q=q, kv=kv, kr=res[0], vr=res[1], bits=2, group_size=32, block_t=128)
  with pytest.raises(ValueError, match="group_size // pf >= 16"):
    _run_bad(quantized_kv_decode_attention_portable, a)
  r24 = jnp.zeros((1, 3, 24, 64))
  with pytest.raises(ValueError, match="power-of-2 residual length, got 24"):
    _run_bad(quantized_kv_decode_attention_portable, _bad(kr=r24, vr=r24))


def test_block_sizes_frozen_and_checked():
  bs = BlockSizes(128)
  with pytest.raises(AttributeError):
    bs.block_t = 256  # type: ignore[misc]
  with pytest.raises(ValueError, match="block_t must be positive"):
    BlockSizes(0)


# L2 checks: real compiles with the extra wheels that `make test-chips` installs
# (libtpu, triton); deselected from the default suite by the `slow` marker.
@pytest.mark.slow
def test_tpu_kernel_compiles_with_libtpu():
  results = list(compile_check.tpu_checks(t=1024, r=32, group_size=64, block_t=256))
  assert results and all(ok for _, ok, _ in results), [r for r in results if not r[1]]


@pytest.mark.slow
def test_portable_kernel_compiles_with_triton():
  results = list(compile_check.triton_checks())
  assert results and all(ok for _, ok, _ in results), [r for r in results if not r[1]]
