"""MoBA over a slot-indexed K/V buffer: pool keys per block, route each query tile to its
top-k blocks, then the ``block_sparse_attention`` op (Pallas kernel or XLA) over them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.sparse_attention.methods import MoBA
from jaxllm.sparse_attention.sparq import check_shapes
from pallas_kernels.block_sparse_attention import pool_keys, route


def pad_slots(x: jax.Array, multiple: int) -> jax.Array:
  """[B, H, T, D] padded with zero slots to a multiple of `multiple` (padded slots lie past
  every query, so they are never visible)."""
  extra = -x.shape[2] % multiple
  return jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) if extra else x


def moba_attention(
  q, k, v, q_slots, kv_start, method: MoBA, kernels=ops.KernelConfig(), block_keys=None
) -> jax.Array:
  """MoBA attention: [B, S, Hq, D] in q's dtype.

  Args:
    q: [B, S, Hq, D]; k, v: [B, Hkv, T, D] (T padded here to whole blocks).
    q_slots: [B, S]; kv_start: [B] (visibility as `jaxllm.ops.attention`).
    method: the `MoBA` parameters.
    kernels: implementation choice for the ``block_sparse_attention`` op.
    block_keys: optional [B, Hkv, ceil(T / block_size), D] block means to route by
      (e.g. from a KIVI cache's group statistics); default: pooled from `k`.
  """
  check_shapes("MoBA", q, k, v, q_slots, kv_start)
  block = method.block_size
  method.check_call(q.shape[-1], k.shape[2])
  k, v = pad_slots(k, block), pad_slots(v, block)
  if block_keys is None:
    conv = None if method.key_conv is None else jnp.asarray(method.key_conv, jnp.float32)
    block_keys = pool_keys(k, kv_start, block, key_conv=conv)
  tile = 1 if q.shape[1] == 1 else method.tile
  indices = route(q, block_keys, q_slots, kv_start, block_q=tile, block_k=block, top_k=method.top_k)
  return ops.block_sparse_attention(
    q, k, v, q_slots, kv_start, indices, block_q=tile, block_k=block, config=kernels
  )
