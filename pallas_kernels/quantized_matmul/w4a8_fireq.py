"""W4A8 (FireQ-style): int4 weights x FP8 e4m3 activations, f32 accumulation.

Quantization (FireQ, SEEDS_DIGEST A1): `w[k, n] ~= q[k, n] * w_scale[k//g, n] * tensor_scale`
with symmetric int4 `q` in [-8, 7]; `w_scale` is per output channel ([1, N], g = K) or
group-wise along K ([K/g, N], K % (2*g) == 0) and is stored relative to the per-tensor
`tensor_scale` (f32 [1, 1]) so it stays O(1). Activations are FP8 e4m3 with a dynamic
per-token ([M, 1]) or per-tensor scale: `x[m, k] ~= x_fp8[m, k] * x_scale[m]`.

Layout: `w_q` is int8 [K/2, N], "global halves" packing of signed nibbles (`common`).

Kernel: grid over (M/bm, N/bn), whole-K blocks, `fori_loop` over chunks of one half
of K (two dots per step, f32 carry). Both operands are converted in-kernel to
`dot_dtype` (bf16 by default: exact for e4m3 and int4 values, works on every
backend and in interpret mode; `jnp.float8_e4m3fn` uses native fp8 dots, which
need TPU v5e+ / sm89+). `kernel_x_dtype=bfloat16` hands the kernel the FP8-rounded
activations as bf16 values (exact: every e4m3 value is a bf16 value), so the kernel
holds no fp8 at all, which chips without fp8 need (sm80 rejects even fp8 converts).
Per-channel scales are applied once after the loop;
group-wise scales are applied to each group's partial product. M is zero-padded in
the wrapper and sliced back; N must be a multiple of block_n.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.quantized_matmul import common

_NAME = "w4a8_fireq_matmul"
_FP8 = jnp.float8_e4m3fn
_X_DTYPES = (jnp.bfloat16, jnp.float32)
_OUT_DTYPES = (jnp.float32, jnp.bfloat16)
_DOT_DTYPES = (jnp.bfloat16, _FP8)
_KERNEL_X_DTYPES = (_FP8, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes; None picks a default. block_k: chunk of each K half per step (per-channel only)."""

  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None


