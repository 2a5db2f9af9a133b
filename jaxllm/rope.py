"""Rotary position embedding (half-split layout: channel i pairs with i + D/2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _inv_freq(head_dim: int, theta: float) -> np.ndarray:
  return theta ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos/sin tables [B, S, D/2] in f32 for integer positions [B, S]."""
  angles = positions.astype(jnp.float32)[..., None] * _inv_freq(head_dim, theta)
  return jnp.cos(angles), jnp.sin(angles)


def rope_table_constants(num_positions: int, head_dim: int, theta: float):
  """NumPy cos/sin tables [num_positions, D/2] (f32) of positions 0..num_positions-1:
  trace-time constants, the same values `rope_tables` computes."""
  angles = np.arange(num_positions, dtype=np.float32)[:, None] * _inv_freq(head_dim, theta)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates [B, S, H, D] by half-split RoPE (first half pairs with second half)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
