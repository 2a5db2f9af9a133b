"""GPTQ (Frantar et al., 2022): int4 / int8 weights that minimize the layer's output error.

For a linear ``y = x @ W`` with W [K, N], the error ``||X (W - W_hat)||^2`` is a
quadratic form in the rows of W with Hessian ``H = 2 X^T X`` [K, K]. Rows (GPTQ's
"columns") are quantized one at a time in order; each row's rounding error is
spread over the rows not yet quantized through the upper Cholesky factor U of
``H^-1`` (``H^-1 = U^T U``), so later rows compensate for it. Groups get their grid
(scale, offset) when their first row is reached, from the error-updated weights
(over the range of least rounding error when the spec's `clip_search` is set), and
the grid is computed by the format's own helpers (`WeightFormat.gptq_group_grid`,
the ones its `quantize` uses), so the result is a `QTensor` on exactly the grid
round-to-nearest would store.
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

from jaxllm.quant.formats import WeightFormat, format_names
from jaxllm.quant.numerics import inverse_hessian_factor
from jaxllm.quant.qtensor import QTensor
from jaxllm.quant.recipes import QuantSpec

W8_BLOCK = 128  # rows per lazy-update block when grids are fixed (W8A8, act order)


@functools.partial(jax.jit, static_argnames=("group", "fmt", "scale_dtype", "clip"))
def _gptq_rows(w2, u, tensor_scale, row_grid, *, group, fmt: WeightFormat, scale_dtype, clip):
  """Sequential GPTQ over blocks of `group` rows. Returns (codes [K, N] f32, grid parts).

  `row_grid`: grid parts [K, N], one grid per row, fixed (W8A8; act order), and the
  returned parts are None; or None: each block is one group, whose grid comes from
  its error-updated weights, and the returned parts are [K/g, N] each."""
  k, n = w2.shape
  n_groups = k // group
  later = jnp.arange(group)[None, :] > jnp.arange(group)[:, None]  # [i, j]: j after i
  params0 = row_grid or fmt.gptq_group_grid(w2[:group], tensor_scale, scale_dtype, clip)
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
      params = fmt.gptq_group_grid(wb, tensor_scale, scale_dtype, clip)  # [N] each
      rows_params = tuple(jnp.broadcast_to(p, (group, n)) for p in params)

    def row(i, inner):
      wb, cb, eb = inner
      x, p = wb[i], tuple(part[i] for part in rows_params)
      c = fmt.gptq_codes(x[None], p, tensor_scale)[0]
      err = (x - fmt.gptq_dequantize(c, p, tensor_scale)) / ub[i, i]
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
    spec: a `QuantSpec` whose format `supports_gptq`; its group size, padding and
      scale dtype give the grid (a `gptq_fixed_grid` format such as w8a8: the
      round-to-nearest grid of `w`, kept); with its
      `clip_search`, each int4 group's grid spans the range of least rounding error.
    contract_dims: leading dims of `w` forming K.
    damp: relative dampening of H's diagonal (lambda = damp * mean(diag H)).
    act_order: take the rows by decreasing Hessian diagonal (the inputs with the
      most energy first, while most rows are left to absorb their error), in
      blocks of gcd(K', `W8_BLOCK`). Groups stay contiguous in K, so their grids are fixed
      beforehand from the weight itself, as round-to-nearest stores them.

  Raises:
    ValueError: a format without a GPTQ grid, a Hessian that is not [K, K] or not
      finite, or the errors of `jaxllm.quant.quantize`.
  """
  fmt = spec.format
  if not fmt.supports_gptq:
    raise ValueError(
      f"GPTQ handles the weight formats {format_names('supports_gptq')}, not {fmt.name!r}"
    )
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
  clip = spec.clip_search and not fmt.gptq_fixed_grid
  # A grid fixed per row (W8A8's per-channel scales; act order's groups), or None.
  fixed = None
  if fmt.gptq_fixed_grid:
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
    parts = tuple(getattr(fixed, name) for name in fmt.grid_parts)
    group_of_row = order // (k_padded // parts[0].shape[0])
    row_grid = tuple(p[group_of_row] for p in parts)
    tensor_scale = fixed.tensor_scale
  codes, params = _gptq_rows(
    w2[order],
    inverse_hessian_factor(jnp.asarray(h), k_padded, damp, order if act_order else None),
    jnp.ones((1, 1)) if tensor_scale is None else tensor_scale,
    row_grid,
    group=block,
    fmt=fmt,
    scale_dtype=jnp.dtype(rtn.scales.dtype).name,
    clip=clip,
  )
  codes = codes[np.argsort(order)]
  values = fmt.pack_codes(codes)
  if fixed is not None:
    return fixed.replace(values=values)
  return rtn.replace(values=values, **dict(zip(fmt.grid_parts, params)))
