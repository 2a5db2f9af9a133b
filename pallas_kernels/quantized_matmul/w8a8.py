"""W8A8: int8 activations x int8 weights, int32 accumulation, f32/bf16 output.

Scales: per-output-channel weight scale `w_scale` [1, N] and per-token activation
scale `x_scale` [M, 1] (dynamic, computed by `quantize_activations_int8`), both f32:
`out[m, n] = x_scale[m] * w_scale[n] * sum_k x_q[m, k] * w_q[k, n]`.

Kernel: grid over (M/bm, N/bn) blocks, whole-K blocks, `fori_loop` over K chunks of
block_k with an int32 carry (portable form for Mosaic TPU and Triton). The integer
part is exposed on its own as `int8_matmul` (int32 output, exact). M is zero-padded in
the wrapper and sliced back; N must be a multiple of block_n and K of block_k.

`dot_dtype` picks the dot: int8 operands with an int32 accumulator (the default), or
the same int8 codes converted in the kernel to bf16 (exact: |code| <= 127) with an f32
accumulator, for chips whose matrix units take no int8 (TPU v4). The f32 sum of
integer products is exact while it stays below 2**24 (K <= 1040 always; beyond, the
rounding is float32's, far below the quantization error).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.quantized_matmul import common

_NAME = "w8a8_matmul"
_X_DTYPES = (jnp.bfloat16, jnp.float32)
_OUT_DTYPES = (jnp.float32, jnp.bfloat16)
DOT_DTYPES = (jnp.int8, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes; None picks a default for the backend. block_k is the K chunk per step."""

  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None


def quantize_w8(w: jax.Array):
  """Symmetric per-output-channel int8 quantization of a float weight [K, N].

  Returns:
    (w_q int8 [K, N], w_scale f32 [1, N]).
  """
  common.check_array("quantize_w8", "w", w)
  if w.ndim != 2:
    raise ValueError(f"quantize_w8: w must be 2-D [K, N], got shape {tuple(w.shape)}")
  w = w.astype(jnp.float32)
  scale = jnp.maximum(jnp.abs(w).max(axis=0, keepdims=True) / 127.0, 1e-8)
  return int8_codes(w, scale).astype(jnp.int8), scale


def int8_codes(w: jax.Array, scale: jax.Array) -> jax.Array:
  """Symmetric int8 codes (as float32) of `w` on the grid `scale` (broadcast against w)."""
  return jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127)


def quantize_activations_int8(x: jax.Array):
  """Dynamic symmetric per-token int8 quantization of x [M, K].

  Returns:
    (x_q int8 [M, K], x_scale f32 [M, 1]).
  """
  common.check_array("quantize_activations_int8", "x", x)
  if x.ndim != 2:
    raise ValueError(f"quantize_activations_int8: x must be 2-D, got shape {tuple(x.shape)}")
  x = x.astype(jnp.float32)
  scale = jnp.maximum(jnp.abs(x).max(axis=1, keepdims=True) / 127.0, 1e-8)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _validate_int(x_q, w_q, name=_NAME) -> None:
  common.check_array(name, "x_q", x_q)
  common.check_array(name, "w_q", w_q)
  if x_q.ndim != 2 or w_q.ndim != 2:
    raise ValueError(f"{name}: x_q {tuple(x_q.shape)} and w_q {tuple(w_q.shape)} must both be 2-D")
  common.check_dtype(name, "x_q", x_q, (jnp.int8,))
  common.check_dtype(name, "w_q", w_q, (jnp.int8,))
  if x_q.shape[1] != w_q.shape[0]:
    raise ValueError(
      f"{name}: contraction mismatch: x_q shape {tuple(x_q.shape)} vs w_q shape {tuple(w_q.shape)}"
    )


def _validate_scales(x_q, w_q, x_scale, w_scale) -> None:
  common.check_array(_NAME, "x_scale", x_scale)
  common.check_array(_NAME, "w_scale", w_scale)
  common.check_dtype(_NAME, "x_scale", x_scale, (jnp.float32,))
  common.check_dtype(_NAME, "w_scale", w_scale, (jnp.float32,))
  common.check_shape(_NAME, "x_scale", x_scale, (x_q.shape[0], 1))
  common.check_shape(_NAME, "w_scale", w_scale, (1, w_q.shape[1]))


