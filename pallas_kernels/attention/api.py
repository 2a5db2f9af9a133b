"""The ``attention`` op: causal grouped-query attention over a slot-indexed K/V buffer.

``attention(q [B, S, Hq, D], k [B, Hkv, T, D], v, q_slots [B, S], kv_start [B])
-> [B, S, Hq, D]`` in q's dtype. Key slot t is visible to a query at slot s iff
``kv_start[b] <= t <= s``; slots past the newest query are never visible.

Implementations:
  * ``reference``: repeat K/V per query head, one masked softmax (`reference.py`).
  * ``xla``: dense for up to 128 queries, else a blocked loop with an online
    softmax whose program size does not grow with S (`xla.py`).
"""

from __future__ import annotations

from pallas_kernels.op_api import Implementation, Op

from .reference import attention_reference
from .validation import validate
from .xla import attention_xla

ATTENTION = Op(
  "attention",
  (
    Implementation("reference", "reference", attention_reference),
    Implementation("xla", "xla", attention_xla),
  ),
  validate=validate,
)
