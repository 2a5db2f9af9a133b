"""Quantized-KV (KIVI) decode attention: the op's `OpSuite` over every implementation in
its table, plus packing, the TPU kernel's block sizes and the portable kernel's rules.

Tolerances: every implementation within 1e-3 (max abs error / max |ref|) of the op's
reference and of a float64 numpy attention over the dequantized cache (1e-2 for a
bfloat16 query, whose output is rounded to bfloat16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from op_test_base import EXPORT_PLATFORMS, BadInput, Case, Export, OpSuite, fast_jit, rel_max

from pallas_kernels import compile_cases, registry, shapes
from pallas_kernels.quantized_kv_attention import (
  BlockSizes,
  dense_decode_attention,
  dequantize_kv,
  quantize_keys,
  quantize_kv,
  quantized_kv_attention_reference,
  quantized_kv_decode_attention,
  quantized_kv_decode_attention_portable,
)

OP = registry.get("quantized_kv_attention")
SMOLLM2 = shapes.SMOLLM2.kv_heads  # (Hq, Hkv, D)
LLAMA3_8B = shapes.LLAMA3_8B.kv_heads
HEADS = {"smollm2": SMOLLM2, "llama3_8b": LLAMA3_8B}
TOL = 1e-3  # max |out - ref| / max |ref|
_quantize_kv = fast_jit(quantize_kv, static_argnums=(2, 3))  # one compile per shape, not per op
_dequantize_kv = fast_jit(dequantize_kv, static_argnums=(1, 2))


@functools.cache
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


def _op_args(q, kv, res, start, qlen, length):
  return (q, kv, start, qlen) if res is None else (q, kv, start, qlen, length, *res)


def _numpy_attention(args, bits, group_size):
  """Float64 numpy decode attention over the dequantized cache (and residual window):
  independent of every implementation's attention and masking; a row that sees no
  slot gives zeros."""
  q, kv, start, qlen = args[:4]
  b, hq, d = q.shape
  k, v = (np.asarray(x, np.float64) for x in _dequantize_kv(kv, bits, group_size))
  t = k.shape[2]
  pos = np.broadcast_to(np.arange(t), (b, t))
  qlen = np.broadcast_to(np.asarray(qlen), (b,))
  start = np.broadcast_to(np.asarray(start), (b,))
  valid = (pos >= start[:, None]) & (pos < qlen[:, None])
  if len(args) > 4:
    length, kr, vr = np.broadcast_to(np.asarray(args[4]), (b,)), args[5], args[6]
    r = kr.shape[2]
    k = np.concatenate([k, np.asarray(kr, np.float64)], axis=2)
    v = np.concatenate([v, np.asarray(vr, np.float64)], axis=2)
    pos_r = qlen[:, None] + np.arange(r)[None]
    valid = np.concatenate([valid, (pos_r >= start[:, None]) & (pos_r < length[:, None])], axis=1)
  g = hq // k.shape[1]
  out = np.zeros((b, hq, d))
  for bi in range(b):
    if not valid[bi].any():
      continue
    for h in range(hq):
      s = k[bi, h // g][valid[bi]] @ np.asarray(q[bi, h], np.float64) / np.sqrt(d)
      p = np.exp(s - s.max())
      out[bi, h] = (p / p.sum()) @ v[bi, h // g][valid[bi]]
  return out


def _kv_case(case_id, heads, b, t, r, bits, gs, seed=0, refuse=None, q_dtype=None):
  tol = TOL if q_dtype is None else 1e-2

  def make():
    q, kv, res, start, qlen, length = _case(b, heads, t, r, bits, gs, seed)
    q = q if q_dtype is None else q.astype(q_dtype)
    return _op_args(q, kv, res, start, qlen, length), dict(bits=bits, group_size=gs)

  @functools.cache
  def expected():
    return _numpy_attention(make()[0], bits, gs)

  def check(out, args, kwargs):
    del args, kwargs
    err = _rel_err(out, expected())
    assert err <= tol, f"vs numpy: {err:.3g} > {tol}"

  return Case(case_id, make, rel_max(tol), check, refuse or {}, dtype=q_dtype)


def _edge_rows():
  """Empty row -> zeros; padding reaching into the residual; residual-only row."""
  t, r, gs, bits = 256, 16, 64, 4

  def make():
    q, kv, res, _, _, _ = _case(3, SMOLLM2, t, r, bits, gs, seed=2)
    start = jnp.array([40, t + 3, 0], jnp.int32)
    qlen = jnp.array([40, t, 0], jnp.int32)
    length = jnp.array([40, t + r, 9], jnp.int32)
    return (q, kv, start, qlen, length, *res), dict(bits=bits, group_size=gs)

  @functools.cache
  def expected():
    return _numpy_attention(make()[0], bits, gs)

  def check(out, args, kwargs):
    del kwargs
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    assert _rel_err(out, expected()) <= TOL
    # Row 2 sees only residual slots 0..8 in float: plain attention over them.
    q, kr, vr = args[0], args[5], args[6]
    dense = dense_decode_attention(q[2:], kr[2:, :, :9], vr[2:, :, :9], jnp.ones((1, 9), bool))
    np.testing.assert_allclose(np.asarray(out[2:]), np.asarray(dense), atol=1e-5)

  return Case("edge_rows", make, rel_max(TOL), check)


def _bad(**over):
  """Valid small inputs with one field replaced."""
  q, kv, res, start, qlen, length = _case(1, SMOLLM2, 256, 16, 4, 64, seed=7)
  args = dict(q=q, kv=kv, kr=res[0], vr=res[1], bits=4, group_size=64, block_t=128)
  args.update(over)
  return args


def _op_inputs(a):
  return (a["q"], a["kv"], 0, 100, 110, a["kr"], a["vr"]), dict(
    bits=a["bits"], group_size=a["group_size"]
  )


def _run_bad(kernel, a):
  kw = dict(bits=a["bits"], group_size=a["group_size"])
  if kernel is quantized_kv_decode_attention:
    kw["block_sizes"] = BlockSizes(a["block_t"])
  return kernel(a["q"], a["kv"], 0, 100, 110, a["kr"], a["vr"], interpret=True, **kw)


def _empty(axis: int):
  """Valid small inputs with the batch (axis 0) or the cache length (axis 2) emptied."""
  a = _bad()
  cut = lambda x: jax.lax.slice_in_dim(x, 0, 0, axis=min(axis, x.ndim - 1))
  a["kv"] = type(a["kv"])(*(cut(x) for x in a["kv"]))
  if axis == 0:
    a.update(q=a["q"][:0], kr=a["kr"][:0], vr=a["vr"][:0])
  return a


def _kv_replaced(**fns):
  """The valid cache with some fields transformed."""
  kv = _bad()["kv"]
  return kv._replace(**{name: fn(getattr(kv, name)) for name, fn in fns.items()})


# (id, make the inputs, exception, message)
_BAD = [
  ("bits", lambda: _bad(bits=3), ValueError, "bits must be one of"),
  ("gqa", lambda: _bad(q=jnp.zeros((1, 8, 64))), ValueError, "GQA mismatch"),
  (
    "head_dim_pack",
    lambda: _bad(q=jnp.zeros((1, 9, 63))),
    ValueError,
    "head_dim 63 .* not a multiple of 2",
  ),
  (
    "head_dim",
    lambda: _bad(q=jnp.zeros((1, 9, 32))),
    ValueError,
    r"k_packed has shape \(1, 3, 128, 64\), expected \(1, 3, 128, 32\)",
  ),
  (
    "q_dtype",
    lambda: _bad(q=jnp.zeros((1, 9, 64), jnp.int32)),
    ValueError,
    "q must be a float array, got dtype int32",
  ),
  (
    "k_dtype",
    lambda: _bad(kv=_kv_replaced(k_packed=lambda x: x.astype(jnp.int8))),
    ValueError,
    "k_packed must be uint8",
  ),
  (
    "scale_shape",
    lambda: _bad(kv=_kv_replaced(v_scale=lambda x: x[..., :128])),
    ValueError,
    r"v_scale has shape \(1, 3, 128\)",
  ),
  (
    "group",
    lambda: _bad(group_size=40),
    ValueError,
    "group_size 40 must be a positive multiple of 16",
  ),
  (
    "t_vs_group",
    lambda: _bad(group_size=96),
    ValueError,
    "multiple of 16|not a multiple of group_size",
  ),
  ("residual", lambda: _bad(vr=None), ValueError, "given together"),
  (
    "residual_dtype",
    lambda: _bad(kr=jnp.zeros((1, 3, 16, 64), jnp.int8)),
    ValueError,
    "k_residual must be a float",
  ),
  ("q_list", lambda: _bad(q=np.zeros((1, 9, 64)).tolist()), TypeError, "q must be a jax or numpy"),
  (
    "kv_tuple",
    lambda: _bad(kv=tuple(_bad()["kv"])),
    TypeError,
    "kv must be a QuantizedKV, got tuple",
  ),
  (
    "residual_list",
    lambda: _bad(kr=np.zeros((1, 3, 16, 64)).tolist()),
    TypeError,
    "k_residual must be a jax or numpy array, got list",
  ),
  ("empty_batch", lambda: _empty(0), ValueError, r"q has shape \(0, 9, 64\); batch, heads"),
  ("empty_cache", lambda: _empty(2), ValueError, r"k_packed has shape \(1, 3, 0, 64\): an empty"),
]


# The portable (triton) kernel's Triton dot tiles need group_size // (8 // bits) >= 16.
_TRITON_ROWS = r"group_size // pf >= 16"


class TestQuantizedKVAttention(OpSuite):
  OP = OP
  # (heads, batch, T, residual, bits, group_size); T=512 takes two default-size (256) blocks.
  # The first five were the TPU kernel's cases, the next three the portable kernel's.
  NUMERICS = (
    _kv_case(
      "smollm2-b2-t512-r32-2bit-g32", SMOLLM2, 2, 512, 32, 2, 32, refuse={"triton": _TRITON_ROWS}
    ),
    _kv_case("smollm2-b2-t512-r0-8bit-g32", SMOLLM2, 2, 512, 0, 8, 32),
    _kv_case("llama3_8b-b1-t512-r64-2bit-g128", LLAMA3_8B, 1, 512, 64, 2, 128),
    _kv_case("llama3_8b-b2-t512-r16-4bit-g32", LLAMA3_8B, 2, 512, 16, 4, 32),
    _kv_case("llama3_8b-b1-t256-r32-8bit-g64", LLAMA3_8B, 1, 256, 32, 8, 64),
    _kv_case("smollm2-b2-t256-r32-2bit-g64", SMOLLM2, 2, 256, 32, 2, 64, seed=1),
    _kv_case("llama3_8b-b1-t256-r16-4bit-g64", LLAMA3_8B, 1, 256, 16, 4, 64, seed=1),
    _kv_case("smollm2-b1-t256-r0-8bit-g32", SMOLLM2, 1, 256, 0, 8, 32, seed=1),
    _edge_rows(),
    _kv_case("bf16_query", SMOLLM2, 1, 256, 32, 4, 64, seed=3, q_dtype=jnp.bfloat16),
  )
  # Export: SmolLM2 at 4 bits, Llama-3-8B at 2 bits (`test_kernel_exports_lower` sweeps
  # the kernels over both models and all bit widths).
  EXPORTS = tuple(
    Export(
      f"{model}-{bits}bit",
      tuple(compile_cases.kv_inputs(2, HEADS[model], 1024, 128, bits, 128)),
      dict(bits=bits, group_size=128),
      (2, HEADS[model][0], HEADS[model][2]),
    )
    for model, bits in (("smollm2", 4), ("llama3_8b", 2))
  )
  BAD_INPUTS = tuple(
    BadInput(name, lambda make=make: _op_inputs(make()), exc, msg) for name, make, exc, msg in _BAD
  )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("model", list(HEADS))
def test_kernel_exports_lower(platform, model, bits):
  """The platform's Pallas implementation (mosaic_tpu: block_t 256; triton) lowers for
  both models' heads at every bit width (T=1024, a 128-slot window, group 128)."""
  op_platform, kernel_call = EXPORT_PLATFORMS[platform]
  args = compile_cases.kv_inputs(2, HEADS[model], 1024, 128, bits, 128)
  # The implementation's own function (the op's selection is the suite's export cases).
  kernel = OP.get("mosaic_tpu" if platform == "tpu" else "triton").fn
  assert OP.select("pallas", op_platform, *args, bits=bits, group_size=128).fn is kernel
  f = functools.partial(kernel, bits=bits, group_size=128)
  exp = export.export(
    jax.jit(f),
    platforms=[platform],
    disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*args)
  assert kernel_call in exp.mlir_module()


