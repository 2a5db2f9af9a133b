"""Mosaic TPU block-sparse attention: grid (B, Hkv, query tiles, top_k), the selected
key blocks fetched by scalar-prefetched index maps, online softmax in VMEM scratch.

Each program owns one query tile of one KV head (its queries times the group's heads,
rows padded to a multiple of 8 by zero heads; layout in `common`) and visits the
tile's ``K`` routing entries along the last grid axis ("arbitrary"): the running max,
sum and accumulator live in VMEM scratch across it, initialized at entry 0 and written
out at entry K - 1. The normalized index table (selected blocks first, -1s last) and
each tile's count arrive by scalar prefetch (SMEM): the K/V index maps read the block
of entry e, with -1 entries clamped to the tile's last selected block, so a skipped
step fetches nothing new, and the kernel skips entries ``e >= count`` with
``pl.when``. No integer ``//`` in the kernel or the index maps (flat table offsets are
products only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import common as flash_common

from . import common
from .validation import NAME as OP_NAME
from .validation import validate

NAME = f"{OP_NAME} (mosaic_tpu)"


def check_inputs(q, k, v, q_slots, kv_start, block_indices, *, block_q, block_k) -> None:
  """The op's validation, then the kernel's own limits (head_dim, block_k)."""
  validate(q, k, v, q_slots, kv_start, block_indices, block_q=block_q, block_k=block_k)
  d = q.shape[3]
  if d not in flash_common.HEAD_DIMS:
    raise ValueError(
      f"{NAME}: head_dim {d} (q {tuple(q.shape)}) is not one of {flash_common.HEAD_DIMS}"
    )
  if block_k % 8:
    raise ValueError(f"{NAME}: block_k = {block_k} is not a multiple of 8 (TPU sublane tiling)")


def group_padded(tile: int, group: int) -> int:
  """The smallest group >= `group` whose rows (tile x group) are a multiple of 8."""
  gp = group
  while (tile * gp) % 8:
    gp += 1
  return gp


def _kernel(
  start_ref,
  count_ref,
  fetch_ref,
  slot_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  m_sc,
  l_sc,
  acc_sc,
  *,
  block_k,
  num_kv_heads,
  num_q_blocks,
  top_k,
  sm_scale,
  precision,
):
  b, h, qi, e = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  tile = (b * num_kv_heads + h) * num_q_blocks + qi

  @pl.when(e == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, flash_common.MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(e < count_ref[tile])
  def _block():
    k0 = fetch_ref[tile * top_k + e] * block_k
    s = flash_common.scores(q_ref[...], k_ref[...], sm_scale, precision)  # (R, bk)
    key = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    visible = (key <= slot_ref[...]) & (key >= start_ref[b])
    m, total, acc = flash_common.online_step(
      m_sc[...], l_sc[...], acc_sc[...], s, visible, v_ref[...], precision
    )
    m_sc[...] = m
    l_sc[...] = total
    acc_sc[...] = acc

  @pl.when(e == top_k - 1)
  def _finish():
    out, _ = flash_common.finish(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)


def block_sparse_attention_tpu(
  q,
  k,
  v,
  q_slots,
  kv_start,
  block_indices,
  *,
  block_q: int,
  block_k: int,
  sm_scale: float | None = None,
  compiler_params=None,
  interpret: bool = False,
):
  """Block-sparse attention (the ``block_sparse_attention`` op), Mosaic TPU kernel.

  Args: as the op (`api`); head_dim 64 or 128 and block_k a multiple of 8, else a
  ValueError naming it. sm_scale: default ``D ** -0.5``. compiler_params: default
  ``pltpu.CompilerParams`` with the entry axis "arbitrary". interpret: the Pallas
  interpreter.

  Returns:
    ``[B, S, Hq, D]`` in q's dtype; a query that sees no key gets zeros.
  """
  check_inputs(q, k, v, q_slots, kv_start, block_indices, block_q=block_q, block_k=block_k)
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  nk, top_k = t // block_k, block_indices.shape[3]
  tile, nq = common.tile_queries(s, block_q)
  gp = group_padded(tile, hq // hkv)
  tl = common.tiling(q, k, tile, nq, gp, tile, block_k)
  q_rows, k, v, slot_rows, start = common.fold(q, k, v, q_slots, kv_start, tl)
  idx, count = common.normalize_indices(block_indices, nk)
  fetch = common.fetch_table(idx, count).reshape(-1)
  count = count.reshape(-1)
  rows = tl.rows
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)

  def q_map(bi, h, qi, e, start_ref, count_ref, fetch_ref):
    return bi, h, qi, 0

  def slot_map(bi, h, qi, e, start_ref, count_ref, fetch_ref):
    return bi, qi, 0

  def kv_map(bi, h, qi, e, start_ref, count_ref, fetch_ref):
    return bi, h, fetch_ref[((bi * hkv + h) * nq + qi) * top_k + e], 0

  if compiler_params is None:
    compiler_params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )
  kernel = functools.partial(
    _kernel,
    block_k=block_k,
    num_kv_heads=hkv,
    num_q_blocks=nq,
    top_k=top_k,
    sm_scale=sm_scale,
    precision=flash_common.dot_precision(q.dtype),
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, hkv, nq, top_k),
      in_specs=[
        pl.BlockSpec((None, rows, 1), slot_map),
        pl.BlockSpec((None, None, rows, d), q_map),
        pl.BlockSpec((None, None, block_k, d), kv_map),
        pl.BlockSpec((None, None, block_k, d), kv_map),
      ],
      out_specs=pl.BlockSpec((None, None, rows, d), q_map),
      scratch_shapes=[
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, d), jnp.float32),
      ],
    ),
    compiler_params=compiler_params,
    interpret=interpret,
    name="block_sparse_attention",
  )(start, count, fetch, slot_rows, q_rows, k, v)
  return flash_common.unfold_out(out, tl)
