"""Hadamard rotation (RotateKV): Sylvester construction, applied per head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def hadamard(d: int) -> np.ndarray:
  """Unnormalized Sylvester Hadamard matrix [d, d] of ±1 with H·Hᵀ = d·I (d a power of 2)."""
  if d <= 0 or d & (d - 1):
    raise ValueError(f"a Hadamard rotation needs a power-of-2 head_dim, got {d}")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < d:
    h = np.block([[h, h], [h, -h]])
  return h


def rotate(x: jax.Array) -> jax.Array:
  """x [..., D] @ H / sqrt(D): an orthogonal, symmetric rotation (its own inverse)."""
  d = x.shape[-1]
  h = jnp.asarray(hadamard(d) / np.sqrt(d), jnp.float32)
  return jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
