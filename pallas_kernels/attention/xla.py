"""Fused-jnp causal grouped-query attention: dense for short queries, blocked loops for long ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .reference import MASKED as _MASKED
from .reference import visibility_mask

# Blocked causal attention (S > _SUB_BLOCK): query blocks of up to _Q_BLOCK
# queries, key blocks of _K_BLOCK slots, diagonal sub-blocks of _SUB_BLOCK queries.
_Q_BLOCK = 512
_K_BLOCK = 256
_SUB_BLOCK = 128


def attention_xla(q, k, v, q_slots, kv_start):
  if q.shape[1] > _SUB_BLOCK:
    return _attention_blocked(q, k, v, q_slots, kv_start)
  return _attention_dense(q, k, v, q_slots, kv_start)


def _attention_blocked(
  q, k, v, q_slots, kv_start, q_block=_Q_BLOCK, k_block=_K_BLOCK, sub_block=_SUB_BLOCK
):
  """Causal attention in blocks, as a loop: the program is the same size for any S.

  A scan over blocks of `q_block` queries. When every row's query slots are one
  run ``base, base + 1, ...`` (as the model makes them), a block whose first
  slot is d0 attends to two parts, each computed only where it is visible:
    * the keys before d0, which every query of the block may see: a loop over
      `k_block`-slot key blocks with an online softmax (running max and sum in
      float32); blocks wholly before every row's `kv_start` are skipped;
    * the diagonal keys [d0, d0 + q_block): sub-blocks of `sub_block` queries,
      each against the key prefix it can see (unrolled; a fixed number per block).
  The two softmax parts are merged exactly. With other query slots, the loop
  covers every key up to the block's newest slot (masked) and the diagonal part
  sees nothing. All loops have static trip counts (a skipped key block is a
  `lax.cond`), so the function stays reverse-differentiable.
  """
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g = hq // hkv
  q_block = min(q_block, -(-s // sub_block) * sub_block)
  nq = -(-s // q_block)
  extra = nq * q_block - s
  rows = q_block * g  # query rows per block and KV head: queries x their G heads
  scale = d**-0.5
  # Padded queries continue each row's slot run (their outputs are dropped).
  q_slots = q_slots.astype(jnp.int32)
  slots = jnp.concatenate([q_slots, q_slots[:, -1:] + 1 + jnp.arange(extra, dtype=jnp.int32)], 1)
  contiguous = jnp.all(slots == slots[0, 0] + jnp.arange(nq * q_block, dtype=jnp.int32))
  # Queries -> [nq, B, Hkv, rows, D], rows ordered (query, head in its group).
  qg = jnp.pad(q.reshape(b, s, hkv, g, d), ((0, 0), (0, extra), (0, 0), (0, 0), (0, 0)))
  qg = (
    qg.reshape(b, nq, q_block, hkv, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(nq, b, hkv, rows, d)
  )
  slots = jnp.repeat(slots.reshape(b, nq, q_block).transpose(1, 0, 2), g, axis=2)  # [nq, B, rows]
  # Keys/values padded (zeros) so key blocks tile them and every diagonal window
  # of the padded queries fits; keys -> [nk, B, Hkv, D, k_block] (transposed once,
  # so each score tile is a plain matrix product), values -> [nk, B, Hkv, k_block, D].
  nk = -(-(t + extra) // k_block)
  pad = ((0, 0), (0, 0), (0, nk * k_block - t), (0, 0))
  k = jnp.pad(k.astype(q.dtype), pad)
  v = jnp.pad(v, pad)
  k_blocks = k.reshape(b, hkv, nk, k_block, d).transpose(2, 0, 1, 4, 3)
  v_blocks = v.reshape(b, hkv, nk, k_block, d).transpose(2, 0, 1, 3, 4)
  kv_start = kv_start.astype(jnp.int32)
  first_block = jnp.min(kv_start) // k_block

  def visible(key_slots, sb, split, before):
    """[B, 1, rows, n] mask: causal, after kv_start, and before/at-or-after `split`."""
    ok = (key_slots[None, None] <= sb[:, :, None]) & (
      key_slots[None, None] >= kv_start[:, None, None]
    )
    side = key_slots < split if before else key_slots >= split
    return (ok & side[None, None])[:, None]

  def attend_query_block(_, xs):
    qb, sb = xs  # [B, Hkv, rows, D], [B, rows]
    d0 = sb[0, 0]  # the block's first slot, when the slots are one run
    split = jnp.where(contiguous, d0, nk * k_block)  # keys before it: the loop
    stop = jnp.where(contiguous, (d0 + k_block - 1) // k_block, jnp.max(sb) // k_block + 1)
    stop = jnp.clip(stop, 0, nk)

    def key_block(j, carry):
      m, total, acc = carry
      kb = jax.lax.dynamic_index_in_dim(k_blocks, j, keepdims=False)
      vb = jax.lax.dynamic_index_in_dim(v_blocks, j, keepdims=False)
      scores = jnp.einsum("nhqd,nhdt->nhqt", qb, kb, preferred_element_type=jnp.float32) * scale
      key_slots = j * k_block + jnp.arange(k_block, dtype=jnp.int32)
      scores = jnp.where(visible(key_slots, sb, split, True), scores, _MASKED)
      m_new = jnp.maximum(m, scores.max(-1))
      rescale = jnp.exp(m - m_new)
      p = jnp.exp(scores - m_new[..., None])
      total = rescale * total + p.sum(-1)
      pv = jnp.einsum("nhqt,nhtd->nhqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
      return m_new, total, rescale[..., None] * acc + pv

    def maybe_key_block(j, carry):
      return jax.lax.cond((j >= first_block) & (j < stop), key_block, lambda j, c: c, j, carry)

    init = (
      jnp.full((b, hkv, rows), _MASKED, jnp.float32),
      jnp.zeros((b, hkv, rows), jnp.float32),
      jnp.zeros((b, hkv, rows, d), jnp.float32),
    )
    m_loop, total_loop, acc_loop = jax.lax.fori_loop(0, nk, maybe_key_block, init)

    # Diagonal: sub-block r (queries d0 + r*sub .. ) sees keys [d0, d0 + (r+1)*sub).
    w0 = jnp.clip(d0, 0, nk * k_block - q_block)
    k_win = jax.lax.dynamic_slice_in_dim(k, w0, q_block, axis=2)  # [B, Hkv, q_block, D]
    v_win = jax.lax.dynamic_slice_in_dim(v, w0, q_block, axis=2)
    parts = []
    for r in range(q_block // sub_block):
      lo, hi, n = r * sub_block * g, (r + 1) * sub_block * g, (r + 1) * sub_block
      scores = jnp.einsum(
        "nhqd,nhtd->nhqt", qb[:, :, lo:hi], k_win[:, :, :n], preferred_element_type=jnp.float32
      )
      key_slots = w0 + jnp.arange(n, dtype=jnp.int32)
      # The finite fill keeps a row with no visible key finite (a uniform average).
      scores = jnp.where(visible(key_slots, sb[:, lo:hi], split, False), scores * scale, _MASKED)
      m_r = scores.max(-1)
      p = jnp.exp(scores - m_r[..., None])
      pv = jnp.einsum(
        "nhqt,nhtd->nhqd",
        p.astype(v_win.dtype),
        v_win[:, :, :n],
        preferred_element_type=jnp.float32,
      )
      parts.append((m_r, p.sum(-1), pv))
    m_diag, total_diag, acc_diag = (jnp.concatenate(x, axis=2) for x in zip(*parts))
    # Merge the two softmax parts; the part holding the max has a sum >= 1.
    m = jnp.maximum(m_loop, m_diag)
    w_loop, w_diag = jnp.exp(m_loop - m), jnp.exp(m_diag - m)
    total = w_loop * total_loop + w_diag * total_diag
    acc = w_loop[..., None] * acc_loop + w_diag[..., None] * acc_diag
    return None, acc / total[..., None]

  _, out = jax.lax.scan(attend_query_block, None, (qg, slots))  # [nq, B, Hkv, rows, D]
  out = out.reshape(nq, b, hkv, q_block, g, d).transpose(1, 0, 3, 2, 4, 5)
  return out.reshape(b, nq * q_block, hq, d)[:, :s].astype(q.dtype)


def _attention_dense(q, k, v, q_slots, kv_start):
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g = hq // hkv
  # Queries [B, S, Hkv, G, D] -> [B*Hkv, S*G, D]: the query side is tiny, so
  # this is the only transpose; K and V are read in place as [B*Hkv, T, D]
  # (3-D, so XLA:CPU reads a donated cache without copying it), each KV head
  # shared by its G query heads.
  qg = q.reshape(b, s, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b * hkv, s * g, d)
  k = k.reshape(b * hkv, t, d).astype(q.dtype)
  v = v.reshape(b * hkv, t, d)
  scores = jnp.einsum("nqd,ntd->nqt", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
  mask = jnp.repeat(visibility_mask(q_slots, kv_start, t), g, axis=1)  # [B, S*G, T]
  mask = jnp.broadcast_to(mask[:, None], (b, hkv, s * g, t)).reshape(b * hkv, s * g, t)
  # A finite fill keeps fully masked rows (left-padding queries) finite, so no
  # NaN can reach a value slot that other rows multiply by zero.
  scores = jnp.where(mask, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("nqt,ntd->nqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out.reshape(b, hkv, s, g, d).transpose(0, 2, 1, 3, 4).reshape(b, s, hq, d)
  return out.astype(q.dtype)
