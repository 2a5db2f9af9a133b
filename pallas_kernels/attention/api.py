"""The ``attention`` op: causal grouped-query attention over a slot-indexed K/V buffer.

``attention(q [B, S, Hq, D], k [B, Hkv, T, D], v, q_slots [B, S], kv_start [B])
-> [B, S, Hq, D]`` in q's dtype. Key slot t is visible to a query at slot s iff
``kv_start[b] <= t <= s``; slots past the newest query are never visible.

Implementations:
  * ``reference``: repeat K/V per query head, one masked softmax (`reference.py`).
  * ``xla``: dense for up to 128 queries, else a blocked loop with an online
    softmax whose program size does not grow with S (`xla.py`).
  * ``mosaic_tpu``: the flash kernel for TPU (`pallas_kernels.flash_attention.tpu_kernel`).
  * ``triton``: the portable flash kernel (`pallas_kernels.flash_attention.triton_kernel`),
    the GQA group padded to a power of 2.
Both kernels cover prefill (S == T), a chunk against a longer buffer (S < T) and decode
(S = 1), for head_dim 64 or 128; other head dims are refused (`supports()` names
the head_dim), so the table routes them to ``xla`` by design. A query that sees no key
(slot < kv_start) gets zeros from the kernels (a uniform average from the reference).
The kernels also return the logsumexp when called directly with ``return_lse=True``.
"""

from __future__ import annotations

from pallas_kernels.flash_attention import flash_attention_tpu, flash_attention_triton
from pallas_kernels.op_api import (
  Implementation,
  Op,
  Sharding,
  supported_by_tracing,
  without_platform,
)

from .reference import attention_reference
from .validation import validate
from .xla import attention_xla


def _kernel(fn):
  """`fn` as a Pallas implementation: the op's own validation first (so a direct call
  raises the op's errors), one form on every chip (the platform is not read)."""

  def run(q, k, v, q_slots, kv_start, **kwargs):
    validate(q, k, v, q_slots, kv_start)
    return fn(q, k, v, q_slots, kv_start, **kwargs)

  return without_platform(run)


# Batch rows, queries and heads are independent; a shard keeps whole GQA groups (query
# heads split with their KV heads). Key slots (the softmax) and head_dim are never split.
_Q = ("batch", "length", "act_heads", None)
_KV = ("batch", "act_kv_heads", None, None)
ATTENTION_SHARDING = Sharding(
  args=(_Q, _KV, _KV, ("batch", "length"), ("batch",)),
  out=_Q,
  tied=(("act_heads", "act_kv_heads"),),
)

ATTENTION = Op(
  "attention",
  (
    Implementation("reference", "reference", attention_reference),
    Implementation("xla", "xla", attention_xla),
    Implementation(
      "mosaic_tpu",
      "pallas",
      _kernel(flash_attention_tpu),
      backend="tpu",
      supports=supported_by_tracing(flash_attention_tpu),
    ),
    Implementation(
      "triton",
      "pallas",
      _kernel(flash_attention_triton),
      backend="gpu",
      supports=supported_by_tracing(flash_attention_triton),
    ),
  ),
  validate=validate,
  sharding=ATTENTION_SHARDING,
)