def quantize_w4_fireq(w: jax.Array, group_size: int | None = None):
  """Symmetric int4 quantization with per-channel (or group) and per-tensor scales.

  Args:
    w: float weight [K, N].
    group_size: None for per-output-channel scales, else rows of K per scale
      (K % (2*group_size) == 0).

  Returns:
    (w_q int8 [K/2, N] packed, w_scale f32 [K/g, N], tensor_scale f32 [1, 1]).
  """
  common.check_array("quantize_w4_fireq", "w", w)
  if w.ndim != 2:
    raise ValueError(f"quantize_w4_fireq: w must be 2-D [K, N], got shape {tuple(w.shape)}")
  k, n = w.shape
  g = k if group_size is None else group_size
  if k % 2 or (group_size is not None and (g % 2 or k % (2 * g))):
    raise ValueError(
      f"quantize_w4_fireq: K={k} (w shape {tuple(w.shape)}) must be a multiple of "
      f"2*group_size={2 * g}"
    )
  w = w.astype(jnp.float32)
  tensor_scale = jnp.maximum(jnp.abs(w).max() / 7.0, 1e-12).reshape(1, 1)
  wg = w.reshape(k // g, g, n)
  w_scale = jnp.maximum(jnp.abs(wg).max(axis=1) / 7.0, 1e-12) / tensor_scale
  q = jnp.clip(jnp.round(wg / (w_scale[:, None] * tensor_scale)), -8, 7)
  return common.pack_int4(q.reshape(k, n)), w_scale, tensor_scale


def quantize_activations_fp8(x: jax.Array, per_token: bool = True):
  """Dynamic FP8 e4m3 quantization of x [M, K].

  Returns:
    (x_fp8 float8_e4m3fn [M, K], x_scale f32 [M, 1]); with per_token=False all rows
    share one scale.
  """
  common.check_array("quantize_activations_fp8", "x", x)
  if x.ndim != 2:
    raise ValueError(f"quantize_activations_fp8: x must be 2-D, got shape {tuple(x.shape)}")
  x = x.astype(jnp.float32)
  amax = jnp.abs(x).max(axis=1, keepdims=True) if per_token else jnp.abs(x).max().reshape(1, 1)
  scale = jnp.broadcast_to(jnp.maximum(amax / common.FP8_E4M3_MAX, 1e-12), (x.shape[0], 1))
  return jnp.clip(x / scale, -common.FP8_E4M3_MAX, common.FP8_E4M3_MAX).astype(_FP8), scale


def dequantize_w4_fireq(w_q, w_scale, tensor_scale) -> jax.Array:
  """Float32 weight [K, N] from the packed representation."""
  q = common.unpack_int4_full(w_q, signed=True).astype(jnp.float32)
  g = q.shape[0] // w_scale.shape[0]
  # The scale is formed first (scale * tensor scale), then applied to the codes.
  return q * (jnp.repeat(w_scale.astype(jnp.float32), g, axis=0) * tensor_scale)


def _validate(x_fp8, x_scale, w_q, w_scale, tensor_scale) -> int:
  """Check shapes/dtypes; return the group size (K for per-channel)."""
  args = (x_fp8, x_scale, w_q, w_scale, tensor_scale)
  for arg, a in zip(("x_fp8", "x_scale", "w_q", "w_scale", "tensor_scale"), args):
    common.check_array(_NAME, arg, a)
  if x_fp8.ndim != 2:
    raise ValueError(f"{_NAME}: x must be 2-D [M, K], got shape {tuple(x_fp8.shape)}")
  common.check_dtype(_NAME, "x_fp8", x_fp8, (_FP8,))
  common.check_dtype(_NAME, "w_q", w_q, (jnp.int8,))
  for arg, a in (("x_scale", x_scale), ("w_scale", w_scale), ("tensor_scale", tensor_scale)):
    common.check_dtype(_NAME, arg, a, (jnp.float32,))
  m, k = x_fp8.shape
  if w_q.ndim != 2 or w_q.shape[0] * 2 != k:
    raise ValueError(
      f"{_NAME}: w_q shape {tuple(w_q.shape)} does not match x shape {tuple(x_fp8.shape)}; "
      f"expected [K/2={k // 2}, N]"
    )
  n = w_q.shape[1]
  common.check_shape(_NAME, "x_scale", x_scale, (m, 1))
  common.check_shape(_NAME, "tensor_scale", tensor_scale, (1, 1))
  if w_scale.ndim != 2 or w_scale.shape[1] != n or w_scale.shape[0] == 0 or k % w_scale.shape[0]:
    raise ValueError(
      f"{_NAME}: w_scale shape {tuple(w_scale.shape)} must be [K/g, N] with K={k}, N={n}"
    )
  g = k // w_scale.shape[0]
  if g != k and (g % 2 or k % (2 * g)):
    raise ValueError(f"{_NAME}: K={k} must be a multiple of 2*group_size={2 * g}")
  return g


def w4a8_fireq_matmul_quantized_reference(
  x_fp8, x_scale, w_q, w_scale, tensor_scale, *, out_dtype=jnp.float32
):
  """Reference: dequantize both operands to f32 and `jnp.dot`."""
  _validate(x_fp8, x_scale, w_q, w_scale, tensor_scale)
  x = x_fp8.astype(jnp.float32) * x_scale
  w = dequantize_w4_fireq(w_q, w_scale, tensor_scale)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, chunk, n_steps, grouped, dot_dtype, triton):
  half = chunk * n_steps
  bm, bn = o_ref.shape

  def body(i, acc):
    r0 = common.chunk_start(i, chunk)
    lo, hi = common.unpack_int4(w_ref[pl.ds(r0, chunk), :], signed=True)
    x_lo = x_ref[:, pl.ds(r0, chunk)].astype(dot_dtype)
    x_hi = x_ref[:, pl.ds(r0 + half, chunk)].astype(dot_dtype)
    # int32 -> f32 -> dot dtype: both steps are exact for int4 values.
    d_lo = jnp.dot(
      x_lo, lo.astype(jnp.float32).astype(dot_dtype), preferred_element_type=jnp.float32
    )
    d_hi = jnp.dot(
      x_hi, hi.astype(jnp.float32).astype(dot_dtype), preferred_element_type=jnp.float32
    )
    if grouped:
      return acc + d_lo * ws_ref[i] + d_hi * ws_ref[i + n_steps]
    return acc + d_lo + d_hi

  acc = common.k_loop(n_steps, chunk, body, jnp.zeros((bm, bn), jnp.float32), triton)
  if not grouped:
    acc = acc * ws_ref[0]
  o_ref[...] = (acc * xs_ref[...]).astype(o_ref.dtype)


