"""`QTensor`: a quantized weight that stands in for a float one.

A weight ``w [K, *out]`` (the model computes ``x @ w`` over K) is stored as a
2-D quantized matrix ``[K', N]`` with ``N = prod(out)`` plus its scales (and
zero points), in the layouts the `pallas_kernels.quantized_matmul` kernels take.
Every part keeps the original's logical axis names (K's name for rows, the
major output name for columns), so a QTensor shards exactly like the weight it
replaces: the same rules table applies unchanged.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels import quantized_matmul as qmm

# method -> (bits per weight, what the scales are).
METHODS = {
  "w8a8": "int8 per-output-channel weights; activations quantized per token at run time",
  "w4a16": "int4 group-wise asymmetric weights (scale + zero point per group); float activations",
}


@flax.struct.dataclass
class QTensor:
  """Quantized weight. `values`, `scales`, `zeros` are arrays; the rest is static."""

  values: jax.Array  # w8a8: int8 [K, N]; w4a16: int8 [K/2, N] (two int4 per byte)
  scales: jax.Array  # w8a8: f32 [1, N]; w4a16: f32 [K/g, N]
  zeros: jax.Array | None  # w4a16: f32 [K/g, N]; w8a8: None
  method: str = flax.struct.field(pytree_node=False)
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # the float weight's shape
  contract_dims: int = flax.struct.field(pytree_node=False, default=1)  # leading dims forming K

  @property
  def num_bytes(self) -> int:
    """Exact storage: values, scales and zero points."""
    parts = [self.values, self.scales] + ([self.zeros] if self.zeros is not None else [])
    return sum(p.size * p.dtype.itemsize for p in parts)

  def logical_axes(self, weight_axes: tuple[str | None, ...]) -> "QTensor":
    """Logical names for each part, given the float weight's names."""
    c = self.contract_dims
    rows = next((a for a in weight_axes[:c] if a is not None), None)
    cols = next((a for a in weight_axes[c:] if a is not None), None)
    names = (rows, cols)
    return self.replace(
      values=names,
      scales=(None, cols) if self.method == "w8a8" else names,
      zeros=None if self.zeros is None else names,
    )

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The float weight this QTensor approximates, in its original shape."""
    if self.method == "w8a8":
      w = self.values.astype(jnp.float32) * self.scales
    else:
      w = qmm.dequantize_w4a16(self.values, self.scales, self.zeros)
    return w.reshape(self.shape).astype(dtype)


def quantize(w: jax.Array, method: str, group_size: int = 128, contract_dims: int = 1) -> QTensor:
  """Quantizes a float weight [*K, *out] (K = its first `contract_dims` dims) with `method`."""
  if method not in METHODS:
    raise ValueError(f"unknown quantization method {method!r}; choose one of {sorted(METHODS)}")
  if w.ndim <= contract_dims:
    raise ValueError(f"can only quantize a weight [*K, *out], got shape {tuple(w.shape)}")
  k = math.prod(w.shape[:contract_dims])
  w2 = jnp.asarray(w, jnp.float32).reshape(k, math.prod(w.shape[contract_dims:]))
  if method == "w8a8":
    values, scales = qmm.quantize_w8(w2)
    return QTensor(values, scales, None, method, tuple(w.shape), contract_dims)
  values, scales, zeros = qmm.quantize_w4a16(w2, group_size)
  return QTensor(values, scales, zeros, method, tuple(w.shape), contract_dims)