# ---------------------------------------------------------------- the TPU kernel's block sizes


def test_tpu_kernel_small_blocks_match_reference():
  """block_t=128 over T=512: four blocks, the first partly before `start`, the last
  past `quantized_length` (skipped steps re-use the clamped block)."""
  case = TestQuantizedKVAttention.NUMERICS[0]  # SmolLM2, T=512, 2-bit keys in groups of 32
  args, kw = TestQuantizedKVAttention.inputs(case)
  kernel = functools.partial(
    quantized_kv_decode_attention, **kw, block_sizes=BlockSizes(128), interpret=True
  )
  out = fast_jit(kernel)(*args)
  assert out.shape == args[0].shape and out.dtype == args[0].dtype
  assert _rel_err(out, TestQuantizedKVAttention.reference_output(case)) <= TOL


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


def test_block_sizes_frozen_and_checked():
  bs = BlockSizes(128)
  with pytest.raises(AttributeError):
    bs.block_t = 256  # type: ignore[misc]
  with pytest.raises(ValueError, match="block_t must be positive"):
    BlockSizes(0)


def test_portable_rejects_unsupported_sizes():
  """The Triton tiling rules, from the kernel itself (the op refuses with them)."""
  q, kv, res, *_ = _case(1, SMOLLM2, 256, 16, 2, 32)  # 2-bit g32: 8 rows per slot
  a = dict(q=q, kv=kv, kr=res[0], vr=res[1], bits=2, group_size=32, block_t=128)
  with pytest.raises(ValueError, match="group_size // pf >= 16"):
    _run_bad(quantized_kv_decode_attention_portable, a)
  r24 = jnp.zeros((1, 3, 24, 64))
  with pytest.raises(ValueError, match="power-of-2 residual length, got 24"):
    _run_bad(quantized_kv_decode_attention_portable, _bad(kr=r24, vr=r24))