def w4a8_fireq_matmul_quantized(
  x_fp8,
  x_scale,
  w_q,
  w_scale,
  tensor_scale,
  *,
  out_dtype=jnp.float32,
  dot_dtype=jnp.bfloat16,
  kernel_x_dtype=_FP8,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  compiler_params=None,
) -> jax.Array:
  """W4A8 matmul on FP8 activations.

  Args:
    x_fp8: float8_e4m3fn [M, K]; x_scale: f32 [M, 1].
    w_q: int8 [K/2, N] packed signed int4; w_scale: f32 [K/g, N] ([1, N] per channel);
      tensor_scale: f32 [1, 1].
    out_dtype: f32 or bf16.
    dot_dtype: bf16 (portable) or float8_e4m3fn (native fp8 dot).
    kernel_x_dtype: the dtype x enters the kernel in: float8_e4m3fn, or bf16
      (the same values; no fp8 inside the kernel).
    block_sizes: tile sizes; defaults depend on the backend.
    interpret: Pallas interpret mode.
    compiler_params: default: Triton's on a GPU backend, else Mosaic TPU's.

  Returns:
    [M, N] array of `out_dtype`.
  """
  g = _validate(x_fp8, x_scale, w_q, w_scale, tensor_scale)
  common.check_dtype(_NAME, "out_dtype", out_dtype, _OUT_DTYPES)
  common.check_dtype(_NAME, "dot_dtype", dot_dtype, _DOT_DTYPES)
  common.check_dtype(_NAME, "kernel_x_dtype", kernel_x_dtype, _KERNEL_X_DTYPES)
  bs = block_sizes or BlockSizes()
  compiler_params = common.default_compiler_params(compiler_params)
  triton = common.is_triton(compiler_params)
  m, k = x_fp8.shape
  n = w_q.shape[1]
  grouped = w_scale.shape[0] > 1
  if grouped:
    if bs.block_k is not None and bs.block_k != g:
      raise ValueError(f"{_NAME}: block_k={bs.block_k} must equal group_size={g} when grouped")
    if triton and (not common.is_pow2(g) or g < 16):
      raise ValueError(f"{_NAME}: Triton needs a power-of-2 group_size >= 16, got {g}")
    chunk = g
  else:
    chunk = common.pick_chunk(k // 2, bs.block_k, triton)
    if (k // 2) % chunk:
      raise ValueError(f"{_NAME}: block_k={chunk} must divide K/2={k // 2}")
  n_sc = w_scale.shape[0]

  def need(bm, bn):
    blocks = [((bm, k), kernel_x_dtype), ((bm, 1), jnp.float32), ((k // 2, bn), w_q.dtype)]
    blocks += [((n_sc, 1, bn), jnp.float32), ((bm, bn), out_dtype)]
    return common.vmem_estimate(blocks, 4 * 4 * max(bm, 8) * bn + 3 * 4 * chunk * bn)

  bm, bn, m_pad = common.fit_blocks(_NAME, m, n, bs, triton, compiler_params, need)
  ws3 = (w_scale * tensor_scale).reshape(n_sc, 1, n)
  kernel = functools.partial(
    _kernel,
    chunk=chunk,
    n_steps=(k // 2) // chunk,
    grouped=grouped,
    dot_dtype=dot_dtype,
    triton=triton,
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
    grid=(m_pad // bm, n // bn),
    in_specs=[
      pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
      pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
      pl.BlockSpec((k // 2, bn), lambda i, j: (0, j)),
      pl.BlockSpec((n_sc, 1, bn), lambda i, j: (0, 0, j)),
    ],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    compiler_params=compiler_params,
    interpret=interpret,
    name="w4a8_fireq_matmul",
  )(common.pad_rows(x_fp8.astype(kernel_x_dtype), m_pad), common.pad_rows(x_scale, m_pad), w_q, ws3)
  return out[:m]


def w4a8_fireq_matmul(
  x,
  w_q,
  w_scale,
  tensor_scale,
  *,
  per_token: bool = True,
  out_dtype=None,
  dot_dtype=jnp.bfloat16,
  kernel_x_dtype=_FP8,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  compiler_params=None,
) -> jax.Array:
  """Float x [M, K] quantized to FP8 (per token or per tensor) in the wrapper, then the kernel."""
  common.check_array(_NAME, "x", x)
  if x.ndim != 2:
    raise ValueError(f"{_NAME}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
  common.check_dtype(_NAME, "x", x, _X_DTYPES)
  x_fp8, x_scale = quantize_activations_fp8(x, per_token)
  return w4a8_fireq_matmul_quantized(
    x_fp8,
    x_scale,
    w_q,
    w_scale,
    tensor_scale,
    out_dtype=out_dtype or x.dtype,
    dot_dtype=dot_dtype,
    kernel_x_dtype=kernel_x_dtype,
    block_sizes=block_sizes,
    interpret=interpret,
    compiler_params=compiler_params,
  )


def w4a8_fireq_matmul_reference(x, w_q, w_scale, tensor_scale, *, per_token=True, out_dtype=None):
  """Reference for `w4a8_fireq_matmul` (same activation quantization)."""
  common.check_array(_NAME, "x", x)
  if x.ndim != 2:
    raise ValueError(f"{_NAME}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
  common.check_dtype(_NAME, "x", x, _X_DTYPES)
  x_fp8, x_scale = quantize_activations_fp8(x, per_token)
  return w4a8_fireq_matmul_quantized_reference(
    x_fp8, x_scale, w_q, w_scale, tensor_scale, out_dtype=out_dtype or x.dtype
  )
