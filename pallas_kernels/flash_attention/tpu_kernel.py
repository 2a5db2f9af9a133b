"""Mosaic TPU flash attention: grid (B, Hkv, query blocks, key blocks), online softmax
in VMEM scratch, causal block skipping.

Each program owns one query block of one KV head: ``block_q`` query slots times the
G query heads of the group, ``block_q * G`` rows against the head's key and value
blocks (layout in `common`). The key-block axis is the last grid axis, marked
"arbitrary": the running max, sum and accumulator live in VMEM scratch across it,
initialized at the first key block and written out at the last. A key block after
the query block's newest slot, or wholly before the row's ``kv_start``, is skipped
(``pl.when``), and its index map is clamped to the visible range, so a skipped step
re-uses the resident block instead of fetching a new one. ``kv_start`` and each
query block's newest slot arrive by scalar prefetch (SMEM). No integer ``//`` in the
kernel or the index maps (it needs a TPU device kind at lowering): ``lax.div`` on
non-negative values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import common
from .block_sizes import BlockSizes, tpu_default

NAME = "flash_attention (mosaic_tpu)"


def _kernel(
  start_ref,
  hi_ref,
  slot_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  *rest,
  block_k,
  num_q_blocks,
  sm_scale,
  precision,
  with_lse,
):
  if with_lse:
    lse_ref, m_sc, l_sc, acc_sc = rest
  else:
    lse_ref, (m_sc, l_sc, acc_sc) = None, rest
  b, qi, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  start = start_ref[b]
  hi = hi_ref[b * num_q_blocks + qi]
  k0 = kb * block_k

  @pl.when(kb == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, common.MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when((k0 <= hi) & (k0 + block_k > start))
  def _block():
    s = common.scores(q_ref[...], k_ref[...], sm_scale, precision)  # (R, bk)
    key = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    visible = (key <= slot_ref[...]) & (key >= start)
    m, total, acc = common.online_step(
      m_sc[...], l_sc[...], acc_sc[...], s, visible, v_ref[...], precision
    )
    m_sc[...] = m
    l_sc[...] = total
    acc_sc[...] = acc

  @pl.when(kb == pl.num_programs(3) - 1)
  def _finish():
    out, lse = common.finish(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    if with_lse:
      lse_ref[...] = lse


def _key_block(b, qi, kb, start_ref, hi_ref, *, block_k, num_q_blocks, num_k_blocks):
  """`kb` clamped to the blocks the query block can see (non-negative: lax.div)."""
  first = lax.div(start_ref[b], block_k)
  last = lax.div(jnp.maximum(hi_ref[b * num_q_blocks + qi], 0), block_k)
  idx = jnp.minimum(jnp.maximum(kb, first), jnp.maximum(last, first))
  return jnp.minimum(idx, num_k_blocks - 1)


def flash_attention_tpu(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_slots: jax.Array,
  kv_start: jax.Array,
  *,
  block_sizes: BlockSizes | None = None,
  return_lse: bool = False,
  sm_scale: float | None = None,
  compiler_params=None,
  interpret: bool = False,
):
  """Causal grouped-query flash attention (the ``attention`` op), Mosaic TPU kernel.

  Args:
    q: ``[B, S, Hq, D]`` queries, D 64 or 128.
    k: ``[B, Hkv, T, D]`` keys (Hkv divides Hq); cast to q's dtype.
    v: like k.
    q_slots: ``[B, S]`` int slot of each query; key slot t is visible to it iff
      ``kv_start[b] <= t <= slot``.
    kv_start: ``[B]`` int first valid slot (left padding).
    block_sizes: `BlockSizes`; default `tpu_default()` (128 x 128), fitted to S
      and T by `common.fit_block` (halved, or padded unless ``pad=False``).
    return_lse: also return the logsumexp of each query's scaled scores.
    sm_scale: softmax scale, default ``D ** -0.5``.
    compiler_params: default ``pltpu.CompilerParams`` with the key axis "arbitrary".
    interpret: run the Pallas interpreter.

  Returns:
    ``[B, S, Hq, D]`` in q's dtype; with `return_lse`, ``(out, lse [B, Hq, S]
    float32)``. A query that sees no key gets zeros and lse ``common.MASKED``.
  """
  common.check_inputs(NAME, q, k, v, q_slots, kv_start)
  tl = common.tiling(NAME, q, k, block_sizes or tpu_default(), pow2=False)
  q_rows, k, v, slot_rows, start, hi = common.fold_inputs(q, k, v, q_slots, kv_start, tl)
  d, rows, nq, nk, bk = tl.head_dim, tl.rows, tl.num_q_blocks, tl.num_k_blocks, tl.block_k
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  key_block = functools.partial(_key_block, block_k=bk, num_q_blocks=nq, num_k_blocks=nk)

  def q_map(b, h, qi, kb, start_ref, hi_ref):
    return b, h, qi, 0

  def slot_map(b, h, qi, kb, start_ref, hi_ref):
    return b, qi, 0

  def kv_map(b, h, qi, kb, start_ref, hi_ref):
    return b, h, key_block(b, qi, kb, start_ref, hi_ref), 0

  out_shape = [jax.ShapeDtypeStruct(q_rows.shape, q.dtype)]
  out_specs = [pl.BlockSpec((None, None, rows, d), q_map)]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct(q_rows.shape[:3] + (1,), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, rows, 1), q_map))
  if compiler_params is None:
    compiler_params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )
  kernel = functools.partial(
    _kernel,
    block_k=bk,
    num_q_blocks=nq,
    sm_scale=sm_scale,
    precision=common.dot_precision(q.dtype),
    with_lse=return_lse,
  )
  results = pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(tl.batch, tl.num_kv_heads, nq, nk),
      in_specs=[
        pl.BlockSpec((None, rows, 1), slot_map),
        pl.BlockSpec((None, None, rows, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
      ],
      out_specs=out_specs,
      scratch_shapes=[
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, d), jnp.float32),
      ],
    ),
    compiler_params=compiler_params,
    interpret=interpret,
    name="flash_attention",
  )(start, hi, slot_rows, q_rows, k, v)
  out = common.unfold_out(results[0], tl)
  if return_lse:
    return out, common.unfold_lse(results[1], tl)
  return out
