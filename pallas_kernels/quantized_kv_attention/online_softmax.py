"""The online-softmax step both decode kernels take per chunk of key slots.

Plain jnp on values (no refs), so it lowers inside Mosaic TPU and Triton kernels
alike; each kernel keeps its own state handling (VMEM scratch refs in
`tpu_kernel`, a ``fori_loop`` carry in `portable_kernel`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from .reference import MASK_VALUE


def online_softmax_step(
  m_prev: jax.Array,
  l_prev: jax.Array,
  accs: Sequence[jax.Array],
  s: jax.Array,
  valid: jax.Array,
  pv_fn: Callable[[jax.Array], Sequence[jax.Array]],
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
  """Folds one chunk of scores into the running max, sum and accumulators.

  Args:
    m_prev: ``(G, 1)`` running max of the scores seen so far (MASK_VALUE at first).
    l_prev: ``(G, 1)`` running sum of ``exp(score - max)``.
    accs: the running ``probabilities @ values`` parts, each ``(G, dp)``.
    s: ``(G, S)`` float32 scores of this chunk's S slots.
    valid: bool, broadcastable to ``s``: which slots count.
    pv_fn: ``pv_fn(p)`` -> one ``(G, dp)`` product per accumulator for the
      chunk's unnormalized probabilities ``p`` ``(G, S)`` (zero at invalid slots).

  Returns:
    ``(m, l, accs)`` after the chunk. A row with no valid slot so far keeps
    ``l == 0`` (the kernels return zeros for it).
  """
  s = jnp.where(valid, s, MASK_VALUE)
  m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
  l_new = alpha * l_prev + p.sum(axis=-1, keepdims=True)
  accs = tuple(alpha * a + pv for a, pv in zip(accs, pv_fn(p), strict=True))
  return m_new, l_new, accs


def inverse_sum(total: jax.Array) -> jax.Array:
  """``1 / total`` where the running sum is positive, else 0 (a row that saw no valid slot)."""
  return jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