# ---------------------------------------------------------------- packing and the reference


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
  kd, vd = _dequantize_kv(kv, bits, gs)
  k_half = jnp.repeat(kv.k_scale, gs, axis=-2) / 2
  v_half = kv.v_scale[..., None] / 2
  assert bool(jnp.all(jnp.abs(kd - k) <= k_half * (1 + 1e-5) + 1e-6))
  assert bool(jnp.all(jnp.abs(vd - v) <= v_half * (1 + 1e-5) + 1e-6))


def test_key_groups_pack_independently():
  """Packing group by group (as a cache appends full groups) equals packing all at once."""
  rng = np.random.default_rng(5)
  k = jnp.asarray(rng.standard_normal((3, 128, 64)), jnp.float32)
  quantize = jax.jit(quantize_keys, static_argnums=(1, 2))
  whole = quantize(k, 2, 32)
  parts = [quantize(k[:, i : i + 32], 2, 32) for i in range(0, 128, 32)]
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
  reference = fast_jit(quantized_kv_attention_reference, static_argnames=("bits", "group_size"))
  for bits in (8, 4, 2):
    kv = _quantize_kv(k, v, bits, 32)
    out = reference(q, kv, start, qlen, bits=bits, group_size=32)
    errs[bits] = _rel_err(out, exact)
  assert errs[8] < 0.02 and errs[4] < 0.25 and errs[2] < 1.0, errs
  assert errs[8] < errs[4] < errs[2], errs
