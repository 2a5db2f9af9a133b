"""Input checks for the attention op: a ValueError/TypeError naming the argument and shape."""

from __future__ import annotations

import jax.numpy as jnp


def _array(name, x):
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(f"attention: {name} must be an array, got {type(x).__name__}")


def validate(q, k, v, q_slots, kv_start) -> None:
  """q [B, S, Hq, D]; k, v [B, Hkv, T, D] with Hkv dividing Hq; q_slots [B, S]; kv_start [B]."""
  for name, x in (("q", q), ("k", k), ("v", v), ("q_slots", q_slots), ("kv_start", kv_start)):
    _array(name, x)
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(
      f"attention: q {tuple(q.shape)} must be [B, S, Hq, D] and k {tuple(k.shape)} [B, Hkv, T, D]"
    )
  b, s, hq, d = q.shape
  if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1]:
    raise ValueError(
      f"attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)} "
      "(same B and D; KV heads must divide query heads)"
    )
  if tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"attention: v {tuple(v.shape)} differs from k {tuple(k.shape)}")
  if tuple(q_slots.shape) != (b, s) or tuple(kv_start.shape) != (b,):
    raise ValueError(
      f"attention: q_slots {tuple(q_slots.shape)} must be {(b, s)} and "
      f"kv_start {tuple(kv_start.shape)} must be {(b,)}"
    )
  for name, x in (("q_slots", q_slots), ("kv_start", kv_start)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"attention: {name} must be integer, got {x.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"attention: q must be float, got {q.dtype}")
