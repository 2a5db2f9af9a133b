"""The ``block_sparse_attention`` op: MoBA's routed attention over a slot-indexed K/V buffer.

``block_sparse_attention(q [B, S, Hq, D], k [B, Hkv, T, D], v, q_slots [B, S],
kv_start [B], block_indices [B, Hkv, nQ, K], *, block_q, block_k) -> [B, S, Hq, D]``
in q's dtype, nQ = ceil(S / block_q). Key slot t is visible to the query s iff
``kv_start[b] <= t <= q_slots[b, s]`` and t's key block (``t // block_k``) is among
the entries of ``block_indices[b, h, s // block_q]`` (its KV head's routing of its
query tile; `route` makes one). Entries outside ``[0, T // block_k)`` (-1 padding)
select nothing and a repeated entry counts once. A query that sees no key gets zeros
in every implementation.

Implementations:
  * ``reference``: dense attention with the equivalent mask (`reference.py`).
  * ``xla``: gathers each tile's selected key/value blocks only, then a masked softmax
    (`xla.py`).
  * ``mosaic_tpu``: grid (B, Hkv, nQ, K), indices by scalar prefetch (`tpu_kernel.py`).
  * ``triton``: grid (B, Hkv, query parts), a ``fori_loop`` over the tile's selected
    blocks (`triton_kernel.py`).
The kernels take head_dim 64 or 128 and block_k a multiple of 8 (TPU) or a power of 2
>= 16 (Triton; block_q a power of 2 too when S spans several tiles); `supports()` names
what they refuse, so the table routes such calls to ``xla``.
"""

from __future__ import annotations

from pallas_kernels.attention.api import ATTENTION_SHARDING
from pallas_kernels.op_api import (
  Implementation,
  Op,
  Sharding,
  supported_by_tracing,
  without_platform,
)

from .reference import block_sparse_attention_reference
from .tpu_kernel import block_sparse_attention_tpu
from .triton_kernel import block_sparse_attention_triton
from .validation import validate
from .xla import block_sparse_attention_xla

# As `attention`, plus each KV head's routing [B, Hkv, tiles, top_k] split with its head.
# Query tiles are not split (a tile's routing is shared by its block_q queries).
_Q = ("batch", None, "act_heads", None)
BLOCK_SPARSE_ATTENTION_SHARDING = Sharding(
  args=(
    _Q,
    *ATTENTION_SHARDING.args[1:3],
    ("batch", None),
    ("batch",),
    ("batch", "act_kv_heads", None, None),
  ),
  out=_Q,
  tied=ATTENTION_SHARDING.tied,
)

BLOCK_SPARSE_ATTENTION = Op(
  "block_sparse_attention",
  (
    Implementation("reference", "reference", block_sparse_attention_reference),
    Implementation("xla", "xla", block_sparse_attention_xla),
    Implementation(
      "mosaic_tpu",
      "pallas",
      without_platform(block_sparse_attention_tpu),
      backend="tpu",
      supports=supported_by_tracing(block_sparse_attention_tpu),
    ),
    Implementation(
      "triton",
      "pallas",
      without_platform(block_sparse_attention_triton),
      backend="gpu",
      supports=supported_by_tracing(block_sparse_attention_triton),
    ),
  ),
  validate=validate,
  sharding=BLOCK_SPARSE_ATTENTION_SHARDING,
)
