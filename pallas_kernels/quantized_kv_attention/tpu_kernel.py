"""TPU-style Pallas kernel: grid (B, Hkv, T-blocks), online softmax in VMEM scratch.

Per step the kernel DMAs one block of ``block_t`` tokens: packed keys
``(block_t // pf, D)``, their per-group scales ``(block_t // group_size, D)``,
packed values ``(block_t, D // pf)`` and per-token value scales ``(1, block_t)``.
Codes are unpacked in int32 (shifts on 8-bit vectors do not legalize on TPU),
keys are dequantized and reordered into token order with a stack + reshape,
values are used as codes with the per-token scale folded into the
probabilities. Per-row lengths arrive by scalar prefetch; block indices are
clamped to the valid range so skipped steps re-use the resident block.
The residual window, if any, is processed on the last step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .block_sizes import BlockSizes
from .online_softmax import inverse_sum, online_softmax_step
from .packing import QuantizedKV, unpack_slot
from .reference import MASK_VALUE, as_rows
from .validation import validate, validate_block

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _online_update(s, valid, v_slabs_fn, m_sc, l_sc, acc_sc):
  """One online-softmax step on the VMEM scratch: scores ``s`` (G, S);
  ``v_slabs_fn(p)`` -> list of (G, dp), one per accumulator slab of ``acc_sc``."""
  accs = tuple(acc_sc[j] for j in range(acc_sc.shape[0]))
  m_new, l_new, accs = online_softmax_step(m_sc[...], l_sc[...], accs, s, valid, v_slabs_fn)
  l_sc[...] = l_new
  for j, acc in enumerate(accs):
    acc_sc[j] = acc
  m_sc[...] = m_new


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
  block_t,
  sm_scale,
  has_residual,
):
  if has_residual:
    kr_ref, vr_ref, o_ref, m_sc, l_sc, acc_sc = rest
  else:
    o_ref, m_sc, l_sc, acc_sc = rest
  pf = 8 // bits
  b = pl.program_id(0)
  kb = pl.program_id(2)
  start = start_ref[b]
  qlen = qlen_ref[b]
  length = len_ref[b]
  g, d = q_ref.shape

  @pl.when(kb == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  q = q_ref[...].astype(jnp.float32) * sm_scale
  block_start = kb * block_t

  @pl.when((block_start < qlen) & (block_start + block_t > start))
  def _block():
    n = block_t // group_size
    rows = group_size // pf
    x = kp_ref[...].astype(jnp.int32)  # (block_t // pf, D)
    scale = ks_ref[...].astype(jnp.float32)[:, None, :]  # (n, 1, D)
    zero = kz_ref[...].astype(jnp.float32)[:, None, :]
    slots = [unpack_slot(x, bits, j).reshape(n, rows, d) * scale + zero for j in range(pf)]
    k = jnp.stack(slots, axis=1).reshape(block_t, d) if pf > 1 else slots[0].reshape(block_t, d)
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)  # (G, block_t)
    pos = block_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    valid = (pos >= start) & (pos < qlen)
    y = vp_ref[...].astype(jnp.int32)  # (block_t, D // pf)
    vs = vs_ref[...].astype(jnp.float32)  # (1, block_t)
    vz = vz_ref[...].astype(jnp.float32)

    def pv(p):
      ps = p * vs
      off = (p * vz).sum(axis=-1, keepdims=True)
      return [
        lax.dot_general(ps, unpack_slot(y, bits, j), _NN, preferred_element_type=jnp.float32) + off
        for j in range(pf)
      ]

    _online_update(s, valid, pv, m_sc, l_sc, acc_sc)

  last = kb == pl.num_programs(2) - 1
  if has_residual:

    @pl.when(last & (length > qlen) & (length > start))
    def _residual():
      kr = kr_ref[...].astype(jnp.float32)  # (R, D)
      s = lax.dot_general(q, kr, _NT, preferred_element_type=jnp.float32)
      pos = qlen + lax.broadcasted_iota(jnp.int32, s.shape, 1)
      valid = (pos >= start) & (pos < length)

      def pv(p):
        return [
          lax.dot_general(p, vr_ref[j].astype(jnp.float32), _NN, preferred_element_type=jnp.float32)
          for j in range(pf)
        ]

      _online_update(s, valid, pv, m_sc, l_sc, acc_sc)

  @pl.when(last)
  def _finish():
    inv = inverse_sum(l_sc[...])
    o_ref[...] = (acc_sc[...] * inv[None]).astype(o_ref.dtype)


def _block_index(b, kb, qlen_ref, start_ref, *, block_t, num_blocks):
  """Clamps ``kb`` to the blocks that hold valid slots (no ``//``: lax.div on non-negatives)."""
  first = lax.div(start_ref[b], block_t)
  last = lax.div(jnp.maximum(qlen_ref[b] - 1, 0), block_t)
  idx = jnp.minimum(jnp.maximum(kb, first), jnp.maximum(last, first))
  return jnp.minimum(idx, num_blocks - 1)


def quantized_kv_decode_attention(
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
  block_sizes: BlockSizes | None = None,
  sm_scale: float | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Decode attention over a KIVI-packed cache (TPU-style kernel).

  Arguments match ``quantized_kv_attention_reference``; see that docstring.

  Args:
    q: ``(B, Hq, D)``.
    kv: ``QuantizedKV`` with leading dims ``(B, Hkv)`` (see ``packing``).
    start: first valid slot per row; scalar or ``(B,)`` int.
    quantized_length: quantized slots written; scalar or ``(B,)`` int.
    length: total positions incl. the residual window; default ``quantized_length``.
    k_residual: optional float ``(B, Hkv, R, D)``; slot r is position
      ``quantized_length + r``.
    v_residual: like ``k_residual``.
    bits: 2, 4 or 8.
    group_size: key quant group; a multiple of ``8 * (8 // bits)``.
    block_sizes: ``BlockSizes``; ``block_t`` is capped at T.
    sm_scale: softmax scale, default ``D ** -0.5``.
    interpret: run the Pallas interpreter.

  Returns:
    ``(B, Hq, D)`` in ``q.dtype``.
  """
  dims = validate(q, kv, k_residual, v_residual, bits, group_size)
  block_t = min((block_sizes or BlockSizes()).block_t, dims.num_tokens)
  validate_block(dims, block_t, group_size)
  b, hkv, g, d, t, r, pf = (
    dims.batch,
    dims.num_kv_heads,
    dims.group,
    dims.head_dim,
    dims.num_tokens,
    dims.residual,
    dims.pack,
  )
  dp = d // pf
  nb = t // block_t
  n = block_t // group_size
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  start = as_rows(start, b, "start")
  qlen = as_rows(quantized_length, b, "quantized_length")
  length = qlen if length is None else as_rows(length, b, "length")

  idx = functools.partial(_block_index, block_t=block_t, num_blocks=nb)
  in_specs = [
    pl.BlockSpec((None, None, g, d), lambda i, h, kb, ql, ln, st: (i, h, 0, 0)),
    pl.BlockSpec(
      (None, None, block_t // pf, d), lambda i, h, kb, ql, ln, st: (i, h, idx(i, kb, ql, st), 0)
    ),
  ]
  scale_spec = pl.BlockSpec(
    (None, None, None, n, d), lambda i, h, kb, ql, ln, st: (i, h, idx(i, kb, ql, st), 0, 0)
  )
  in_specs += [scale_spec, scale_spec]
  in_specs.append(
    pl.BlockSpec(
      (None, None, block_t, dp), lambda i, h, kb, ql, ln, st: (i, h, idx(i, kb, ql, st), 0)
    )
  )
  vscale_spec = pl.BlockSpec(
    (None, None, 1, block_t), lambda i, h, kb, ql, ln, st: (i, h, 0, idx(i, kb, ql, st))
  )
  in_specs += [vscale_spec, vscale_spec]
  args = [
    q.reshape(b, hkv, g, d),
    kv.k_packed,
    kv.k_scale.reshape(b, hkv, nb, n, d),
    kv.k_zero.reshape(b, hkv, nb, n, d),
    kv.v_packed,
    kv.v_scale.reshape(b, hkv, 1, t),
    kv.v_zero.reshape(b, hkv, 1, t),
  ]
  if r:
    in_specs.append(pl.BlockSpec((None, None, r, d), lambda i, h, kb, ql, ln, st: (i, h, 0, 0)))
    in_specs.append(
      pl.BlockSpec((None, None, pf, r, dp), lambda i, h, kb, ql, ln, st: (i, h, 0, 0, 0))
    )
    args += [k_residual, v_residual.reshape(b, hkv, r, pf, dp).transpose(0, 1, 3, 2, 4)]

  kernel = functools.partial(
    _kernel,
    bits=bits,
    group_size=group_size,
    block_t=block_t,
    sm_scale=sm_scale,
    has_residual=bool(r),
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((b, hkv, pf, g, dp), q.dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, hkv, nb),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, pf, g, dp), lambda i, h, kb, ql, ln, st: (i, h, 0, 0, 0)),
      scratch_shapes=[
        pltpu.VMEM((g, 1), jnp.float32),
        pltpu.VMEM((g, 1), jnp.float32),
        pltpu.VMEM((pf, g, dp), jnp.float32),
      ],
    ),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret,
    name="quantized_kv_decode_attention",
  )(qlen, length, start, *args)
  # (B, Hkv, pf, G, dp) -> (B, Hkv, G, pf * dp): slot j holds channels [j*dp, (j+1)*dp).
  return out.transpose(0, 1, 3, 2, 4).reshape(b, dims.num_q_heads, d)
