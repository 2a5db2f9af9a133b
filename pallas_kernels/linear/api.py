"""The ``linear`` op: rows ``x [..., K] @ w [K, N]`` of float weights, float32 accumulation.

Implementations:
  * ``reference``: float32 tensordot at highest precision, cast to x's dtype.
  * ``xla``: one dot in x's dtype with float32 accumulation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.op_api import MATMUL_IN, MATMUL_OUT, MATMUL_ROWS, Implementation, Op, Sharding


def validate(x, w) -> None:
  for name, a in (("x", x), ("w", w)):
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
      raise TypeError(f"linear: {name} must be an array, got {type(a).__name__}")
  if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"linear: x {tuple(x.shape)} does not contract with w {tuple(w.shape)}")
  for name, a in (("x", x), ("w", w)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"linear: {name} must be float, got {a.dtype} (shape {tuple(a.shape)})")


def linear_xla(x, w):
  """x [..., K] @ w [K, N] in x's dtype."""
  w = w.astype(x.dtype) if w.dtype != x.dtype else w
  rows = math.prod(x.shape[:-1])
  if x.dtype == jnp.bfloat16 and rows == 1 and jax.default_backend() == "cpu":
    # XLA:CPU has no fast bf16 matrix-vector path, but its bf16 GEMM reads
    # weights at full speed from 2 rows up: compute a 2-row product and keep
    # the first row.
    x2 = jnp.concatenate([x.reshape(1, -1)] * 2, axis=0)
    out = jnp.dot(x2, w, preferred_element_type=jnp.float32)[:1]
    return out.reshape(*x.shape[:-1], w.shape[1]).astype(x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def linear_reference(x, w):
  out = jnp.tensordot(
    x.astype(jnp.float32), w.astype(jnp.float32), axes=1, precision=jax.lax.Precision.HIGHEST
  )
  return out.astype(x.dtype)


# Rows x [M, K] @ w [K, N]: rows and columns split freely; K splits into partial sums.
LINEAR_SHARDING = Sharding(
  args=((MATMUL_ROWS, MATMUL_IN), (MATMUL_IN, MATMUL_OUT)),
  out=(MATMUL_ROWS, MATMUL_OUT),
  summed=(MATMUL_IN,),
)

LINEAR = Op(
  "linear",
  (
    Implementation("reference", "reference", linear_reference),
    Implementation("xla", "xla", linear_xla),
  ),
  validate=validate,
  sharding=LINEAR_SHARDING,
)
