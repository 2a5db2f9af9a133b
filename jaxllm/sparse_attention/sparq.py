"""SparQ attention in jnp: approximate scores from r key channels, exact attention over the
top k slots, and a correction for the slots skipped (`methods.SparQ`).

Every query is handled on its own (decode steps, or each query of a chunk or a
one-pass forward, which therefore score exactly as token-by-token decoding over a
dense cache). Sparsity is expressed as masks over the [T] slots, so the arithmetic is
dense-sized; what a real kernel reads is counted by `accounting`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.sparse_attention.methods import SparQ

_MASKED = -1e30


def check_shapes(owner: str, q, k, v, q_slots, kv_start) -> None:
  """ValueError naming `owner` unless q [B, S, Hq, D], k = v [B, Hkv, T, D] with Hkv
  dividing Hq, q_slots [B, S] and kv_start [B]."""
  if q.ndim != 4 or k.ndim != 4 or tuple(v.shape) != tuple(k.shape):
    raise ValueError(
      f"{owner}: q {tuple(q.shape)} must be [B, S, Hq, D] and k, v {tuple(k.shape)}, "
      f"{tuple(v.shape)} one shape [B, Hkv, T, D]"
    )
  b, s, hq, d = q.shape
  if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
    raise ValueError(
      f"{owner}: k {tuple(k.shape)} does not fit q {tuple(q.shape)} (same B and D; the "
      f"KV heads {k.shape[1]} must divide the query heads {hq})"
    )
  if tuple(q_slots.shape) != (b, s) or tuple(kv_start.shape) != (b,):
    raise ValueError(
      f"{owner}: q_slots {tuple(q_slots.shape)} must be {(b, s)} and kv_start "
      f"{tuple(kv_start.shape)} {(b,)}"
    )


def sparq_attention(q, k, v, q_slots, kv_start, method: SparQ) -> jax.Array:
  """SparQ attention.

  Args:
    q: [B, S, Hq, D] queries (after RoPE).
    k, v: [B, Hkv, T, D] key/value slots; slot t is visible to a query at slot s iff
      kv_start[b] <= t <= s.
    q_slots: [B, S] int slot of each query; kv_start: [B] int.
    method: the `SparQ` parameters.

  Returns:
    [B, S, Hq, D] float32.
  """
  check_shapes("SparQ", q, k, v, q_slots, kv_start)
  if method.per_head and k.shape[1] < q.shape[2]:  # every query head its own group of one
    groups = q.shape[2] // k.shape[1]
    k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g = hq // hkv
  method.check_call(d, t)
  # Head-major layout [B, Hkv, S, G, ...]: every product is a GEMM batched over (B, Hkv).
  qg = q.astype(jnp.float32).reshape(b, s, hkv, g, d).transpose(0, 2, 1, 3, 4)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  slots = jnp.arange(t, dtype=jnp.int32)
  visible = (slots[None, None] <= q_slots[:, :, None]) & (
    slots[None, None] >= kv_start[:, None, None]
  )
  visible = visible[:, None, :, None, :]  # [B, 1, S, 1, T]

  # Step 1: the r channels of largest |q| over the group, and scores from them alone.
  magnitude = jnp.abs(qg)
  _, channels = jax.lax.top_k(magnitude.sum(3), method.r)  # [B, Hkv, S, r]
  chosen = jnp.any(channels[..., None] == jnp.arange(d), axis=-2)  # [B, Hkv, S, D]
  q_r = jnp.where(chosen[:, :, :, None], qg, 0.0)
  share = jnp.abs(q_r).sum(-1) / jnp.maximum(magnitude.sum(-1), 1e-30)  # [B, Hkv, S, G]
  approx = jnp.einsum("bhsgd,bhtd->bhsgt", q_r / jnp.sqrt(d * share)[..., None], kf)
  approx = jnp.where(visible, approx, _MASKED)
  approx_p = jax.nn.softmax(approx, axis=-1)

  # Step 2: the k slots of largest approximate probability over the group.
  group_p = approx_p.sum(3, keepdims=True)  # [B, Hkv, S, 1, T]
  kth = jax.lax.top_k(group_p, method.k)[0][..., -1:]
  picked = visible & (group_p >= kth)

  exact = jnp.einsum("bhsgd,bhtd->bhsgt", qg * d**-0.5, kf)
  exact = jnp.where(picked, exact, _MASKED)
  m = exact.max(-1, keepdims=True)
  weights = jnp.where(picked, jnp.exp(exact - m), 0.0)
  z_picked = weights.sum(-1, keepdims=True)
  sparse = jnp.einsum("bhsgt,bhtd->bhsgd", weights, vf)
  sparse = sparse / jnp.maximum(z_picked, 1e-30)

  alpha = jnp.where(picked, approx_p, 0.0).sum(-1, keepdims=True)  # [B, Hkv, S, G, 1]
  if method.correction == "mean_v":
    seen = visible[:, 0, :, 0].astype(jnp.float32)  # [B, S, T]
    mean_v = jnp.einsum("bst,bhtd->bhsd", seen, vf)
    mean_v = mean_v / jnp.maximum(seen.sum(-1), 1.0)[:, None, :, None]
    out = alpha * sparse + (1.0 - alpha) * mean_v[:, :, :, None]
  elif method.correction == "rescale":
    out = alpha * sparse
  else:
    out = sparse
  out = out.transpose(0, 2, 1, 3, 4)
  return out.reshape(b, s, hq, d)
