"""GPTQ (Frantar et al., 2022): int4 / int8 weights that minimize the layer's output error.

For a linear ``y = x @ W`` with W [K, N], the error ``||X (W - W_hat)||^2`` is a
quadratic form in the rows of W with Hessian ``H = 2 X^T X`` [K, K]. Rows (GPTQ's
"columns") are quantized one at a time in order; each row's rounding error is
spread over the rows not yet quantized through the upper Cholesky factor U of
``H^-1`` (``H^-1 = U^T U``), so later rows compensate for it. Groups get their grid
(scale, offset) when their first row is reached, from the error-updated weights
(over the range of least rounding error when the spec's `clip_search` is set), and
the grid is computed by the same helpers `jaxllm.quant.qtensor.quantize` uses, so
the result is a `QTensor` on exactly the grid round-to-nearest would store.
With act order the rows are taken by decreasing Hessian diagonal; the groups stay
contiguous in K, so their grids are fixed beforehand (round-to-nearest's, GPTQ's
"static groups") and the rows go in blocks of gcd(K', `W8_BLOCK`) (K' = K padded).
W8A8's grid is one symmetric scale per output channel over all of K: the scales of
the round-to-nearest QTensor of the original weight, kept fixed; rows are processed
in blocks of gcd(K, `W8_BLOCK`) for the lazy updates.

Errors are applied lazily: within a group the update touches only the group's
rows; at the group's end one matmul carries the group's errors to all later rows.
H is dampened by ``damp * mean(diag H)``; zero-padded rows of K get that dampening
as their Hessian diagonal (their weights are zero and stay on the grid).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.quant import qtensor
from jaxllm.quant.qtensor import QTensor
from jaxllm.quant.recipes import QuantSpec
from pallas_kernels import quantized_matmul as qmm

GPTQ_METHODS = ("w4a16", "fireq_w4a8", "w8a8")
W8_BLOCK = 128  # rows per lazy-update block when grids are fixed (w8a8, act order)


def inverse_hessian_factor(
  hessian: jax.Array, k_padded: int, damp: float = 0.01, order=None
) -> jax.Array:
  """Upper Cholesky factor U of ``(H + lambda I)^-1`` [K', K'], H zero-padded to K' rows
  (and, given `order` [K'], its rows and columns taken in that order)."""
  k = hessian.shape[0]
  h = jnp.asarray(hessian, jnp.float32)
  lam = damp * jnp.mean(jnp.diag(h))
  lam = jnp.where(lam > 0, lam, 1.0)  # an all-zero Hessian: plain round-to-nearest
  h = jnp.pad(h, ((0, k_padded - k), (0, k_padded - k)))
  h = h + lam * jnp.eye(k_padded, dtype=jnp.float32)
  if order is not None:
    h = h[order][:, order]
  lower = jnp.linalg.cholesky(h)
  eye = jnp.eye(k_padded, dtype=jnp.float32)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
  return jnp.linalg.cholesky(h_inv).T


def _grid(method, scale_dtype, wg, tensor_scale, clip):
  """Grid parts [N] of one int4 group wg [g, N], by the QTensor's own helpers; with
  `clip`, over the group's range of least rounding error (`qtensor.clip_to_best_range`)."""
  if clip:
    wg = qtensor.clip_to_best_range(wg, wg.shape[0], symmetric=method == "fireq_w4a8")
  wg = wg[None]
  if method == "fireq_w4a8":
    return (qtensor.fireq_group_scale(wg, tensor_scale, scale_dtype)[0],)
  return tuple(p[0] for p in qtensor.w4a16_group_grid(wg, scale_dtype))


def _codes(method, w, params, tensor_scale):
  if method == "w8a8":
    return qmm.int8_codes(w, params[0])
  if method == "fireq_w4a8":
    return qtensor.fireq_codes(w, params[0], tensor_scale)
  return qtensor.w4a16_codes(w, *params)


def _dequantize(method, code, params, tensor_scale):
  if method == "w8a8":
    return code * params[0]
  if method == "fireq_w4a8":
    return code * params[0].astype(jnp.float32) * tensor_scale[0, 0]
  scales, mins = params
  return code * scales.astype(jnp.float32) + mins.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("group", "method", "scale_dtype", "clip"))
def _gptq_rows(w2, u, tensor_scale, row_grid, *, group, method, scale_dtype, clip):
  """Sequential GPTQ over blocks of `group` rows. Returns (codes [K, N] f32, grid parts).

  `row_grid`: grid parts [K, N], one grid per row, fixed (W8A8; act order), and the
  returned parts are None; or None: each block is one group, whose grid comes from
  its error-updated weights, and the returned parts are [K/g, N] each."""
  k, n = w2.shape
  n_groups = k // group
  later = jnp.arange(group)[None, :] > jnp.arange(group)[:, None]  # [i, j]: j after i
  params0 = row_grid or _grid(method, scale_dtype, w2[:group], tensor_scale, clip)
  params_init = tuple(jnp.zeros((n_groups, n), p.dtype) for p in params0)

  def block(b, carry):
    w, all_codes, all_params = carry
    start = b * group
    wb = jax.lax.dynamic_slice(w, (start, 0), (group, n))
    ub = jax.lax.dynamic_slice(u, (start, start), (group, group))
    if row_grid:
      params = None
      rows_params = tuple(jax.lax.dynamic_slice(p, (start, 0), (group, n)) for p in row_grid)
    else:
      params = _grid(method, scale_dtype, wb, tensor_scale, clip)  # [N] each
      rows_params = tuple(jnp.broadcast_to(p, (group, n)) for p in params)

    def row(i, inner):
      wb, cb, eb = inner
      x, p = wb[i], tuple(part[i] for part in rows_params)
      c = _codes(method, x[None], p, tensor_scale)[0]
      err = (x - _dequantize(method, c, p, tensor_scale)) / ub[i, i]
      wb = wb - jnp.where(later[i][:, None], ub[i][:, None] * err[None, :], 0.0)
      return wb, cb.at[i].set(c), eb.at[i].set(err)

    zeros = jnp.zeros((group, n), jnp.float32)
    _, cb, eb = jax.lax.fori_loop(0, group, row, (wb, zeros, zeros))
    rows_u = jax.lax.dynamic_slice(u, (start, 0), (group, k))  # [g, K]
    after = jnp.arange(k)[None, :] >= start + group
    w = w - jnp.where(after, rows_u, 0.0).T @ eb
    all_codes = jax.lax.dynamic_update_slice(all_codes, cb, (start, 0))
    if params is not None:
      all_params = tuple(
        jax.lax.dynamic_update_slice(a, p[None], (b, 0)) for a, p in zip(all_params, params)
      )
    return w, all_codes, all_params

  init = (w2, jnp.zeros((k, n), jnp.float32), params_init)
  _, all_codes, all_params = jax.lax.fori_loop(0, n_groups, block, init)
  return all_codes, (None if row_grid else all_params)


def gptq_quantize(
  w: jax.Array,
  hessian,
  spec: QuantSpec,
  contract_dims: int = 1,
  damp: float = 0.01,
  act_order: bool = False,
) -> QTensor:
  """GPTQ-quantizes a float weight [*K, *out] into the `QTensor` `spec` describes.

  Args:
    w: float weight; its first `contract_dims` dims form K.
    hessian: [K, K] ``X^T X`` (any positive multiple) of the layer's calibration inputs.
    spec: a `QuantSpec` of `GPTQ_METHODS`; its group size, padding and scale
      dtype give the grid (w8a8: per output channel, from `w`); with its
      `clip_search`, each int4 group's grid spans the range of least rounding error.
    contract_dims: leading dims of `w` forming K.
    damp: relative dampening of H's diagonal (lambda = damp * mean(diag H)).
    act_order: take the rows by decreasing Hessian diagonal (the inputs with the
      most energy first, while most rows are left to absorb their error), in
      blocks of gcd(K', `W8_BLOCK`). Groups stay contiguous in K, so their grids are fixed
      beforehand from the weight itself, as round-to-nearest stores them.

  Raises:
    ValueError: a method GPTQ does not handle, a Hessian that is not [K, K] or not
      finite, or the errors of `jaxllm.quant.quantize`.
  """
  if spec.method not in GPTQ_METHODS:
    raise ValueError(f"GPTQ handles {GPTQ_METHODS}, not {spec.method!r}")
  if not damp > 0:
    raise ValueError(f"GPTQ dampening must be > 0, got {damp}")
  # Validates dtype, group size and padding exactly as round-to-nearest would.
  rtn = spec.quantize(w, contract_dims, clip_search=False)
  k = rtn.k
  h = np.asarray(hessian, np.float32)
  if h.shape != (k, k):
    raise ValueError(
      f"GPTQ Hessian shape {h.shape} does not match the weight: expected ({k}, {k}) "
      f"for a weight of shape {tuple(w.shape)} contracting {contract_dims} dims"
    )
  if not np.isfinite(h).all():
    raise ValueError("GPTQ Hessian has non-finite entries")
  n = math.prod(w.shape[contract_dims:])
  k_padded = k + rtn.k_pad
  w2 = jnp.pad(jnp.asarray(w, jnp.float32).reshape(k, n), ((0, rtn.k_pad), (0, 0)))
  clip = spec.clip_search and spec.method != "w8a8"
  # A grid fixed per row (W8A8's per-channel scales; act order's groups), or None.
  fixed = None
  if spec.method == "w8a8":
    fixed = rtn
  elif act_order:
    fixed = spec.quantize(w, contract_dims)
  order = np.arange(k_padded)
  if act_order:  # padded rows (zero Hessian) go last
    diag = np.concatenate([np.diag(h), np.full(rtn.k_pad, -np.inf, np.float32)])
    order = np.argsort(-diag, kind="stable")
  if fixed is None:
    block, row_grid, tensor_scale = spec.group_size or k_padded, None, rtn.tensor_scale
  else:
    block = math.gcd(k_padded, W8_BLOCK)
    parts = (fixed.scales,) if fixed.offsets is None else (fixed.scales, fixed.offsets)
    group_of_row = order // (k_padded // parts[0].shape[0])
    row_grid = tuple(p[group_of_row] for p in parts)
    tensor_scale = fixed.tensor_scale
  codes, params = _gptq_rows(
    w2[order],
    inverse_hessian_factor(jnp.asarray(h), k_padded, damp, order if act_order else None),
    jnp.ones((1, 1)) if tensor_scale is None else tensor_scale,
    row_grid,
    group=block,
    method=spec.method,
    scale_dtype=jnp.dtype(rtn.scales.dtype).name,
    clip=clip,
  )
  codes = codes[np.argsort(order)]
  if spec.method == "w8a8":
    return rtn.replace(values=codes.astype(jnp.int8))
  values = qmm.pack_int4(codes.astype(jnp.int32))
  if fixed is not None:
    return fixed.replace(values=values)
  if spec.method == "fireq_w4a8":
    return rtn.replace(values=values, scales=params[0])
  return rtn.replace(values=values, scales=params[0], offsets=params[1])
