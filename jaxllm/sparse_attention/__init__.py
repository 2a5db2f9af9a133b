"""Sparse attention methods over any KV cache: MoBA (routed key blocks) and SparQ
(approximate scores from r channels, exact top-k slots).

The seam is the cache: a cache carries its attention method (``None``: dense) and
its `attend` calls `attend` below over the K/V slots as it stores them. So any
cache format (dense, int8, KIVI, RotateKV) runs any method, prefill, chunks and
decode alike, and the model does not change::

    cache = create_cache(spec_for("kivi4"), cfg, batch, capacity).with_attention(SparQ(8, 64))
    logits, cache = model(tokens, cache=cache)

A cache may hand MoBA its own block means (KIVI: from its group statistics).
`accounting.kv_read_fraction` counts the bytes each method reads.
"""

from __future__ import annotations

from jaxllm import ops
from jaxllm.sparse_attention.accounting import kv_read_fraction
from jaxllm.sparse_attention.methods import SPARQ_CORRECTIONS, AttentionMethod, MoBA, SparQ
from jaxllm.sparse_attention.moba import moba_attention
from jaxllm.sparse_attention.sparq import sparq_attention


def attend(method, q, k, v, q_slots, kv_start, kernels=ops.KernelConfig(), block_keys=None):
  """Attention of q [B, S, Hq, D] over slots k, v [B, Hkv, T, D] by `method` (None: dense,
  `jaxllm.ops.attention`); visibility as `ops.attention`. [B, S, Hq, D] in q's dtype.
  `block_keys`: MoBA's block means when the cache supplies them."""
  if method is None:
    return ops.attention(q, k, v, q_slots, kv_start, kernels)
  if isinstance(method, SparQ):
    return sparq_attention(q, k, v, q_slots, kv_start, method).astype(q.dtype)
  if isinstance(method, MoBA):
    return moba_attention(q, k, v, q_slots, kv_start, method, kernels, block_keys)
  raise TypeError(f"attention method must be MoBA, SparQ or None, got {type(method).__name__}")


def check_method(method) -> None:
  """TypeError unless `method` is None, `MoBA` or `SparQ`."""
  if method is not None and not isinstance(method, (MoBA, SparQ)):
    raise TypeError(f"attention method must be MoBA, SparQ or None, got {type(method).__name__}")


__all__ = [
  "SPARQ_CORRECTIONS",
  "AttentionMethod",
  "MoBA",
  "SparQ",
  "attend",
  "check_method",
  "kv_read_fraction",
  "moba_attention",
  "sparq_attention",
]
