"""W4A16: group-wise asymmetric int4 weights x bf16/f32 activations, f32 accumulation.

Layout (see `common` for the int4 packing):
  * `w_q`: int8 [K/2, N], "global halves" packing of unsigned nibbles q in [0, 15].
  * `scales`, `mins`: [K/g, N] (f32 or bf16); `w[k, n] = q[k, n] * scales[k//g, n] + mins[k//g, n]`.
    The grid runs from the group's minimum to its maximum (a float offset, not an
    integer zero point), which is the GGUF Q4_1 form: Q4_1 weights round-trip exactly.
  * Requires g | K and K even. The K loop steps over chunks of c = gcd(g, K/2) rows, so
    every chunk of either half lies inside one group (K=640, g=128: c=64).

Kernel: grid over (M/bm, N/bn) blocks, whole-K blocks, and a loop over the chunks of
one half of K; each step dequantizes one chunk from each half (with its group's
scale and minimum) and does two (bm, c) x (c, bn) dots into an f32 carry. This is
the portable form (lowers for Mosaic TPU and Triton); no grid-axis reduction into
`o_ref`. Scales/mins are passed to the kernel as 3-D (K/g, 1, N) with block
(K/g, 1, bn), so the kernel indexes a group on the untiled leading dim and the block
obeys the TPU (8,128) rule.

M is zero-padded in the wrapper to a multiple of block_m and sliced back; N must be a
multiple of block_n (weights are never padded); K is never padded here (callers pad K
with zero rows beforehand, see `jaxllm.quant`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

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


def quantize_w4a16(w: jax.Array, group_size: int = 128, scale_dtype=jnp.float32):
  """Asymmetric min/max group-wise int4 quantization of a float weight [K, N].

  Each group of `group_size` rows gets the grid ``min + scale * {0..15}`` with
  ``scale = (max - min) / 15``: the float offset keeps the group's own range (0 need
  not be on the grid), so a weight already on such a grid (GGUF Q4_1) is reproduced
  exactly up to float rounding.

  Args:
    w: float weight [K, N] (the matmul computes x @ w).
    group_size: rows of K sharing one scale/minimum; must divide K (K even).
    scale_dtype: storage of scales and minimums, f32 or bf16. Codes are chosen
      against the stored (rounded) values.

  Returns:
    (w_q int8 [K/2, N] packed, scales [K/g, N], mins [K/g, N]).
  """
  common.check_array("quantize_w4a16", "w", w)
  if w.ndim != 2:
    raise ValueError(f"quantize_w4a16: w must be 2-D [K, N], got shape {tuple(w.shape)}")
  common.check_dtype("quantize_w4a16", "w", w, (jnp.float32, jnp.bfloat16, jnp.float16))
  common.check_dtype("quantize_w4a16", "scale_dtype", scale_dtype, _S_DTYPES)
  k, n = w.shape
  _check_group("quantize_w4a16", k, group_size)
  wg = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
  wmin = wg.min(axis=1)
  wmax = wg.max(axis=1)
  scales = jnp.maximum((wmax - wmin) / 15.0, 1e-12).astype(scale_dtype)
  mins = wmin.astype(scale_dtype)
  s32, m32 = scales.astype(jnp.float32), mins.astype(jnp.float32)
  q = jnp.clip(jnp.round((wg - m32[:, None]) / s32[:, None]), 0, 15)
  return common.pack_int4(q.reshape(k, n)), scales, mins


def _check_group(name: str, k: int, group_size: int) -> None:
  if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
    raise ValueError(f"{name}: group_size must be an even int >= 2, got {group_size!r}")
  if k % 2 or k % group_size:
    raise ValueError(
      f"{name}: K={k} is not divisible by group_size={group_size} (and must be even); "
      f"pad K with zero rows (jaxllm.quant: pad_k=True) or pick a group size dividing K"
    )


def dequantize_w4a16(w_q: jax.Array, scales: jax.Array, mins: jax.Array) -> jax.Array:
  """Float32 weight [K, N] from the packed representation."""
  q = common.unpack_int4_full(w_q, signed=False).astype(jnp.float32)
  g = q.shape[0] // scales.shape[0]
  s = jnp.repeat(scales.astype(jnp.float32), g, axis=0)
  m = jnp.repeat(mins.astype(jnp.float32), g, axis=0)
  return q * s + m


def w4a16_matmul_reference(x, w_q, scales, mins, *, out_dtype=None) -> jax.Array:
  """Pure-jnp reference: dequantize, cast to x.dtype, dot with f32 accumulation."""
  _validate(x, w_q, scales, mins)
  w = dequantize_w4a16(w_q, scales, mins).astype(x.dtype)
  out = jnp.dot(x, w, preferred_element_type=jnp.float32)
  return out.astype(out_dtype or x.dtype)


def _validate(x, w_q, scales, mins) -> int:
  """Check shapes/dtypes; return the group size."""
  for arg, a in (("x", x), ("w_q", w_q), ("scales", scales), ("mins", mins)):
    common.check_array(_NAME, arg, a)
  if x.ndim != 2:
    raise ValueError(f"{_NAME}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
  common.check_dtype(_NAME, "x", x, _X_DTYPES)
  common.check_dtype(_NAME, "w_q", w_q, (jnp.int8, jnp.uint8))
  common.check_dtype(_NAME, "scales", scales, _S_DTYPES)
  common.check_dtype(_NAME, "mins", mins, _S_DTYPES)
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
  common.check_shape(_NAME, "mins", mins, scales.shape)
  g = k // scales.shape[0]
  _check_group(_NAME, k, g)
  return g


def _kernel(x_ref, w_ref, s_ref, m_ref, o_ref, *, group: int, chunk: int, n_steps: int, triton):
  half = chunk * n_steps
  per_group = group // chunk  # chunks per group
  bm, bn = o_ref.shape

  def group_of(i):
    if isinstance(i, int):
      return i // per_group
    return i if per_group == 1 else jax.lax.div(i, per_group)

  def dequant(p_nibbles, gi):
    s = s_ref[gi].astype(jnp.float32)
    m = m_ref[gi].astype(jnp.float32)
    return (p_nibbles.astype(jnp.float32) * s + m).astype(x_ref.dtype)

  def body(i, acc):
    r0 = common.chunk_start(i, chunk)
    lo, hi = common.unpack_int4(w_ref[pl.ds(r0, chunk), :], signed=False)
    x_lo = x_ref[:, pl.ds(r0, chunk)]
    x_hi = x_ref[:, pl.ds(r0 + half, chunk)]
    acc += jnp.dot(x_lo, dequant(lo, group_of(i)), preferred_element_type=jnp.float32)
    acc += jnp.dot(x_hi, dequant(hi, group_of(i + n_steps)), preferred_element_type=jnp.float32)
    return acc

  acc = common.k_loop(n_steps, chunk, body, jnp.zeros((bm, bn), jnp.float32), triton)
  o_ref[...] = acc.astype(o_ref.dtype)


def w4a16_matmul(
  x: jax.Array,
  w_q: jax.Array,
  scales: jax.Array,
  mins: jax.Array,
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
    mins: [K/g, N] f32/bf16 (each group's float offset: w = q * scale + min).
    out_dtype: output dtype (default x.dtype).
    block_sizes: tile sizes; defaults depend on the backend.
    interpret: run the kernel in Pallas interpret mode (CPU).
    compiler_params: default: Triton's on a GPU backend, else Mosaic TPU's; pass
      `common.triton_params()` to export for Triton from another backend.

  Returns:
    [M, N] array of `out_dtype`.
  """
  g = _validate(x, w_q, scales, mins)
  common.check_dtype(_NAME, "out_dtype", out_dtype or x.dtype, (jnp.float32, jnp.bfloat16))
  bs = block_sizes or BlockSizes()
  compiler_params = common.default_compiler_params(compiler_params)
  triton = common.is_triton(compiler_params)
  m, k = x.shape
  n = w_q.shape[1]
  chunk = math.gcd(g, k // 2)
  if triton and (not common.is_pow2(chunk) or chunk < 16):
    raise ValueError(
      f"{_NAME}: Triton needs a power-of-2 K chunk >= 16, got gcd(group_size={g}, K/2={k // 2})"
    )
  n_groups = k // g

  def need(bm, bn):
    blocks = [((bm, k), x.dtype), ((k // 2, bn), w_q.dtype), ((bm, bn), out_dtype or x.dtype)]
    blocks += [((n_groups, 1, bn), s.dtype) for s in (scales, mins)]
    return common.vmem_estimate(blocks, 4 * 4 * max(bm, 8) * bn + 3 * 4 * chunk * bn)

  bm, bn, m_pad = common.fit_blocks(_NAME, m, n, bs, triton, compiler_params, need)
  s3 = scales.reshape(n_groups, 1, n)
  m3 = mins.reshape(n_groups, 1, n)
  out_dtype = out_dtype or x.dtype
  kernel = functools.partial(
    _kernel, group=g, chunk=chunk, n_steps=(k // 2) // chunk, triton=triton
  )
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
    compiler_params=compiler_params,
    interpret=interpret,
    name="w4a16_matmul",
  )(common.pad_rows(x, m_pad), w_q, s3, m3)
  return out[:m]