def int8_matmul_reference(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
  """Exact int32 product of int8 matrices (jnp)."""
  _validate_int(x_q, w_q, "int8_matmul")
  return jnp.dot(x_q, w_q, preferred_element_type=jnp.int32)


def w8a8_matmul_quantized_reference(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.float32):
  """Reference for `w8a8_matmul_quantized`."""
  _validate_int(x_q, w_q)
  _validate_scales(x_q, w_q, x_scale, w_scale)
  acc = jnp.dot(x_q, w_q, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * x_scale * w_scale).astype(out_dtype)


def w8a8_matmul_reference(x, w_q, w_scale, *, out_dtype=None) -> jax.Array:
  """Reference for `w8a8_matmul` (same dynamic activation quantization)."""
  _validate_float_x(x)
  x_q, x_scale = quantize_activations_int8(x)
  return w8a8_matmul_quantized_reference(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype or x.dtype)


def _validate_float_x(x) -> None:
  common.check_array(_NAME, "x", x)
  if x.ndim != 2:
    raise ValueError(f"{_NAME}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
  common.check_dtype(_NAME, "x", x, _X_DTYPES)


def _kernel(*refs, block_k: int, n_steps: int, scaled: bool, dot_dtype, triton: bool):
  if scaled:
    x_ref, w_ref, xs_ref, ws_ref, o_ref = refs
  else:
    x_ref, w_ref, o_ref = refs
  bm, bn = o_ref.shape
  integer = jnp.dtype(dot_dtype) == jnp.int8
  acc_dtype = jnp.int32 if integer else jnp.float32

  def operand(v):  # int8 -> int32 -> f32 -> dot dtype: each step exact for int8 codes
    return v if integer else v.astype(jnp.int32).astype(jnp.float32).astype(dot_dtype)

  def body(i, acc):
    k0 = common.chunk_start(i, block_k)
    x = operand(x_ref[:, pl.ds(k0, block_k)])
    w = operand(w_ref[pl.ds(k0, block_k), :])
    return acc + jnp.dot(x, w, preferred_element_type=acc_dtype)

  acc = common.k_loop(n_steps, block_k, body, jnp.zeros((bm, bn), acc_dtype), triton)
  if scaled:
    out = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)
  else:
    o_ref[...] = acc.astype(o_ref.dtype)


def _call(x_q, w_q, scales, out_dtype, block_sizes, interpret, compiler_params, name, dot_dtype):
  common.check_dtype(name, "dot_dtype", dot_dtype, DOT_DTYPES)
  bs = block_sizes or BlockSizes()
  compiler_params = common.default_compiler_params(compiler_params)
  triton = common.is_triton(compiler_params)
  m, k = x_q.shape
  n = w_q.shape[1]
  bk = common.pick_chunk(k, bs.block_k, triton)

  def need(bm, bn):
    blocks = [((bm, k), x_q.dtype), ((k, bn), w_q.dtype), ((bm, bn), out_dtype)]
    if scales is not None:
      blocks += [((bm, 1), jnp.float32), ((1, bn), jnp.float32)]
    return common.vmem_estimate(blocks, 3 * 4 * max(bm, 8) * bn + 2 * 4 * bk * max(bm, bn))

  bm, bn, m_pad = common.fit_blocks(name, m, n, bs, triton, compiler_params, need)
  if k % bk:
    raise ValueError(f"{name}: block_k={bk} must divide K={k}")
  in_specs = [
    pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
    pl.BlockSpec((k, bn), lambda i, j: (0, j)),
  ]
  args = [common.pad_rows(x_q, m_pad), w_q]
  if scales is not None:
    x_scale, w_scale = scales
    in_specs += [
      pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
      pl.BlockSpec((1, bn), lambda i, j: (0, j)),
    ]
    args += [common.pad_rows(x_scale, m_pad), w_scale]
  kernel = functools.partial(
    _kernel,
    block_k=bk,
    n_steps=k // bk,
    scaled=scales is not None,
    dot_dtype=dot_dtype,
    triton=triton,
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
    grid=(m_pad // bm, n // bn),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    compiler_params=compiler_params,
    interpret=interpret,
    name=name,
  )(*args)
  return out[:m]


def int8_matmul(
  x_q, w_q, *, block_sizes: BlockSizes | None = None, interpret=False, compiler_params=None
) -> jax.Array:
  """Exact int8 x int8 -> int32 matmul (the integer core of W8A8)."""
  _validate_int(x_q, w_q, "int8_matmul")
  return _call(
    x_q, w_q, None, jnp.int32, block_sizes, interpret, compiler_params, "int8_matmul", jnp.int8
  )


def w8a8_matmul_quantized(
  x_q,
  x_scale,
  w_q,
  w_scale,
  *,
  out_dtype=jnp.float32,
  dot_dtype=jnp.int8,
  block_sizes: BlockSizes | None = None,
  interpret=False,
  compiler_params=None,
) -> jax.Array:
  """W8A8 matmul on already-quantized activations.

  Args:
    x_q: int8 [M, K]; x_scale: f32 [M, 1] (per token).
    w_q: int8 [K, N]; w_scale: f32 [1, N] (per output channel).
    out_dtype: f32 or bf16.
    dot_dtype: int8 (int32 accumulation) or bf16 (codes converted in the kernel).
    block_sizes: tile sizes; defaults depend on the backend.
    interpret: Pallas interpret mode.
    compiler_params: default: Triton's on a GPU backend, else Mosaic TPU's.

  Returns:
    [M, N] array of `out_dtype`.
  """
  _validate_int(x_q, w_q)
  _validate_scales(x_q, w_q, x_scale, w_scale)
  common.check_dtype(_NAME, "out_dtype", out_dtype, _OUT_DTYPES)
  return _call(
    x_q,
    w_q,
    (x_scale, w_scale),
    out_dtype,
    block_sizes,
    interpret,
    compiler_params,
    _NAME,
    dot_dtype,
  )


def w8a8_matmul(
  x,
  w_q,
  w_scale,
  *,
  out_dtype=None,
  dot_dtype=jnp.int8,
  block_sizes: BlockSizes | None = None,
  interpret=False,
  compiler_params=None,
) -> jax.Array:
  """Float x [M, K] quantized per token to int8 in the wrapper, then `w8a8_matmul_quantized`."""
  _validate_float_x(x)
  x_q, x_scale = quantize_activations_int8(x)
  return w8a8_matmul_quantized(
    x_q,
    x_scale,
    w_q,
    w_scale,
    out_dtype=out_dtype or x.dtype,
    dot_dtype=dot_dtype,
    block_sizes=block_sizes,
    interpret=interpret,
    compiler_params=compiler_params,
  )
