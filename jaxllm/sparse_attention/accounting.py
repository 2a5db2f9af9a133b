"""KV bytes a sparse attention method reads, computed from what it touches.

Counts are per KV head and query (a group's query heads share their reads: SparQ
picks one channel set and one slot set per group, MoBA one block set), relative to
dense attention over the same visible slots and the same cache format. A key token
costs `key_bytes` and a value token `value_bytes` (codes, scales and zero points
amortized per token: `jaxllm.kv_cache` formats give them; bf16 is 2 * head_dim each).

* SparQ at T visible slots (dense when k >= T): step 1 reads r of D channels of
  every key, step 2 k whole keys and values, and ``mean_v`` one running mean of V
  (``per_head``: G query heads each choosing, so up to G*r channels and G*k slots,
  never more than dense). A step that would read more than dense attention reads
  dense (counted so).
  Algorithmic: r/D of each key, which is real only when keys are also stored
  channel-major ([D, T]: a channel's slots contiguous; the SparQ paper keeps K
  twice, once per layout). Row-major [T, D] keys put a token's D channels in one
  row of 128 bytes (bf16, D=64): reading r of them still touches every cache line
  (sector), so step 1 costs a whole K read: the ``row_major`` figure.
* MoBA for the query at slot j (T = j + 1 visible, blocks of B): its own block up to
  itself, top_k - 1 earlier blocks (fewer when fewer exist), and the routing's block
  means (one key-sized row per earlier block).
"""

from __future__ import annotations

import numpy as np

from jaxllm.sparse_attention.methods import MoBA, SparQ


def _sparq_bytes(method: SparQ, t, head_dim: int, kb: float, vb: float, row_major, group: int):
  readers = group if method.per_head else 1  # query heads choosing apart, per KV head
  channels = min(head_dim, readers * method.r)
  step1 = t * kb if row_major else t * kb * channels / head_dim
  rows = np.minimum(t, readers * method.k)
  sparse = step1 + rows * (kb + vb) + (vb if method.correction == "mean_v" else 0.0)
  return np.minimum(np.where(t <= method.k, t * (kb + vb), sparse), t * (kb + vb))


def _moba_bytes(method: MoBA, j: np.ndarray, kb: float, vb: float):
  b = method.block_size
  earlier = j // b
  tokens = (j % b) + 1 + np.minimum(method.top_k - 1, earlier) * b
  return tokens * (kb + vb) + earlier * kb


def kv_read_fraction(
  method, context: int, head_dim: int, key_bytes: float, value_bytes: float, group: int = 1
):
  """Fractions of dense attention's KV bytes `method` reads over a window of `context`
  tokens, whose queries at slots 0 .. context - 2 are the scored ones. `group`: query
  heads per KV head (SparQ ``per_head`` reads once per query head, at most dense).

  Returns a dict: ``kv_read_fraction`` (all reads summed over the window's queries,
  over dense's), ``kv_read_fraction_at_context`` (the last query's, T = context - 1),
  and for SparQ ``kv_read_fraction_row_major`` (step 1 on row-major keys).
  """
  if context < 2:
    raise ValueError(f"kv_read_fraction: context must be >= 2, got {context}")
  j = np.arange(context - 1, dtype=np.float64)
  t = j + 1
  dense = t * (key_bytes + value_bytes)
  if method is None:
    return {"kv_read_fraction": 1.0, "kv_read_fraction_at_context": 1.0}
  if isinstance(method, SparQ):
    read = _sparq_bytes(method, t, head_dim, key_bytes, value_bytes, False, group)
    row = _sparq_bytes(method, t, head_dim, key_bytes, value_bytes, True, group)
    return {
      "kv_read_fraction": float(read.sum() / dense.sum()),
      "kv_read_fraction_at_context": float(read[-1] / dense[-1]),
      "kv_read_fraction_row_major": float(row.sum() / dense.sum()),
    }
  if isinstance(method, MoBA):
    read = _moba_bytes(method, j.astype(np.int64), key_bytes, value_bytes)
    return {
      "kv_read_fraction": float(read.sum() / dense.sum()),
      "kv_read_fraction_at_context": float(read[-1] / dense[-1]),
    }
  raise TypeError(f"kv_read_fraction: not an attention method: {method!r}")
