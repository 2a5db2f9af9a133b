"""W4A16: group-wise asymmetric int4 weights x bf16/f32 activations, f32 accumulation.

Layout (see `common` for the int4 packing):
  * `w_q`: int8 [K/2, N], "global halves" packing of unsigned nibbles q in [0, 15].
  * `scales`, `zeros`: [K/g, N] (f32 or bf16); `w[k, n] = (q[k, n] - zeros[k//g, n]) * scales[k//g, n]`.
  * Requires K % (2*g) == 0 so that each half of K holds whole groups. For SmolLM2
    (K=576) that means g=32 (g=64 and g=128 are refused with ValueError).

Kernel: grid over (M/bm, N/bn) blocks, whole-K blocks, and a `fori_loop` over the
groups of one half of K; each step dequantizes one group from each half and does two
(bm, g) x (g, bn) dots into an f32 carry. This is the portable form (lowers for Mosaic
TPU and Triton); no grid-axis reduction into `o_ref`. Scales/zeros are passed to the
kernel as 3-D (K/g, 1, N) with block (K/g, 1, bn), so the kernel indexes a group on
the untiled leading dim and the block obeys the TPU (8,128) rule.

M is zero-padded in the wrapper to a multiple of block_m and sliced back; N must be a
multiple of block_n (weights are never padded); K is never padded.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.quantized_matmul import common

_NAME = "w4a16_matmul"
_X_DTYPES = (jnp.bfloat16, jnp.float32)
_S_DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes; None picks a default for the backend (see `common.pick_block_*`)."""

  block_m: int | None = None
  block_n: int | None = None


def quantize_w4a16(w: jax.Array, group_size: int = 128):
  """Asymmetric min/max group-wise int4 quantization of a float weight [K, N].

  Args:
    w: float weight [K, N] (the matmul computes x @ w).
    group_size: rows of K sharing one scale/zero point; K % (2*group_size) == 0.

  Returns:
    (w_q int8 [K/2, N] packed, scales f32 [K/g, N], zeros f32 [K/g, N]).
  """
  if w.ndim != 2:
    raise ValueError(f"quantize_w4a16: w must be 2-D [K, N], got shape {tuple(w.shape)}")
  k, n = w.shape
  if group_size < 2 or group_size % 2 or k % (2 * group_size):
    raise ValueError(
      f"quantize_w4a16: K={k} (w shape {tuple(w.shape)}) must be a multiple of "
      f"2*group_size={2 * group_size}"
    )
  wg = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
  wmin = jnp.minimum(wg.min(axis=1), 0.0)
  wmax = jnp.maximum(wg.max(axis=1), 0.0)
  scales = jnp.maximum((wmax - wmin) / 15.0, 1e-8)
  zeros = jnp.clip(jnp.round(-wmin / scales), 0, 15)
  q = jnp.clip(jnp.round(wg / scales[:, None]) + zeros[:, None], 0, 15)
  return common.pack_int4(q.reshape(k, n)), scales, zeros


def dequantize_w4a16(w_q: jax.Array, scales: jax.Array, zeros: jax.Array) -> jax.Array:
  """Float32 weight [K, N] from the packed representation."""
  q = common.unpack_int4_full(w_q, signed=False).astype(jnp.float32)
  g = q.shape[0] // scales.shape[0]
  s = jnp.repeat(scales.astype(jnp.float32), g, axis=0)
  z = jnp.repeat(zeros.astype(jnp.float32), g, axis=0)
  return (q - z) * s


def w4a16_matmul_reference(x, w_q, scales, zeros, *, out_dtype=None) -> jax.Array:
  """Pure-jnp reference: dequantize, cast to x.dtype, dot with f32 accumulation."""
  _validate(x, w_q, scales, zeros)
  w = dequantize_w4a16(w_q, scales, zeros).astype(x.dtype)
  out = jnp.dot(x, w, preferred_element_type=jnp.float32)
  return out.astype(out_dtype or x.dtype)


