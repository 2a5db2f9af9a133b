"""Block-sparse attention as dense attention with the equivalent mask (float32 softmax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.reference import MASKED, visibility_mask

from .validation import num_q_blocks


def selected_slots(block_indices, num_queries: int, num_slots: int, *, block_q: int, block_k: int):
  """[B, Hkv, S, T] bool: whether key slot t's block is among query s's tile's blocks
  (entries outside ``[0, T // block_k)`` select nothing)."""
  nk = num_slots // block_k
  nq = num_q_blocks(num_queries, block_q)
  blocks = jnp.arange(nk, dtype=jnp.int32)
  chosen = (block_indices.astype(jnp.int32)[..., None] == blocks).any(-2)  # [B, Hkv, nQ, nK]
  tile_of_query = jnp.minimum(jnp.arange(num_queries) // block_q, nq - 1)
  block_of_slot = jnp.arange(num_slots) // block_k
  return chosen[:, :, tile_of_query][..., block_of_slot]


def block_sparse_attention_reference(
  q, k, v, q_slots, kv_start, block_indices, *, block_q: int, block_k: int
):
  """Dense attention over the block mask: ``[B, S, Hq, D]`` in q's dtype.

  Key slot t is visible to query s iff ``kv_start <= t <= q_slot`` and t's block
  (``t // block_k``) is among the entries of ``block_indices[b, h, s // block_q]``
  (the KV head's routing of the query's tile). A query that sees no key gets zeros
  (in every implementation of the op, unlike the dense ``attention`` op's reference).
  """
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g = hq // hkv
  mask = visibility_mask(q_slots, kv_start, t)[:, None] & selected_slots(
    block_indices, s, t, block_q=block_q, block_k=block_k
  )  # [B, Hkv, S, T]
  mask = jnp.repeat(mask, g, axis=1)  # [B, Hq, S, T]
  kf = jnp.repeat(k, g, axis=1).astype(jnp.float32)
  vf = jnp.repeat(v, g, axis=1).astype(jnp.float32)
  qf = q.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hq, S, D]
  scores = jnp.matmul(qf, kf.transpose(0, 1, 3, 2), precision=jax.lax.Precision.HIGHEST)
  scores = jnp.where(mask, scores / jnp.sqrt(jnp.float32(d)), MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.matmul(probs, vf, precision=jax.lax.Precision.HIGHEST)
  out = jnp.where(mask.any(-1)[..., None], out, 0.0)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)
