"""MoBA routing: mean-pooled block keys (optionally after a short key convolution) and
the top-k key blocks of each query tile.

`pool_keys` gives one key per ``block_k`` slots: the mean of the block's keys over its
slots at or after ``kv_start`` (left padding is left out; a block with no such slot is
zeros). `route` scores every key block against each query tile, one routing per (row,
KV head, tile) shared by the G query heads of the group, and keeps the tile's own
(diagonal) blocks plus the best-scoring earlier ones. `blocks_read` counts what a
routing makes an implementation read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import validation
from .validation import NAME, num_q_blocks

_HIGHEST = jax.lax.Precision.HIGHEST


def pool_keys(k, kv_start, block_k: int, key_conv=None):
  """Mean key of each ``block_k``-slot block: ``[B, Hkv, T // block_k, D]`` float32.

  Args:
    k: ``[B, Hkv, T, D]`` keys (slot-indexed, as the attention op's).
    kv_start: ``[B]`` int, the first valid slot of each row (left padding); slots
      before it are left out of the means.
    block_k: slots per key block; must divide T (ValueError otherwise).
    key_conv: optional ``[W, D]`` depthwise causal convolution over the slot axis,
      applied to the keys before pooling: ``k'[t] = sum_i key_conv[i] * k[t - i]``
      (tap 0 the slot itself, tap i the slot i back; zeros before slot 0), the same
      weights for every KV head.

  Returns:
    ``[B, Hkv, T // block_k, D]`` float32; a block with no slot >= kv_start is zeros.
  """
  name = f"{NAME}.pool_keys"
  for arg, x in (("k", k), ("kv_start", kv_start)):
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}")
  validation.check_block(name, "block_k", block_k)
  if k.ndim != 4:
    raise ValueError(f"{name}: k {tuple(k.shape)} must be [B, Hkv, T, D]")
  b, hkv, t, d = k.shape
  if t % block_k:
    raise ValueError(
      f"{name}: T = {t} (k {tuple(k.shape)}) is not a multiple of block_k = {block_k}"
    )
  if tuple(kv_start.shape) != (b,) or not jnp.issubdtype(kv_start.dtype, jnp.integer):
    raise ValueError(f"{name}: kv_start {tuple(kv_start.shape)} {kv_start.dtype} must be int [{b}]")
  kf = k.astype(jnp.float32)
  if key_conv is not None:
    if not hasattr(key_conv, "shape") or key_conv.ndim != 2 or key_conv.shape[1] != d:
      raise ValueError(
        f"{name}: key_conv {tuple(getattr(key_conv, 'shape', ()))} must be [W, D] with D = {d}"
      )
    if key_conv.shape[0] == 0:
      raise ValueError(f"{name}: key_conv {tuple(key_conv.shape)} has no taps")
    w = key_conv.astype(jnp.float32)
    conv = kf * w[0]
    for i in range(1, min(w.shape[0], t)):  # taps past slot 0 read zeros
      shifted = jnp.pad(kf[:, :, : t - i], ((0, 0), (0, 0), (i, 0), (0, 0)))
      conv = conv + shifted * w[i]
    kf = conv
  nk = t // block_k
  valid = jnp.arange(t, dtype=jnp.int32)[None] >= kv_start.astype(jnp.int32)[:, None]  # [B, T]
  sums = jnp.where(valid[:, None, :, None], kf, 0.0).reshape(b, hkv, nk, block_k, d).sum(3)
  count = valid.reshape(b, nk, block_k).sum(-1).astype(jnp.float32)  # [B, nK]
  return sums / jnp.maximum(count, 1.0)[:, None, :, None]


def route(
  q, block_keys, q_slots, kv_start, *, block_q: int, block_k: int, top_k: int, sink_blocks: int = 0
):
  """The key blocks each query tile attends: int32 ``[B, Hkv, nQ, top_k]``.

  Query tile i holds queries ``i * block_q .. (i + 1) * block_q - 1`` (the last may be
  short), nQ = ceil(S / block_q). Its valid queries are those with
  ``q_slot >= kv_start`` (a left-padding query sees nothing and routes nothing). For
  each (row, KV head, tile):

  * score of key block j: the sum over the tile's valid queries and the G query heads
    of the group of ``q . block_keys[j]`` (float32);
  * forced (always selected, counted in top_k): the blocks from the one holding the
    tile's oldest valid slot through the one holding its newest. That is the two blocks
    the MoBA spec names (the tile's newest and oldest), and every block between them
    when a tile spans more than two (block_q > block_k), so that each query's own block
    is always attended. When they outnumber top_k, the newest are kept;
  * candidates: blocks wholly before the oldest forced block holding at least one slot
    >= kv_start; the first `sink_blocks` of them (from the row's first valid block on)
    are sinks, selected right after the forced blocks whatever their score (the
    attention sink: a model not trained with MoBA leans on its first tokens);
  * selected: the forced blocks, the sinks, then the highest-scoring candidates (equal
    scores: the lower block index first), up to top_k; fewer available are padded with -1.

  A tile with no valid query selects nothing (all -1). No block after the tile's newest
  slot is ever selected.

  Args:
    q: ``[B, S, Hq, D]`` queries.
    block_keys: ``[B, Hkv, T // block_k, D]`` (`pool_keys`).
    q_slots: ``[B, S]`` int slot of each query (slots past T - 1 count as T - 1).
    kv_start: ``[B]`` int first valid slot.
    block_q: queries per tile. block_k: slots per key block (T = nK * block_k).
    top_k: blocks per tile, 1 <= top_k <= nK (ValueError otherwise).
    sink_blocks: how many of the first valid blocks every tile keeps (>= 0).

  Returns:
    int32 ``[B, Hkv, nQ, top_k]``: each tile's selected blocks ascending, -1s last.
  """
  name = f"{NAME}.route"
  validation.check_qkv(name, q, block_keys, q_slots, kv_start, block_k)
  validation.check_block(name, "block_q", block_q)
  b, s, hq, d = q.shape
  hkv, nk = block_keys.shape[1], block_keys.shape[2]
  validation.check_top_k(name, top_k, nk)
  if isinstance(sink_blocks, bool) or not isinstance(sink_blocks, int) or sink_blocks < 0:
    raise ValueError(f"{name}: sink_blocks must be an int >= 0, got {sink_blocks!r}")
  g, t = hq // hkv, nk * block_k
  nq = num_q_blocks(s, block_q)
  sp = nq * block_q
  slots = jnp.clip(q_slots.astype(jnp.int32), -1, t - 1)
  slots = jnp.pad(slots, ((0, 0), (0, sp - s)), constant_values=-1)
  start = jnp.maximum(kv_start.astype(jnp.int32), 0)
  valid = slots >= start[:, None]  # [B, S_pad]; padded queries (slot -1) are not

  # One query per (row, KV head, tile): the sum of its valid queries over the group.
  qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  qf = jnp.where(valid[:, :, None, None], qf, 0.0)
  q_tile = qf.reshape(b, nq, block_q, hkv, g, d).sum((2, 4)).transpose(0, 2, 1, 3)
  scores = jnp.einsum(
    "bhnd,bhjd->bhnj", q_tile, block_keys.astype(jnp.float32), precision=_HIGHEST
  )  # [B, Hkv, nQ, nK]

  tile_slots = slots.reshape(b, nq, block_q)
  tile_valid = valid.reshape(b, nq, block_q)
  any_valid = tile_valid.any(-1)  # [B, nQ]
  newest = jnp.max(jnp.where(tile_valid, tile_slots, -1), -1)
  oldest = jnp.min(jnp.where(tile_valid, tile_slots, t), -1)
  first, last = jnp.minimum(oldest, t - 1) // block_k, jnp.maximum(newest, 0) // block_k
  j = jnp.arange(nk, dtype=jnp.int32)
  forced = any_valid[..., None] & (j >= first[..., None]) & (j <= last[..., None])  # [B, nQ, nK]
  candidate = (
    any_valid[..., None] & (j < first[..., None]) & (j >= (start // block_k)[:, None, None])
  )
  sink = candidate & (j < (start // block_k + sink_blocks)[:, None, None])
  forced = jnp.broadcast_to(forced[:, None], scores.shape)
  candidate = jnp.broadcast_to(candidate[:, None], scores.shape)
  sink = jnp.broadcast_to(sink[:, None], scores.shape)

  # Order: forced (newest first), sinks (oldest first), then candidates by score (ties:
  # lower index), then the rest; a lexicographic sort on (class, secondary key, index).
  rank = jnp.where(forced, 0, jnp.where(sink, 1, jnp.where(candidate, 2, 3))).astype(jnp.int32)
  jf = j.astype(jnp.float32)
  secondary = jnp.where(forced, -jf, jnp.where(sink, jf, jnp.where(candidate, -scores, 0.0)))
  index = jnp.broadcast_to(j, scores.shape)
  rank, _, index = jax.lax.sort((rank, secondary, index), dimension=-1, num_keys=3)
  chosen = jnp.where(rank[..., :top_k] < 3, index[..., :top_k], nk)
  chosen = jnp.sort(chosen, axis=-1)
  return jnp.where(chosen < nk, chosen, -1).astype(jnp.int32)


def blocks_read(block_indices):
  """int32 ``[B, Hkv, nQ]``: how many blocks each tile selects (its entries >= 0)."""
  return jnp.sum(block_indices >= 0, axis=-1).astype(jnp.int32)
