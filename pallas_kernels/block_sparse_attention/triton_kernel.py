"""Portable (Triton) block-sparse attention: grid (B, Hkv, query parts), the routing
indices an ordinary input, a ``fori_loop`` over the tile's selected blocks.

Triton has no scalar prefetch, no scratch memory and no sequential grid axis, so each
program owns a part of one query tile of one KV head and loops over that tile's
selected key blocks itself: the normalized index table and the per-tile counts
(`common.normalize_indices`) are plain 1-D inputs read as scalars, and each selected
block is read from the head's whole-T K/V with a ``pl.ds`` ref slice. Every load has a
power-of-2 size: the GQA group is zero-padded to a power of 2 (SmolLM2's 3 -> 4) and
folded into the rows, a tile of more than one part is a power-of-2 ``block_q``, a
single tile (decode) is padded to a power of 2, rows are at least 16 for the dot and
block_k is a power of 2 >= 16. A tile's rows are split into parts of at most the flash
kernel's default query block (`triton_default`), which share the tile's routing, so
the register tiles stay the flash kernel's size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels._util import is_pow2, next_pow2
from pallas_kernels.flash_attention import common as flash_common
from pallas_kernels.flash_attention import triton_default

from . import common
from .validation import NAME as OP_NAME
from .validation import validate

NAME = f"{OP_NAME} (triton)"
MIN_ROWS = 16  # Triton dot tiles are at least 16 x 16
MIN_BLOCK_K = 16


def check_inputs(q, k, v, q_slots, kv_start, block_indices, *, block_q, block_k) -> None:
  """The op's validation, then the kernel's own limits (head_dim, power-of-2 blocks)."""
  validate(q, k, v, q_slots, kv_start, block_indices, block_q=block_q, block_k=block_k)
  d = q.shape[3]
  if d not in flash_common.HEAD_DIMS:
    raise ValueError(
      f"{NAME}: head_dim {d} (q {tuple(q.shape)}) is not one of {flash_common.HEAD_DIMS}"
    )
  if not is_pow2(block_k) or block_k < MIN_BLOCK_K:
    raise ValueError(f"{NAME}: block_k = {block_k} is not a power of 2 >= {MIN_BLOCK_K}")
  if q.shape[1] > block_q and not is_pow2(block_q):
    raise ValueError(
      f"{NAME}: block_q = {block_q} is not a power of 2 (S = {q.shape[1]} > block_q)"
    )


def _kernel(
  start_ref,
  count_ref,
  idx_ref,
  slot_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  *,
  block_k,
  num_kv_heads,
  num_q_blocks,
  parts,
  top_k,
  sm_scale,
  precision,
):
  b, h, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tile = (b * num_kv_heads + h) * num_q_blocks + lax.div(part, parts)
  start = start_ref[b]
  q = q_ref[...]  # (R, D)
  slots = slot_ref[...]  # (R, 1)
  rows, d = q.shape

  def entry(e, carry):
    k0 = pl.multiple_of(idx_ref[tile * top_k + e] * block_k, block_k)
    k = k_ref[pl.ds(k0, block_k), :]
    v = v_ref[pl.ds(k0, block_k), :]
    s = flash_common.scores(q, k, sm_scale, precision)  # (R, bk)
    key = k0 + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    visible = (key <= slots) & (key >= start)
    return flash_common.online_step(*carry, s, visible, v, precision)

  init = (
    jnp.full((rows, 1), flash_common.MASKED, jnp.float32),
    jnp.zeros((rows, 1), jnp.float32),
    jnp.zeros((rows, d), jnp.float32),
  )
  m, total, acc = lax.fori_loop(0, count_ref[tile], entry, init)
  out, _ = flash_common.finish(m, total, acc)
  o_ref[...] = out.astype(o_ref.dtype)


def block_sparse_attention_triton(
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
  """Block-sparse attention (the ``block_sparse_attention`` op), Triton-friendly kernel.

  Args: as the op (`api`); head_dim 64 or 128, block_k a power of 2 >= 16 and, when S
  spans more than one tile, block_q a power of 2, else a ValueError naming it.
  sm_scale: default ``D ** -0.5``. compiler_params: default
  ``pltr.CompilerParams(num_warps=4, num_stages=2)``. interpret: the Pallas
  interpreter.

  Returns:
    ``[B, S, Hq, D]`` in q's dtype; a query that sees no key gets zeros.
  """
  check_inputs(q, k, v, q_slots, kv_start, block_indices, block_q=block_q, block_k=block_k)
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g, nk, top_k = hq // hkv, t // block_k, block_indices.shape[3]
  tile, nq = common.tile_queries(s, block_q)
  tile = next_pow2(tile)  # a single tile (S <= block_q) is padded; more are block_q
  part = min(tile, triton_default(g, d, q.dtype.itemsize).block_q)
  gp = max(next_pow2(g), MIN_ROWS // part)
  tl = common.tiling(q, k, tile, nq, gp, part, block_k)
  q_rows, k, v, slot_rows, start = common.fold(q, k, v, q_slots, kv_start, tl)
  idx, count = common.normalize_indices(block_indices, nk)
  idx, count = idx.reshape(-1), count.reshape(-1)
  # The tables as power-of-2 blocks (read as scalars; the padding is never read).
  idx = jnp.pad(idx, (0, next_pow2(idx.shape[0]) - idx.shape[0]))
  count = jnp.pad(count, (0, next_pow2(count.shape[0]) - count.shape[0]))
  start = jnp.pad(start, (0, next_pow2(b) - b))
  rows, parts = tl.rows, tile // part
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  if compiler_params is None:
    compiler_params = pltr.CompilerParams(num_warps=4, num_stages=2)

  def whole(n):
    return pl.BlockSpec((n,), lambda bi, h, p: (0,))

  q_spec = pl.BlockSpec((None, None, rows, d), lambda bi, h, p: (bi, h, p, 0))
  kv_spec = pl.BlockSpec((None, None, t, d), lambda bi, h, p: (bi, h, 0, 0))
  kernel = functools.partial(
    _kernel,
    block_k=block_k,
    num_kv_heads=hkv,
    num_q_blocks=nq,
    parts=parts,
    top_k=top_k,
    sm_scale=sm_scale,
    precision=flash_common.dot_precision(q.dtype),
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
    grid=(b, hkv, nq * parts),
    in_specs=[
      whole(start.shape[0]),
      whole(count.shape[0]),
      whole(idx.shape[0]),
      pl.BlockSpec((None, rows, 1), lambda bi, h, p: (bi, p, 0)),
      q_spec,
      kv_spec,
      kv_spec,
    ],
    out_specs=q_spec,
    compiler_params=compiler_params,
    interpret=interpret,
    name="block_sparse_attention_triton",
  )(start, count, idx, slot_rows, q_rows, k, v)
  return flash_common.unfold_out(out, tl)
