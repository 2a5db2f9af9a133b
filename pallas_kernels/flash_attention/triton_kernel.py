"""Portable (Triton) flash attention: grid (B, Hkv, query blocks), a ``fori_loop`` over
the key blocks up to the diagonal, the online-softmax state carried through it.

Triton has no scratch memory, no scalar prefetch and no sequential grid axis (a
reduction over a grid axis into the output races on a GPU), so each program owns one
query block of one KV head and loops over that head's key blocks itself: from the
block holding the row's ``kv_start`` to the one holding the query block's newest
slot, nothing after the diagonal. Keys and values are whole-sequence blocks read a
key block at a time with ``pl.ds`` ref slices (no value slicing). Every load has a
power-of-2 size: the GQA group is zero-padded to a power of 2 (SmolLM2's 3 -> 4) and
folded into the rows (``block_q * Gp`` of them, at least 16 for the dot), blocks are
powers of 2 (key blocks at least 16). Layout and masks: `common`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from . import common
from .block_sizes import BlockSizes, triton_default

NAME = "flash_attention (triton)"
MIN_ROWS = 16  # Triton dot tiles are at least 16 x 16
MIN_BLOCK_K = 16


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
  num_k_blocks,
  sm_scale,
  precision,
  with_lse,
):
  b, qi = pl.program_id(0), pl.program_id(2)
  start = start_ref[b]
  hi = hi_ref[b * num_q_blocks + qi]
  q = q_ref[...]  # (R, D)
  slots = slot_ref[...]  # (R, 1)
  rows, d = q.shape

  def key_block(j, carry):
    k0 = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(k0, block_k), :]
    v = v_ref[pl.ds(k0, block_k), :]
    s = common.scores(q, k, sm_scale, precision)  # (R, bk)
    key = k0 + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    visible = (key <= slots) & (key >= start)
    return common.online_step(*carry, s, visible, v, precision)

  # Non-negative operands: start >= 0, hi >= -1 (so hi + block_k >= 0).
  lo = jnp.minimum(lax.div(start, block_k), num_k_blocks)
  stop = jnp.minimum(lax.div(hi + block_k, block_k), num_k_blocks)
  init = (
    jnp.full((rows, 1), common.MASKED, jnp.float32),
    jnp.zeros((rows, 1), jnp.float32),
    jnp.zeros((rows, d), jnp.float32),
  )
  m, total, acc = lax.fori_loop(lo, jnp.maximum(stop, lo), key_block, init)
  out, lse = common.finish(m, total, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  if with_lse:
    (lse_ref,) = rest
    lse_ref[...] = lse


def flash_attention_triton(
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
  """Causal grouped-query flash attention (the ``attention`` op), Triton-friendly kernel.

  Same arguments and results as `tpu_kernel.flash_attention_tpu`, except:
    block_sizes: default `triton_default(G, D, itemsize)` (16 KiB of query rows,
      8 KiB of keys: 32 x 64 for SmolLM2 in bf16); both blocks must be powers of 2.
    compiler_params: default ``pltr.CompilerParams(num_warps=4, num_stages=2)``
      (written for Triton; Mosaic GPU, the default Pallas GPU backend, would stage
      the whole-sequence K/V blocks in shared memory). Interpret mode ignores them.

  Returns:
    ``[B, S, Hq, D]`` in q's dtype; with `return_lse`, ``(out, lse [B, Hq, S]
    float32)``. A query that sees no key gets zeros and lse ``common.MASKED``.
  """
  common.check_inputs(NAME, q, k, v, q_slots, kv_start)
  if block_sizes is None:
    block_sizes = triton_default(q.shape[2] // k.shape[1], q.shape[3], q.dtype.itemsize)
  tl = common.tiling(
    NAME,
    q,
    k,
    block_sizes,
    pow2=True,
    min_rows=MIN_ROWS,
    min_block_k=MIN_BLOCK_K,
  )
  q_rows, k, v, slot_rows, start, hi = common.fold_inputs(q, k, v, q_slots, kv_start, tl)
  d, rows, nq, nk, bk = tl.head_dim, tl.rows, tl.num_q_blocks, tl.num_k_blocks, tl.block_k
  sm_scale = d**-0.5 if sm_scale is None else float(sm_scale)
  if compiler_params is None:
    compiler_params = pltr.CompilerParams(num_warps=4, num_stages=2)

  def whole(n):
    return pl.BlockSpec((n,), lambda b, h, qi: (0,))

  q_spec = pl.BlockSpec((None, None, rows, d), lambda b, h, qi: (b, h, qi, 0))
  kv_spec = pl.BlockSpec((None, None, tl.padded_slots, d), lambda b, h, qi: (b, h, 0, 0))
  out_shape = [jax.ShapeDtypeStruct(q_rows.shape, q.dtype)]
  out_specs = [q_spec]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct(q_rows.shape[:3] + (1,), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, rows, 1), lambda b, h, qi: (b, h, qi, 0)))
  kernel = functools.partial(
    _kernel,
    block_k=bk,
    num_q_blocks=nq,
    num_k_blocks=nk,
    sm_scale=sm_scale,
    precision=common.dot_precision(q.dtype),
    with_lse=return_lse,
  )
  results = pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=(tl.batch, tl.num_kv_heads, nq),
    in_specs=[
      whole(start.shape[0]),
      whole(hi.shape[0]),
      pl.BlockSpec((None, rows, 1), lambda b, h, qi: (b, qi, 0)),
      q_spec,
      kv_spec,
      kv_spec,
    ],
    out_specs=out_specs,
    compiler_params=compiler_params,
    interpret=interpret,
    name="flash_attention_triton",
  )(start, hi, slot_rows, q_rows, k, v)
  out = common.unfold_out(results[0], tl)
  if return_lse:
    return out, common.unfold_lse(results[1], tl)
  return out
