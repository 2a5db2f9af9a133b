"""The plainest causal grouped-query attention: repeat K/V per query head, softmax in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Scores of masked slots. Finite, so a row with no visible key stays finite
# (a uniform average) and no NaN reaches a slot that other rows multiply by zero.
MASKED = -1e30


def visibility_mask(q_slots, kv_start, num_slots):
  """[B, S, T] bool: which key slots each query may attend to."""
  t = jnp.arange(num_slots, dtype=jnp.int32)
  return (t[None, None, :] <= q_slots[:, :, None]) & (t[None, None, :] >= kv_start[:, None, None])


def attention_reference(q, k, v, q_slots, kv_start):
  hq, hkv = q.shape[2], k.shape[1]
  k = jnp.repeat(k, hq // hkv, axis=1).astype(jnp.float32)  # [B, Hq, T, D]
  v = jnp.repeat(v, hq // hkv, axis=1).astype(jnp.float32)
  qf = q.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hq, S, D]
  scores = jnp.matmul(qf, k.transpose(0, 1, 3, 2), precision=jax.lax.Precision.HIGHEST)
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  mask = visibility_mask(q_slots, kv_start, k.shape[2])[:, None]
  scores = jnp.where(mask, scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.matmul(probs, v, precision=jax.lax.Precision.HIGHEST)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)
