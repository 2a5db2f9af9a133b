"""Portable (Triton-friendly) kernel: grid (B, Hkv), ``fori_loop`` over key groups.

Triton has no scratch memory, scalar prefetch, sequential grid axis, value
slicing, or concatenation, and every load must have a power-of-2 size. So each
program owns one (batch row, kv head), carries the online-softmax state through
a ``fori_loop`` over the key groups that hold valid slots, and handles each of
the ``pf`` bit slots of a group as its own chunk of ``group_size // pf``
consecutive tokens (the key layout makes slot j of a group contiguous). Value
rows and per-token scales for a chunk are read with ``pl.ds`` ref slices. The
GQA group is zero-padded to a power of 2 (3 -> 4 for SmolLM2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels._util import is_pow2, next_pow2

from .online_softmax import inverse_sum, online_softmax_step
from .packing import QuantizedKV, unpack_slot
from .reference import MASK_VALUE, as_rows
from .validation import validate

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _kernel(
  qlen_ref,
  len_ref,
  start_ref,
  q_ref,
  kp_ref,
  ks_ref,
  kz_ref,
  vp_ref,
  vs_ref,
  vz_ref,
  *rest,
  bits,
  group_size,
  num_groups,
  sm_scale,
  has_residual,
):
  if has_residual:
    kr_ref, vr_ref, o_ref = rest
  else:
    (o_ref,) = rest
  pf = 8 // bits
  rows = group_size // pf
  b = pl.program_id(0)
  start = start_ref[b]
  qlen = qlen_ref[b]
  length = len_ref[b]
  gp, d = q_ref.shape
  dp = d // pf
  q = q_ref[...].astype(jnp.float32) * sm_scale

  def group_body(grp, carry):
    x = kp_ref[pl.ds(grp * rows, rows), :].astype(jnp.int32)  # (rows, D)
    scale = ks_ref[pl.ds(grp, 1), :].astype(jnp.float32)  # (1, D)
    zero = kz_ref[pl.ds(grp, 1), :].astype(jnp.float32)
    for j in range(pf):
      t0 = grp * group_size + j * rows
      k = unpack_slot(x, bits, j) * scale + zero
      s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)  # (Gp, rows)
      pos = t0 + jnp.arange(rows, dtype=jnp.int32)[None, :]
      valid = (pos >= start) & (pos < qlen)
      y = vp_ref[pl.ds(t0, rows), :].astype(jnp.int32)  # (rows, dp)
      vs = vs_ref[:, pl.ds(t0, rows)].astype(jnp.float32)  # (1, rows)
      vz = vz_ref[:, pl.ds(t0, rows)].astype(jnp.float32)

      def pv(p, y=y, vs=vs, vz=vz):
        ps = p * vs
        off = (p * vz).sum(axis=-1, keepdims=True)
        return [
          lax.dot_general(ps, unpack_slot(y, bits, c), _NN, preferred_element_type=jnp.float32)
          + off
          for c in range(pf)
        ]

      carry = online_softmax_step(*carry, s, valid, pv)
    return carry

  lo = lax.div(start, group_size)
  hi = jnp.minimum(lax.div(qlen + group_size - 1, group_size), num_groups)
  init = (
    jnp.full((gp, 1), MASK_VALUE, jnp.float32),
    jnp.zeros((gp, 1), jnp.float32),
    tuple(jnp.zeros((gp, dp), jnp.float32) for _ in range(pf)),
  )
  carry = lax.fori_loop(lo, jnp.maximum(hi, lo), group_body, init)
  if has_residual:
    kr = kr_ref[...].astype(jnp.float32)
    s = lax.dot_general(q, kr, _NT, preferred_element_type=jnp.float32)
    pos = qlen + jnp.arange(kr.shape[0], dtype=jnp.int32)[None, :]
    valid = (pos >= start) & (pos < length)

    def pv_res(p):
      return [
        lax.dot_general(p, vr_ref[c].astype(jnp.float32), _NN, preferred_element_type=jnp.float32)
        for c in range(pf)
      ]

    carry = online_softmax_step(*carry, s, valid, pv_res)
  _, denom, accs = carry
  inv = inverse_sum(denom)
  for c in range(pf):
    o_ref[c] = (accs[c] * inv).astype(o_ref.dtype)


def quantized_kv_decode_attention_portable(
  q: jax.Array,
  kv: QuantizedKV,
  start,
  quantized_length,
  length=None,
  k_residual: jax.Array | None = None,
  v_residual: jax.Array | None = None,
  *,
  bits: int,
  group_size: int,
  sm_scale: float | None = None,
  compiler_params=None,
  interpret: bool = False,
) -> jax.Array:
  """Decode attention over a KIVI-packed cache; Triton-friendly kernel.

  Same arguments and result as ``quantized_kv_decode_attention`` (no block
  sizes: one step per key group). Extra constraints: ``group_size // pf``,
  ``D``, ``D // pf`` and the residual length must be powers of 2, and
  ``group_size // pf >= 16`` (Triton dot tiles).

  Args:
    q: ``(B, Hq, D)``.
    kv: ``QuantizedKV`` with leading dims ``(B, Hkv)``.
    start: first valid slot per row.
    quantized_length: quantized slots written per row.
    length: total positions incl. the residual window.
    k_residual: optional float ``(B, Hkv, R, D)``.
    v_residual: like ``k_residual``.
    bits: 2, 4 or 8.
    group_size: key quant group.
    sm_scale: softmax scale, default ``D ** -0.5``.
    compiler_params: default ``pltr.CompilerParams(num_warps=4, num_stages=2)``:
      the kernel is written for Triton (Mosaic GPU, the default Pallas GPU
      backend, rejects its copies); interpret mode ignores them.
    interpret: run the Pallas interpreter.

  Returns:
    ``(B, Hq, D)`` in ``q.dtype``.
  """
  dims = validate(q, kv, k_residual, v_residual, bits, group_size)
  b, hkv, g, d, t, r, pf = (
    dims.batch,
    dims.num_kv_heads,
    dims.group,
    dims.head_dim,
    dims.num_tokens,
    dims.residual,
    dims.pack,
  )
  rows, dp = group_size // pf, d // pf
  for name, val in (("group_size // pf", rows), ("head_dim", d), ("head_dim // pf", dp)):
    if not is_pow2(val):
      raise ValueError(
        f"portable kernel needs {name} to be a power of 2, got {val} (q shape {q.shape})"
      )
  if rows < 16:
    raise ValueError(
      f"portable kernel needs group_size // pf >= 16, got {rows} (group_size {group_size}, {bits}-bit)"
    )
  if r and not is_pow2(r):
    raise ValueError(
      f"portable kernel needs a power-of-2 residual length, got {r} (shape {k_residual.shape})"
    )
  gp = next_pow2(g)
  if compiler_params is None:
    compiler_params = pltr.CompilerParams(num_warps=4, num_stages=2)
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  start = as_rows(start, b, "start")
  qlen = as_rows(quantized_length, b, "quantized_length")
  length = qlen if length is None else as_rows(length, b, "length")

  qg = jnp.pad(q.reshape(b, hkv, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  whole = lambda *blk: pl.BlockSpec(blk, lambda i, h: (i, h) + (0,) * (len(blk) - 2))
  rows_spec = pl.BlockSpec((b,), lambda i, h: (0,))
  in_specs = [
    rows_spec,
    rows_spec,
    rows_spec,
    whole(None, None, gp, d),
    whole(None, None, t // pf, d),
    whole(None, None, t // group_size, d),
    whole(None, None, t // group_size, d),
    whole(None, None, t, dp),
    whole(None, None, 1, t),
    whole(None, None, 1, t),
  ]
  args = [
    qlen,
    length,
    start,
    qg,
    kv.k_packed,
    kv.k_scale,
    kv.k_zero,
    kv.v_packed,
    kv.v_scale.reshape(b, hkv, 1, t),
    kv.v_zero.reshape(b, hkv, 1, t),
  ]
  if r:
    in_specs += [whole(None, None, r, d), whole(None, None, pf, r, dp)]
    args += [k_residual, v_residual.reshape(b, hkv, r, pf, dp).transpose(0, 1, 3, 2, 4)]
  kernel = functools.partial(
    _kernel,
    bits=bits,
    group_size=group_size,
    num_groups=t // group_size,
    sm_scale=sm_scale,
    has_residual=bool(r),
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((b, hkv, pf, gp, dp), q.dtype),
    grid=(b, hkv),
    in_specs=in_specs,
    out_specs=whole(None, None, pf, gp, dp),
    compiler_params=compiler_params,
    interpret=interpret,
    name="quantized_kv_decode_attention_portable",
  )(*args)
  out = out[:, :, :, :g].transpose(0, 1, 3, 2, 4)
  return out.reshape(b, dims.num_q_heads, d)
