"""MoBA block-sparse attention (`pallas_kernels.block_sparse_attention`): the op's
`OpSuite` over every implementation (numerics in interpret mode, bad inputs, exports
for tpu and cuda), the router against a brute-force numpy router, key pooling against
numpy, and "every block selected equals dense".

Independent check: a float64 numpy loop per (row, query, head) that builds the visible
set from the index table itself (``kv_start <= t <= slot`` and ``t // block_k`` among
the tile's entries) and takes a plain softmax over it; a query that sees no key is zeros.

Tolerances: float32 outputs within 1e-5 of max |ref| (the implementations differ from
the reference and from numpy only in summation order: gathered blocks, an online
softmax over blocks, float32 products; observed ~1e-6); bfloat16 within 2e-2 (inputs
and products in bfloat16, outputs rounded to bfloat16), as the flash kernels' cases.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from op_test_base import BadInput, Case, Export, OpSuite, fast_jit, rel_max, sds

from pallas_kernels import registry, shapes
from pallas_kernels.attention import attention_reference
from pallas_kernels.block_sparse_attention import blocks_read, pool_keys, route
from pallas_kernels.op_api import Platform, UnsupportedError

OP = registry.get("block_sparse_attention")
SMOLLM2, LLAMA3 = shapes.SMOLLM2.kv_heads, shapes.LLAMA3_8B.kv_heads
GPU, TPU = Platform("gpu", "NVIDIA H100 80GB HBM3"), Platform("tpu", "TPU v5 lite")


# ------------------------------------------------------------------ numpy references


def _numpy_moba(q, k, v, q_slots, start, indices, block_q, block_k):
  """float64 loop: each query's visible slots from the index table, a plain softmax."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g, nk = hq // hkv, t // block_k
  out = np.zeros(q.shape)
  for bi in range(b):
    for si in range(s):
      for h in range(hq):
        chosen = {int(j) for j in indices[bi, h // g, si // block_q] if 0 <= j < nk}
        keys = [x for x in range(start[bi], q_slots[bi, si] + 1) if x // block_k in chosen]
        if not keys:
          continue
        sc = k[bi, h // g, keys] @ q[bi, si, h] / np.sqrt(d)
        p = np.exp(sc - sc.max())
        out[bi, si, h] = (p / p.sum()) @ v[bi, h // g, keys]
  return out


def _numpy_route(q, block_keys, q_slots, start, block_q, block_k, top_k):
  """Brute force, one (row, KV head, tile) at a time, straight from `route`'s doc."""
  q, block_keys = np.asarray(q, np.float64), np.asarray(block_keys, np.float64)
  b, s, hq, _ = q.shape
  hkv, nk = block_keys.shape[1], block_keys.shape[2]
  g, t = hq // hkv, nk * block_k
  nq = -(-s // block_q)
  out = np.full((b, hkv, nq, top_k), -1, np.int32)
  for bi in range(b):
    for i in range(nq):
      queries = [
        x for x in range(i * block_q, min(s, (i + 1) * block_q)) if q_slots[bi, x] >= start[bi]
      ]
      if not queries:
        continue
      slots = [min(q_slots[bi, x], t - 1) for x in queries]
      first, last = min(slots) // block_k, max(slots) // block_k
      forced = list(range(last, first - 1, -1))  # newest first
      for h in range(hkv):
        score = {
          j: sum(q[bi, x, h * g + e] @ block_keys[bi, h, j] for x in queries for e in range(g))
          for j in range(nk)
        }
        candidates = [j for j in range(first) if (j + 1) * block_k > start[bi]]
        candidates.sort(key=lambda j: (-score[j], j))
        chosen = sorted((forced + candidates)[:top_k])
        out[bi, h, i, : len(chosen)] = chosen
  return out


def _numpy_pool(k, start, block_k, conv=None):
  k = np.asarray(k, np.float64)
  b, hkv, t, d = k.shape
  if conv is not None:
    conv = np.asarray(conv, np.float64)
    k = np.stack(
      [sum(conv[i] * k[:, :, x - i] for i in range(conv.shape[0]) if x - i >= 0) for x in range(t)],
      axis=2,
    )
  out = np.zeros((b, hkv, t // block_k, d))
  for bi in range(b):
    for j in range(t // block_k):
      slots = [x for x in range(j * block_k, (j + 1) * block_k) if x >= start[bi]]
      if slots:
        out[bi, :, j] = k[bi][:, slots].mean(axis=1)
  return out


# ------------------------------------------------------------------ inputs


def _qkv(rng, b, s, t, heads, dtype):
  hq, hkv, d = heads
  q = rng.standard_normal((b, s, hq, d)).astype(np.float32)
  k = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
  v = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _random_sets(rng, b, hkv, nq, top_k, nk):
  """Index tables as a caller might give them: unsorted, -1 padding anywhere, repeats."""
  idx = rng.integers(0, nk, size=(b, hkv, nq, top_k)).astype(np.int32)
  idx[rng.random(idx.shape) < 0.25] = -1
  idx[..., -1] = idx[..., 0]  # a repeat (or two -1s) in every tile
  return idx


def _case(case_id, b, s, t, heads, starts, block_q, block_k, top_k, seed, *, routed=True, **kw):
  """Queries at slots t - s .. t - 1 (S == T a prefill, S < T a chunk, S = 1 decode),
  left padding `starts`; indices from `route` over pooled keys, or random sets."""
  dtype = kw.pop("dtype", np.float32)
  tol = 1e-5 if dtype == np.float32 else 2e-2

  @functools.cache
  def make():
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, b, s, t, heads, dtype)
    q_slots = jnp.broadcast_to(jnp.arange(t - s, t, dtype=jnp.int32), (b, s))
    start = jnp.asarray(starts, jnp.int32)
    blocks = dict(block_q=block_q, block_k=block_k)
    if routed:
      idx = route(q, pool_keys(k, start, block_k), q_slots, start, top_k=top_k, **blocks)
    else:
      nq = -(-s // block_q)
      idx = jnp.asarray(_random_sets(rng, b, heads[1], nq, top_k, t // block_k))
    return (q, k, v, q_slots, start, idx), blocks

  def check(out, args, kwargs):
    want = _numpy_moba(*(np.asarray(a) for a in args), kwargs["block_q"], kwargs["block_k"])
    rel_max(tol)(np.asarray(out, np.float64), want)

  return Case(case_id, make, rel_max(tol), check, **kw)


def _bad(case_id, exc, match, **over):
  """Valid inputs (q [1, 70, 4, 64], k/v [1, 2, 128, 64], blocks 64 x 32, K = 2) with
  some replaced."""

  def make():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 1, 70, 128, (4, 2, 64), np.float32)
    args = dict(
      q=q,
      k=k,
      v=v,
      q_slots=jnp.arange(58, 128, dtype=jnp.int32)[None],
      kv_start=jnp.zeros((1,), jnp.int32),
      block_indices=jnp.zeros((1, 2, 2, 2), jnp.int32),
      block_q=64,
      block_k=32,
    )
    args.update({name: fn(args) for name, fn in over.items()})
    kwargs = {name: args.pop(name) for name in ("block_q", "block_k")}
    return tuple(args.values()), kwargs

  return BadInput(case_id, make, exc, match)


def _export(case_id, b, s, t, heads, block_q, block_k, top_k, refuse=None):
  hq, hkv, d = heads
  nq = -(-s // block_q)
  args = (
    sds((b, s, hq, d), jnp.bfloat16),
    sds((b, hkv, t, d), jnp.bfloat16),
    sds((b, hkv, t, d), jnp.bfloat16),
    sds((b, s), jnp.int32),
    sds((b,), jnp.int32),
    sds((b, hkv, nq, top_k), jnp.int32),
  )
  blocks = dict(block_q=block_q, block_k=block_k)
  return Export(case_id, args, blocks, (b, s, hq, d), refuse=refuse or {})


_KERNELS_REFUSE_D32 = {"mosaic_tpu": "head_dim 32", "triton": "head_dim 32"}


class TestBlockSparseAttention(OpSuite):
  OP = OP
  NUMERICS = (
    # the brief's shape: a prefill of 256, 6 / 2 heads, blocks of 64, top-2, row 1
    # left-padded past its first 37 slots (those queries see nothing: zeros)
    _case("prefill_left_pad", 2, 256, 256, (6, 2, 64), [0, 37], 64, 64, 2, seed=0),
    # caller-made tables: unsorted, -1 anywhere, repeated blocks (a set, counted once)
    _case("random_sets", 2, 128, 128, (6, 2, 64), [0, 20], 64, 16, 4, seed=1, routed=False),
    # a 72-query chunk against 320 slots (tiles of 64: the last one short), tiles
    # straddling key blocks of 32, Llama-3's head_dim 128
    _case("chunk_d128", 1, 72, 320, (4, 1, 128), [5], 64, 32, 3, seed=2),
    # decode: one query per row at the buffer's end, SmolLM2's 9 / 3 heads
    _case("decode_smollm2", 3, 1, 256, SMOLLM2, [0, 100, 250], 64, 64, 2, seed=3),
    _case("decode_bf16", 2, 1, 128, (8, 2, 64), [0, 3], 64, 32, 2, seed=4, dtype=jnp.bfloat16),
    # head_dim 32: the kernels refuse by design (the table routes it to xla)
    _case("head_dim_32", 1, 16, 64, (2, 1, 32), [0], 16, 16, 2, seed=5, refuse=_KERNELS_REFUSE_D32),
  )
  BAD_INPUTS = (
    _bad(
      "q_list",
      TypeError,
      r"block_sparse_attention: q must be an array, got list",
      q=lambda a: [1.0],
    ),
    _bad(
      "t_not_multiple_of_block_k",
      ValueError,
      r"T = 128 \(k \(1, 2, 128, 64\)\) is not a multiple of block_k = 48",
      block_k=lambda a: 48,
      block_indices=lambda a: jnp.zeros((1, 2, 2, 2), jnp.int32),
    ),
    _bad(
      "top_k_over_blocks",
      ValueError,
      r"top-k larger than the number of blocks: block_indices \(1, 2, 2, 5\) has K = 5 > T / "
      r"block_k = 128 / 32",
      block_indices=lambda a: jnp.zeros((1, 2, 2, 5), jnp.int32),
    ),
    _bad(
      "indices_vs_tiles",
      ValueError,
      r"block_indices \(1, 2, 3, 2\) must be \[B, Hkv, nQ, K\] = \[1, 2, 2, K\] "
      r"\(nQ = ceil\(S / block_q\) = ceil\(70 / 64\)\)",
      block_indices=lambda a: jnp.zeros((1, 2, 3, 2), jnp.int32),
    ),
    _bad(
      "heads",
      ValueError,
      r"3 KV heads \(k \(1, 3, 128, 64\)\) do not divide 4 query heads",
      k=lambda a: jnp.zeros((1, 3, 128, 64)),
      v=lambda a: jnp.zeros((1, 3, 128, 64)),
    ),
    _bad(
      "v_shape",
      ValueError,
      r"v \(1, 2, 96, 64\) differs from k \(1, 2, 128, 64\)",
      v=lambda a: jnp.zeros((1, 2, 96, 64)),
    ),
    _bad(
      "float_indices",
      ValueError,
      "block_indices must be integer, got float32",
      block_indices=lambda a: jnp.zeros((1, 2, 2, 2), jnp.float32),
    ),
    _bad("int_q", ValueError, "q must be float, got int32", q=lambda a: a["q"].astype(jnp.int32)),
    _bad(
      "float_slots",
      ValueError,
      "q_slots must be integer, got float32",
      q_slots=lambda a: a["q_slots"].astype(jnp.float32),
    ),
    _bad("block_q_zero", ValueError, "block_q must be a positive int, got 0", block_q=lambda a: 0),
    _bad(
      "block_k_str", ValueError, "block_k must be a positive int, got '32'", block_k=lambda a: "32"
    ),
  )
  EXPORTS = (
    _export("prefill_smollm2", 1, 256, 256, SMOLLM2, 64, 64, 2),
    _export("decode_llama3", 2, 1, 512, LLAMA3, 64, 64, 4),
    _export(
      "head_dim_96",
      1,
      64,
      64,
      (4, 2, 96),
      32,
      32,
      2,
      refuse={("tpu", "mosaic_tpu"): "head_dim 96", ("cuda", "triton"): "head_dim 96"},
    ),
  )


# ------------------------------------------------------------------ refusals by design


def test_block_sizes_the_kernels_cannot_tile_are_refused_and_routed_to_xla():
  """block_k = 24 divides T = 96 (valid for the op) but is no multiple of 8 for the TPU
  kernel and no power of 2 for Triton; block_q = 48 over two tiles is no power of 2 for
  Triton. Each kernel's supports() names the block; the default goes to xla."""
  args = (
    sds((1, 96, 4, 64), jnp.bfloat16),
    sds((1, 2, 96, 64), jnp.bfloat16),
    sds((1, 2, 96, 64), jnp.bfloat16),
    sds((1, 96), jnp.int32),
    sds((1,), jnp.int32),
  )
  odd_k = dict(block_q=32, block_k=12)
  idx = sds((1, 2, 3, 2), jnp.int32)
  for platform, impl, reason in (
    (TPU, "mosaic_tpu", r"block_k = 12 is not a multiple of 8"),
    (GPU, "triton", r"block_k = 12 is not a power of 2 >= 16"),
  ):
    assert OP.select(None, platform, *args, idx, **odd_k).name == "xla"
    with pytest.raises(UnsupportedError, match=rf"'{impl}' cannot run on .*: .*{reason}"):
      OP.select(impl, platform, *args, idx, **odd_k)
  odd_q = dict(block_q=48, block_k=32)
  with pytest.raises(UnsupportedError, match=r"block_q = 48 is not a power of 2 \(S = 96"):
    OP.select("triton", GPU, *args, sds((1, 2, 2, 2), jnp.int32), **odd_q)
  assert OP.select(None, TPU, *args, sds((1, 2, 2, 2), jnp.int32), **odd_q).name == "mosaic_tpu"
  assert OP.select(None, Platform("cpu"), *args, idx, **dict(block_q=32, block_k=32)).name == "xla"


# ------------------------------------------------------------------ the router


def _route_inputs(seed, b, s, t, heads, starts, block_k, offset=None, ties=False):
  """Integer-valued queries and block keys (every score is an exact small integer in
  float32 and float64, so rankings and ties are the same in both)."""
  hq, hkv, d = heads
  rng = np.random.default_rng(seed)
  q = rng.integers(-3, 4, size=(b, s, hq, d)).astype(np.float32)
  keys = rng.integers(-3, 4, size=(b, hkv, t // block_k, d)).astype(np.float32)
  if ties:  # every block key the same up to sign: many equal scores
    keys = np.broadcast_to(keys[:, :, :1], keys.shape).copy()
  offset = t - s if offset is None else offset
  q_slots = np.broadcast_to(offset + np.arange(s, dtype=np.int32), (b, s)).copy()
  return q, keys, q_slots, np.asarray(starts, np.int32)


_ROUTE_CASES = {
  # prefill, tiles aligned with key blocks; row 1 left-padded over 2.5 blocks
  "prefill": (dict(b=2, s=256, t=256, heads=(6, 2, 8), starts=[0, 80], block_k=32), 32, 3),
  # a chunk: tiles of 16 inside key blocks of 64
  "chunk_small_tiles": (dict(b=1, s=40, t=512, heads=(4, 2, 8), starts=[7], block_k=64), 16, 2),
  # tiles of 64 at an offset of 8 over key blocks of 16: each spans 5 key blocks
  "tiles_span_blocks": (
    dict(b=1, s=100, t=256, heads=(2, 1, 8), starts=[0], block_k=16, offset=120),
    64,
    7,
  ),
  # tiles spanning more forced blocks than top_k: the newest are kept
  "forced_over_top_k": (
    dict(b=1, s=64, t=128, heads=(2, 1, 8), starts=[0], block_k=16, offset=40),
    64,
    2,
  ),
  # decode, top_k more than the visible blocks of a padded row: -1 padding
  "decode": (dict(b=3, s=1, t=256, heads=(9, 3, 8), starts=[0, 200, 255], block_k=32), 64, 4),
  "ties": (dict(b=1, s=64, t=256, heads=(2, 1, 8), starts=[0], block_k=16, ties=True), 16, 5),
}


@pytest.mark.parametrize("name", sorted(_ROUTE_CASES))
def test_route_matches_a_brute_force_router(name):
  kw, block_q, top_k = _ROUTE_CASES[name]
  q, keys, q_slots, start = _route_inputs(0, **kw)
  block_k = kw["block_k"]
  got = np.asarray(route(q, keys, q_slots, start, block_q=block_q, block_k=block_k, top_k=top_k))
  want = _numpy_route(q, keys, q_slots, start, block_q, block_k, top_k)
  np.testing.assert_array_equal(got, want)
  # Properties, whatever the scores: the tile's newest block always, nothing after it
  # (causal), nothing wholly before kv_start, ascending with the -1s last.
  nq = got.shape[2]
  for bi in range(got.shape[0]):
    for i in range(nq):
      tile = q_slots[bi, i * block_q : (i + 1) * block_q]
      tile = tile[tile >= start[bi]]
      sel = got[bi, :, i]
      if not tile.size:
        assert (sel == -1).all()
        continue
      assert (sel == tile.max() // block_k).any(-1).all()
      assert (sel <= tile.max() // block_k).all()
      real = sel[sel >= 0]
      assert (real >= start[bi] // block_k).all()
      for row in sel:
        n = (row >= 0).sum()
        assert (row[n:] == -1).all() and (np.diff(row[:n]) > 0).all()
  if name == "decode":  # row 2 sees one block, row 1 two: the rest is -1
    np.testing.assert_array_equal(
      blocks_read(jnp.asarray(got))[:, :, 0], [[4] * 3, [2] * 3, [1] * 3]
    )


def test_route_picks_the_best_scoring_blocks():
  """One query, one head, keys with scores 5, 1, 9, 3, (own block): top-3 is the own
  block and the two best earlier ones."""
  keys = np.zeros((1, 1, 5, 8), np.float32)
  keys[0, 0, :4, 0] = [5, 1, 9, 3]
  q = np.zeros((1, 1, 1, 8), np.float32)
  q[..., 0] = 1
  got = route(q, keys, np.array([[70]]), np.array([0]), block_q=16, block_k=16, top_k=3)
  np.testing.assert_array_equal(np.asarray(got), [[[[0, 2, 4]]]])


@pytest.mark.parametrize(
  "top_k, block_k, match",
  [
    (0, 16, r"route: top_k must be a positive int, got 0"),
    (5, 16, r"route: top-k larger than the number of blocks: top_k 5 > 4 key blocks"),
    (2, 0, r"route: block_k must be a positive int, got 0"),
  ],
)
def test_route_rejects_bad_arguments(top_k, block_k, match):
  q, keys, q_slots, start = _route_inputs(0, 1, 8, 64, (2, 1, 8), [0], 16)
  with pytest.raises(ValueError, match=match):
    route(q, keys, q_slots, start, block_q=8, block_k=block_k, top_k=top_k)
  with pytest.raises(ValueError, match=r"3 KV heads \(k \(1, 3, 4, 8\)\) do not divide 2"):
    route(q, np.zeros((1, 3, 4, 8), np.float32), q_slots, start, block_q=8, block_k=16, top_k=1)


# ------------------------------------------------------------------ key pooling


@pytest.mark.parametrize("width", [None, 1, 3])
def test_pool_keys_matches_numpy(width):
  """Means over each block's slots >= kv_start (row 1 starts at 40: blocks 0 and 1 of
  16 are zeros, block 2 averages 8 slots), after an optional causal key convolution."""
  rng = np.random.default_rng(0)
  k = rng.standard_normal((2, 2, 64, 8)).astype(np.float32)
  start = np.array([0, 40], np.int32)
  conv = None if width is None else rng.standard_normal((width, 8)).astype(np.float32)
  got = np.asarray(pool_keys(jnp.asarray(k), start, 16, key_conv=conv))
  assert got.shape == (2, 2, 4, 8) and got.dtype == np.float32
  np.testing.assert_allclose(got, _numpy_pool(k, start, 16, conv), atol=1e-5, rtol=1e-5)
  assert not got[1, :, :2].any()


def test_pool_keys_rejects_bad_arguments():
  k = jnp.zeros((1, 2, 64, 8))
  start = jnp.zeros((1,), jnp.int32)
  with pytest.raises(
    ValueError, match=r"T = 64 \(k \(1, 2, 64, 8\)\) is not a multiple of block_k = 24"
  ):
    pool_keys(k, start, 24)
  with pytest.raises(ValueError, match=r"key_conv \(3, 4\) must be \[W, D\] with D = 8"):
    pool_keys(k, start, 16, key_conv=jnp.zeros((3, 4)))


# ------------------------------------------------------------------ every block = dense


@pytest.mark.parametrize("impl", OP.names)
def test_every_block_selected_equals_dense_attention(impl):
  """route with top_k = T // block_k selects, for every tile, each block from the one
  holding kv_start to the one holding the tile's newest slot, which holds every slot a
  query of the tile may see; so the block mask equals the causal mask and the op equals
  `attention_reference`. They differ in summation order only (gathered blocks, an
  online softmax, float32): within 1e-5 of max |ref|, on the queries that see a key
  (the dense reference gives the others a uniform average, the op zeros)."""
  args = _dense_inputs()
  q, k, v, q_slots, start, idx = args
  out = fast_jit(
    functools.partial(OP, implementation=impl, interpret=True, block_q=32, block_k=32)
  )(*args)
  want = np.asarray(attention_reference(q, k, v, q_slots, start))
  valid = np.asarray(q_slots >= start[:, None])
  assert (~valid).any()
  rel_max(1e-5)(np.asarray(out)[valid], want[valid])
  assert not np.asarray(out)[~valid].any()


@functools.cache
def _dense_inputs():
  """A 96-query chunk at slots 32..127 of 128, SmolLM2's heads, row 1 left-padded."""
  rng = np.random.default_rng(7)
  q, k, v = _qkv(rng, 2, 96, 128, SMOLLM2, np.float32)
  q_slots = jnp.broadcast_to(jnp.arange(32, 128, dtype=jnp.int32), (2, 96))
  start = jnp.array([0, 50], jnp.int32)
  idx = route(q, pool_keys(k, start, 32), q_slots, start, block_q=32, block_k=32, top_k=4)
  assert int(blocks_read(idx).max()) == 4
  return q, k, v, q_slots, start, idx


def test_blocks_read_counts_selected_entries():
  idx = jnp.array([[[[0, 3, -1], [-1, -1, -1]], [[2, 1, 0], [5, -1, -1]]]], jnp.int32)
  got = blocks_read(idx)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), [[[2, 0], [3, 1]]])


def test_the_op_traces_no_dense_score_matrix_on_its_xla_path():
  """The xla implementation reads only the selected blocks: its largest intermediate at
  S = T = 2048, block 64, top-8 is one tile's [K * block_k] slots wide, never T."""
  args = (
    sds((1, 2048, 9, 64), jnp.float32),
    sds((1, 3, 2048, 64), jnp.float32),
    sds((1, 3, 2048, 64), jnp.float32),
    sds((1, 2048), jnp.int32),
    sds((1,), jnp.int32),
    sds((1, 3, 32, 8), jnp.int32),
  )
  fn = functools.partial(OP, implementation="xla", block_q=64, block_k=64)
  jaxpr = jax.make_jaxpr(fn)(*args)
  widths = set()

  def walk(jp):
    for eqn in jp.eqns:
      for var in eqn.outvars:
        shape = getattr(var.aval, "shape", ())
        if len(shape) >= 2 and shape[-2] == 64 * 3:  # one tile's rows: 64 queries x 3 heads
          widths.add(shape[-1])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jaxpr.jaxpr)
  assert 512 in widths and 2048 not in widths, widths