def _validate(x, w_q, scales, zeros) -> int:
  """Check shapes/dtypes; return the group size."""
  if x.ndim != 2:
    raise ValueError(f"{_NAME}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
  common.check_dtype(_NAME, "x", x, _X_DTYPES)
  common.check_dtype(_NAME, "w_q", w_q, (jnp.int8, jnp.uint8))
  common.check_dtype(_NAME, "scales", scales, _S_DTYPES)
  common.check_dtype(_NAME, "zeros", zeros, _S_DTYPES)
  k = x.shape[1]
  if w_q.ndim != 2 or w_q.shape[0] * 2 != k:
    raise ValueError(
      f"{_NAME}: w_q shape {tuple(w_q.shape)} does not match x shape {tuple(x.shape)}; "
      f"expected [K/2={k // 2}, N]"
    )
  n = w_q.shape[1]
  if scales.ndim != 2 or scales.shape[1] != n or scales.shape[0] == 0 or k % scales.shape[0]:
    raise ValueError(
      f"{_NAME}: scales shape {tuple(scales.shape)} must be [K/g, N] with K={k}, N={n}"
    )
  common.check_shape(_NAME, "zeros", zeros, scales.shape)
  g = k // scales.shape[0]
  if g % 2 or k % (2 * g):
    raise ValueError(f"{_NAME}: K={k} must be a multiple of 2*group_size={2 * g}")
  return g


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, group: int, n_half_groups: int):
  half = group * n_half_groups
  bm, bn = o_ref.shape

  def dequant(p_nibbles, gi):
    s = s_ref[gi].astype(jnp.float32)
    z = z_ref[gi].astype(jnp.float32)
    return ((p_nibbles.astype(jnp.float32) - z) * s).astype(x_ref.dtype)

  def body(i, acc):
    r0 = common.chunk_start(i, group)
    lo, hi = common.unpack_int4(w_ref[pl.ds(r0, group), :], signed=False)
    x_lo = x_ref[:, pl.ds(r0, group)]
    x_hi = x_ref[:, pl.ds(r0 + half, group)]
    acc += jnp.dot(x_lo, dequant(lo, i), preferred_element_type=jnp.float32)
    acc += jnp.dot(x_hi, dequant(hi, i + n_half_groups), preferred_element_type=jnp.float32)
    return acc

  acc = common.k_loop(n_half_groups, group, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def w4a16_matmul(
  x: jax.Array,
  w_q: jax.Array,
  scales: jax.Array,
  zeros: jax.Array,
  *,
  out_dtype=None,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  compiler_params=None,
) -> jax.Array:
  """x [M, K] @ dequant(w_q) [K, N] with a Pallas kernel.

  Args:
    x: activations [M, K], bf16 or f32.
    w_q: packed int4 weights int8 [K/2, N] (from `quantize_w4a16`).
    scales: [K/g, N] f32/bf16.
    zeros: [K/g, N] f32/bf16 (integer-valued zero points in [0, 15]).
    out_dtype: output dtype (default x.dtype).
    block_sizes: tile sizes; defaults depend on the backend.
    interpret: run the kernel in Pallas interpret mode (CPU).
    compiler_params: backend params; default Mosaic TPU. Pass
      `common.triton_params()` to lower for Triton.

  Returns:
    [M, N] array of `out_dtype`.
  """
  g = _validate(x, w_q, scales, zeros)
  bs = block_sizes or BlockSizes()
  triton = common.is_triton(compiler_params)
  m, k = x.shape
  n = w_q.shape[1]
  if triton and (not common.is_pow2(g) or g < 16):
    raise ValueError(f"{_NAME}: Triton needs a power-of-2 group_size >= 16, got {g}")
  bm = common.pick_block_m(m, bs.block_m)
  bn = common.pick_block_n(n, bs.block_n, triton)
  m_pad = common.round_up(m, bm)
  common.check_blocks(_NAME, m_pad, n, bm, bn, triton)
  n_groups = k // g
  s3 = scales.reshape(n_groups, 1, n)
  z3 = zeros.reshape(n_groups, 1, n)
  out_dtype = out_dtype or x.dtype
  kernel = functools.partial(_kernel, group=g, n_half_groups=n_groups // 2)
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
    grid=(m_pad // bm, n // bn),
    in_specs=[
      pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
      pl.BlockSpec((k // 2, bn), lambda i, j: (0, j)),
      pl.BlockSpec((n_groups, 1, bn), lambda i, j: (0, 0, j)),
      pl.BlockSpec((n_groups, 1, bn), lambda i, j: (0, 0, j)),
    ],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    compiler_params=common.default_compiler_params(compiler_params),
    interpret=interpret,
    name="w4a16_matmul",
  )(common.pad_rows(x, m_pad), w_q, s3, z3)
  return out[:m]
