"""Fused-jnp block-sparse attention: gather each tile's selected key blocks, then one
masked softmax over them.

Per (row, KV head, query tile) the ``K`` selected key and value blocks are gathered
into ``[K * block_k, D]`` (nothing else of K/V is read), the tile's queries and their
group's heads are folded into rows, and the rows attend the gathered slots under the
op's mask (``kv_start <= t <= q_slot``, selected entries only). Tiles are processed a
few at a time (`lax.map`) so that the scores of a long prefill stay small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import common
from .reference import MASKED

# Query rows (queries x group heads) x gathered slots per lax.map step, as a budget on
# the float32 score tile of one step: 4 Mi entries (16 MiB). At S = T = 2048, block 64,
# top-k 8, SmolLM2's heads and batch 8 that is one tile per step (2.4 Mi entries).
_SCORE_BUDGET = 4 * 1024 * 1024


def block_sparse_attention_xla(
  q, k, v, q_slots, kv_start, block_indices, *, block_q: int, block_k: int
):
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g, nk, top_k = hq // hkv, t // block_k, block_indices.shape[3]
  tile, nq = common.tile_queries(s, block_q)
  sp, rows, width = nq * tile, tile * g, top_k * block_k
  idx, _ = common.normalize_indices(block_indices, nk)  # [B, Hkv, nQ, K]

  slots = jnp.clip(q_slots.astype(jnp.int32), -1, t - 1)
  slots = jnp.pad(slots, ((0, 0), (0, sp - s)), constant_values=-1)  # padding sees nothing
  slot_rows = jnp.repeat(slots.reshape(b, nq, tile), g, axis=2)  # [B, nQ, rows]
  start = jnp.maximum(kv_start.astype(jnp.int32), 0)
  qg = jnp.pad(q, ((0, 0), (0, sp - s), (0, 0), (0, 0))).reshape(b, nq, tile, hkv, g, d)
  qg = qg.transpose(1, 0, 3, 2, 4, 5).reshape(nq, b, hkv, rows, d)  # rows: (query, head)
  k_blocks = k.astype(q.dtype).reshape(b, hkv, nk, block_k, d)
  v_blocks = v.astype(q.dtype).reshape(b, hkv, nk, block_k, d)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(hkv)[None, :, None]
  scale = d**-0.5

  def attend(xs):
    qt, st, it = xs  # [B, Hkv, rows, D], [B, rows], [B, Hkv, K]
    safe = jnp.maximum(it, 0)
    kt = k_blocks[bi, hi, safe].reshape(b, hkv, width, d)  # the selected blocks only
    vt = v_blocks[bi, hi, safe].reshape(b, hkv, width, d)
    key = (safe[..., None] * block_k + jnp.arange(block_k, dtype=jnp.int32)).reshape(b, hkv, width)
    chosen = jnp.repeat(it >= 0, block_k, axis=-1)  # [B, Hkv, width]
    visible = (
      chosen[:, :, None, :]
      & (key[:, :, None, :] >= start[:, None, None, None])
      & (key[:, :, None, :] <= st[:, None, :, None])
    )  # [B, Hkv, rows, width]
    scores = jnp.einsum("bhrd,bhtd->bhrt", qt, kt, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible, scores, MASKED)
    m = scores.max(-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(scores - m), 0.0)
    total = p.sum(-1, keepdims=True)
    acc = jnp.einsum("bhrt,bhtd->bhrd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    return jnp.where(total > 0, acc / jnp.where(total > 0, total, 1.0), 0.0)

  per_step = max(1, _SCORE_BUDGET // max(1, b * hkv * rows * width))
  xs = (qg, slot_rows.transpose(1, 0, 2), idx.transpose(2, 0, 1, 3))
  out = jax.lax.map(attend, xs, batch_size=min(per_step, nq))  # [nQ, B, Hkv, rows, D]
  out = out.reshape(nq, b, hkv, tile, g, d).transpose(1, 0, 3, 2, 4, 5)
  return out.reshape(b, sp, hq, d)[:, :s].astype(q.dtype)
