"""Every op split over a device mesh inside `jax.shard_map` (issue 26, item 2).

Each case runs the same jitted call without a mesh and under `jax.set_mesh` on the
8 fake CPU devices, and compares. `KernelConfig("pallas", interpret=True)` selects, on
CPU, each op's first Pallas implementation: the TPU (``mosaic_tpu``) kernel, run
interpreted; every case checks in the traced program that the kernel (a
``pallas_call``) ran inside the ``shard_map`` and that the split is the one the op's
table declares (the ``shard_map``'s in/out specs).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from op_test_base import pallas_call_names

import jaxllm
import sharding
from jaxllm import ops
from jaxllm.kv_cache.dense import DenseKVCache
from jaxllm.params import init_model, logical_axes
from jaxllm.quant import quantize, quantize_model
from pallas_kernels.block_sparse_attention.routing import pool_keys, route
from pallas_kernels.quantized_kv_attention.packing import quantize_kv

PALLAS = ops.KernelConfig("pallas", interpret=True)
BATCH = ("data", "fsdp")  # the rules' mesh axes of "batch"


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "tensor": 4})


def _shard_map(jaxpr):
  """The one shard_map equation of a traced op call."""
  found = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
  assert len(found) == 1, [e.primitive.name for e in jaxpr.jaxpr.eqns]
  return found[0]


def _split_and_unsplit(mesh, fn, *args):
  """(unsplit result, split result, the split call's shard_map equation)."""
  want = np.asarray(jax.jit(fn)(*args))
  with jax.set_mesh(mesh):
    eqn = _shard_map(jax.make_jaxpr(fn)(*args))
    got = np.asarray(jax.jit(fn)(*args))
  assert pallas_call_names(eqn.params["jaxpr"]), "no Pallas kernel ran inside the shard_map"
  return want, got, eqn


def _rel(got, want) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


# ------------------------------------------------------------------ quantized matmuls

_RNG = np.random.default_rng(0)
_X = jnp.asarray(_RNG.standard_normal((4, 256)), jnp.float32)
_W = jnp.asarray(_RNG.standard_normal((256, 256)) * 0.05, jnp.float32)


@pytest.mark.parametrize("method,group", [("w8a8", None), ("w4a16", 32), ("fireq_w4a8", 32)])
@pytest.mark.parametrize("parallel", ["column", "row"])
def test_quantized_matmul_split_equals_unsplit(mesh, method, group, parallel):
  """Column-parallel (N over tensor 4: each shard its columns, nothing summed) equals the
  unsplit call exactly. Row-parallel (K over tensor 4, partial sums psummed) equals it
  to f32 summation order. Int4 codes pack rows j and j + K/2 in one byte: x and the
  group scales split as halves [2, K/2] so each shard meets the rows its packed shard
  holds; W8A8 and FireQ quantize x per row from the whole row's maximum (`x_absmax`),
  so the shards' int8/FP8 codes are the unsplit call's."""
  qw = quantize(_W, method, group_size=group)
  axes = ("embed", "mlp") if parallel == "column" else ("mlp", "embed")
  want, got, eqn = _split_and_unsplit(
    mesh, lambda x, w: ops.linear(x, w, PALLAS, axes=axes), _X, qw
  )
  x_spec, w_spec = eqn.params["in_specs"][:2]
  int4 = method != "w8a8"
  if parallel == "column":
    np.testing.assert_array_equal(got, want)
    assert w_spec == P(None, "tensor") and eqn.params["out_specs"] == (P(BATCH, "tensor"),)
  else:
    assert _rel(got, want) <= 1e-6, _rel(got, want)
    assert w_spec == P("tensor", None) and eqn.params["out_specs"] == (P(BATCH, None),)
    assert x_spec == (P(BATCH, None, "tensor") if int4 else P(BATCH, "tensor"))


def test_per_row_activation_scale_spans_the_whole_row(mesh):
  """A row whose largest entry sits in one K shard: W8A8 row-parallel must quantize the
  other shards on that row's scale, not their own (which would round them finer)."""
  x = _X.at[:, 3].set(40.0)  # K shard 0 of 4 holds every row's maximum
  qw = quantize(_W, "w8a8")
  fn = lambda x, w: ops.linear(x, w, PALLAS, axes=("mlp", "embed"))  # noqa: E731
  want, got, _ = _split_and_unsplit(mesh, fn, x, qw)
  assert _rel(got, want) <= 1e-6, _rel(got, want)


# ------------------------------------------------------------------ attention ops

_B, _S, _T, _HQ, _HKV, _D = 2, 16, 32, 8, 4, 64
_Q = jnp.asarray(_RNG.standard_normal((_B, _S, _HQ, _D)), jnp.float32)
_K = jnp.asarray(_RNG.standard_normal((_B, _HKV, _T, _D)), jnp.float32)
_V = jnp.asarray(_RNG.standard_normal((_B, _HKV, _T, _D)), jnp.float32)
_SLOTS = jnp.broadcast_to(jnp.arange(_T - _S, _T, dtype=jnp.int32), (_B, _S))
_START = jnp.array([0, 5], jnp.int32)
_HEADS_SPLIT = P(BATCH, None, "tensor", None)  # q and out: [B, S, Hq, D]
_KV_SPLIT = P(BATCH, "tensor", None, None)  # k, v: [B, Hkv, T, D]


def test_flash_attention_splits_by_kv_head(mesh):
  """8 query / 4 KV heads on tensor 4: each shard attends with its 2 query heads and
  their KV head; per-head work is the unsplit call's, so the result is identical."""
  fn = lambda *a: ops.attention(*a, config=PALLAS)  # noqa: E731
  want, got, eqn = _split_and_unsplit(mesh, fn, _Q, _K, _V, _SLOTS, _START)
  assert "flash_attention" in pallas_call_names(eqn.params["jaxpr"])
  assert eqn.params["in_specs"][:3] == (_HEADS_SPLIT, _KV_SPLIT, _KV_SPLIT)
  assert eqn.params["out_specs"] == (_HEADS_SPLIT,)
  np.testing.assert_array_equal(got, want)


def test_block_sparse_attention_splits_heads_with_their_routing(mesh):
  idx = route(_Q, pool_keys(_K, _START, 16), _SLOTS, _START, block_q=16, block_k=16, top_k=1)
  fn = lambda *a: ops.block_sparse_attention(*a, block_q=16, block_k=16, config=PALLAS)  # noqa: E731
  want, got, eqn = _split_and_unsplit(mesh, fn, _Q, _K, _V, _SLOTS, _START, idx)
  assert eqn.params["in_specs"][5] == P(BATCH, "tensor", None, None)  # routing per KV head
  assert eqn.params["out_specs"] == (_HEADS_SPLIT,)
  np.testing.assert_array_equal(got, want)


def test_quantized_kv_decode_kernel_splits_by_kv_head(mesh):
  """The KIVI decode kernel (4-bit, group 32, a residual window), ragged rows."""
  kv = quantize_kv(_K, _V, 4, 32)
  res = [jnp.asarray(_RNG.standard_normal((_B, _HKV, 16, _D)), jnp.float32) for _ in range(2)]
  qlen, length = jnp.array([32, 30], jnp.int32), jnp.array([40, 46], jnp.int32)

  def fn(q, kv, start, qlen, length, kr, vr):
    return ops.quantized_kv_attention(
      q, kv, start, qlen, length, kr, vr, bits=4, group_size=32, config=PALLAS
    )

  want, got, eqn = _split_and_unsplit(mesh, fn, _Q[:, 0], kv, _START, qlen, length, *res)
  assert eqn.params["in_specs"][0] == P(BATCH, "tensor", None)
  assert all(spec[1] == "tensor" for spec in eqn.params["in_specs"][1:7])  # kv arrays
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("hq,hkv", [(6, 3), (8, 2)])
def test_heads_the_mesh_does_not_divide_stay_whole(mesh, hq, hkv):
  """3 KV heads on tensor 4, or 8 query heads with 2 KV heads (the query heads divide,
  the KV heads do not; the two are tied, so whole GQA groups stay together): the heads
  are replicated for the call (batch still splits) and the result is the unsplit one."""
  q, k, v = _Q[:, :, :hq], _K[:, :hkv], _V[:, :hkv]
  cfg = ops.KernelConfig("xla")
  fn = lambda *a: ops.attention(*a, config=cfg)  # noqa: E731
  want = np.asarray(jax.jit(fn)(q, k, v, _SLOTS, _START))
  with jax.set_mesh(mesh):
    eqn = _shard_map(jax.make_jaxpr(fn)(q, k, v, _SLOTS, _START))
    got = np.asarray(jax.jit(fn)(q, k, v, _SLOTS, _START))
  assert _rel(got, want) <= 1e-6, _rel(got, want)  # XLA's dots differ at batch 1 and 2
  assert eqn.params["in_specs"][:2] == (P(BATCH, None, None, None), P(BATCH, None, None, None))


def test_one_row_stays_whole(mesh):
  """A decode step of one row: rows of size 1 are not split (nor is the output's), the
  weight's columns still are."""
  fn = lambda x, w: ops.linear(x, w, axes=("embed", "mlp"))  # noqa: E731
  want = np.asarray(jax.jit(fn)(_X[:1], _W))
  with jax.set_mesh(mesh):
    eqn = _shard_map(jax.make_jaxpr(fn)(_X[:1], _W))
    got = np.asarray(jax.jit(fn)(_X[:1], _W))
  assert eqn.params["out_specs"] == (P(None, "tensor"),)
  assert _rel(got, want) <= 1e-6, _rel(got, want)


def test_no_mesh_no_shard_map():
  """Without a mesh a call is the implementation's alone (nothing wraps it)."""
  jaxpr = jax.make_jaxpr(lambda x, w: ops.linear(x, w, axes=("mlp", "embed")))(_X, _W)
  assert "shard_map" not in {e.primitive.name for e in jaxpr.jaxpr.eqns}


# ------------------------------------------------------------------ the model


def _place(model, mesh):
  graphdef, state = nnx.split(model)
  state.replace_by_pure_dict(sharding.shard_params(state.to_pure_dict(), logical_axes(model), mesh))
  return graphdef, state


@pytest.mark.parametrize(
  "weights,kernels",
  [
    ("float", {"flash_attention"}),
    pytest.param("w4a16", {"flash_attention", "w4a16_matmul"}, marks=pytest.mark.slow),
  ],
)
def test_tiny_model_under_pallas_split_equals_unsplit(weights, kernels):
  """The tiny model with KernelConfig("pallas", interpret) on data 2 x tensor 2: attention
  runs the flash kernel per (batch, KV head) shard, q/k/v/gate/up split by columns and
  o/down by rows (psum). With W4A16 weights (group 32; slow tier) every linear runs the
  w4a16 kernel too, o/down through the halves split. Logits equal the unsplit run's
  within 1e-4 of their largest magnitude."""
  model = init_model(jaxllm.TINY, seed=0, kernels=PALLAS)
  if weights != "float":
    model = quantize_model(model, weights, 32)
  tokens = np.random.default_rng(1).integers(0, 512, size=(2, 16)).astype(np.int32)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
  want = np.asarray(forward(state, tokens))
  mesh = sharding.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
  _, placed = _place(model, mesh)
  with jax.set_mesh(mesh):
    names = pallas_call_names(jax.make_jaxpr(forward)(placed, tokens).jaxpr)
    got = np.asarray(forward(placed, tokens))
  assert kernels <= set(names), names
  assert _rel(got, want) <= 1e-4, _rel(got, want)


# ------------------------------------------------------------------ HLO: head-parallel

_ALL_GATHER = re.compile(r"= (\S+) all-gather(?:-start)?\(")
_MOVE = re.compile(r" (?:collective-permute|all-to-all)(?:-start)?\(")


def _moves(hlo: str) -> list[str]:
  """The compiled program's collective-permutes and all-to-alls (data moved between
  devices by a resharding), one line each."""
  return [line.strip() for line in hlo.splitlines() if _MOVE.search(line)]


def _float_all_gathers(hlo: str) -> list[str]:
  """The result types of the compiled program's all-gathers of floating-point arrays."""
  return [m.group(1) for m in _ALL_GATHER.finditer(hlo) if m.group(1).startswith(("f", "bf"))]


@pytest.mark.parametrize(
  "tensor,heads,batch",
  [(2, (6, 2), 4), (4, (8, 4), 4)],
  ids=["data2xtensor2", "data2xtensor4"],
)
def test_compiled_forward_gathers_no_q_k_or_v(tensor, heads, batch):
  """The tiny model's prefill and one decode step over a dense cache, compiled for data 2
  x tensor (default kernels, xla attention): the compiled HLO holds no all-gather of a
  floating-point array, so q, k and v (and every other activation and weight) stay
  split by head; the only all-gather allowed is an integer one (the rows' lengths).
  Row-parallel o/down projections show as all-reduces. The cache is placed as the rules
  name it (batch over data, KV heads over tensor), and no collective-permute or
  all-to-all moves it between devices. Logits equal the unsplit run's."""
  cfg = jaxllm.TINY.replace(name="tiny-hp", num_heads=heads[0], num_kv_heads=heads[1])
  model = init_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  tokens = np.random.default_rng(2).integers(0, 512, size=(batch, 9)).astype(np.int32)
  prefill = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
  decode = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, c)[0])
  _, cache = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens[:, :8])
  cache = cache.grow(16)
  want = [np.asarray(prefill(state, tokens)), np.asarray(decode(state, tokens[:, 8:], cache))]

  mesh = sharding.make_mesh({"data": 2, "tensor": tensor}, devices=jax.devices()[: 2 * tensor])
  _, placed = _place(model, mesh)
  rows = NamedSharding(
    mesh, sharding.logical_to_spec(DenseKVCache.LOGICAL_AXES, mesh_axes=mesh.axis_names)
  )
  cache = cache.replace(
    keys=tuple(jax.device_put(k, rows) for k in cache.keys),
    values=tuple(jax.device_put(v, rows) for v in cache.values),
  )
  with jax.set_mesh(mesh):
    for fn, args, expected in (
      (prefill, (placed, tokens), want[0]),
      (decode, (placed, tokens[:, 8:], cache), want[1]),
    ):
      compiled = fn.lower(*args).compile()
      hlo = compiled.as_text()
      assert _float_all_gathers(hlo) == [], _float_all_gathers(hlo)
      assert _moves(hlo) == [], _moves(hlo)
      assert " all-reduce(" in hlo
      got = np.asarray(compiled(*args))
      assert _rel(got, expected) <= 1e-5, _rel(got, expected)
