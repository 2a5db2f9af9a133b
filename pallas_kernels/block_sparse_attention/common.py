"""What the block-sparse implementations share: the normalized index table and the
kernels' query tiling.

Indices. Every implementation reads ``block_indices [B, Hkv, nQ, K]`` as a set: an
entry outside ``[0, T // block_k)`` (the router's -1 padding) selects nothing, and a
block listed twice counts once. `normalize_indices` turns any table into that set's
canonical form: the selected blocks ascending, then -1s, plus the count of selected
blocks per tile; the kernels loop over the first ``count`` entries only.

Query tiling. A routing tile is ``block_q`` queries (all S when S <= block_q). The
kernels fold each tile's queries with their GQA group into rows as the flash kernels do
(`pallas_kernels.flash_attention.common`: rows ordered (query, head), padded group
heads are zero queries whose rows are dropped, padded queries get slot -1 and see
nothing), so one program's rows share one KV head and one routing.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.flash_attention import common as flash_common

from .validation import num_q_blocks


def normalize_indices(block_indices, num_blocks: int):
  """``(indices, count)``: per tile the distinct selected blocks ascending, then -1s
  (int32 ``[B, Hkv, nQ, K]``), and how many there are (int32 ``[B, Hkv, nQ]``)."""
  idx = block_indices.astype(jnp.int32)
  ok = (idx >= 0) & (idx < num_blocks)
  key = jnp.sort(jnp.where(ok, idx, num_blocks), axis=-1)  # unselected sort last
  repeat = jnp.concatenate(
    [jnp.zeros(key.shape[:-1] + (1,), bool), key[..., 1:] == key[..., :-1]], axis=-1
  )
  key = jnp.sort(jnp.where(repeat, num_blocks, key), axis=-1)
  selected = key < num_blocks
  return jnp.where(selected, key, -1), selected.sum(-1).astype(jnp.int32)


def fetch_table(indices, count):
  """`indices` (normalized) with each -1 replaced by the tile's last selected block
  (block 0 when it has none): what a kernel's index map reads, so that a skipped step
  re-uses the block already resident instead of fetching another."""
  last = jnp.take_along_axis(indices, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  return jnp.where(indices >= 0, indices, jnp.maximum(last, 0))


def tile_queries(num_queries: int, block_q: int) -> tuple[int, int]:
  """``(queries per routing tile as the kernels see it, nQ)``: block_q, or S when one
  tile holds every query (decode: no padding up to block_q)."""
  nq = num_q_blocks(num_queries, block_q)
  return (block_q if nq > 1 else num_queries), nq


def tiling(q, k, tile: int, num_tiles: int, group_padded: int, rows_q: int, block_k: int):
  """A flash `Tiling` whose query block is one kernel program's `rows_q` queries (a
  routing tile of `tile` queries, or a part of it) and whose key block is `block_k`."""
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  return flash_common.Tiling(
    b, s, t, hkv, hq // hkv, group_padded, d, rows_q, block_k, num_tiles * tile, t
  )


def fold(q, k, v, q_slots, kv_start, tl):
  """``(q_rows [B, Hkv, S_pad * Gp, D], k, v, slot_rows [B, S_pad * Gp, 1], start [B])``."""
  q_rows, k, v, slot_rows, start, _ = flash_common.fold_inputs(q, k, v, q_slots, kv_start, tl)
  return q_rows, k, v, slot_rows, start
