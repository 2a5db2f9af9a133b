"""Rotary position embedding (half-split layout: channel i pairs with i + D/2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos/sin tables [B, S, D/2] in f32 for integer positions [B, S]."""
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates [B, S, H, D] by half-split RoPE (first half pairs with second half)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
