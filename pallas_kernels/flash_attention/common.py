"""What the two flash kernels share: input guards, block fitting, the folded layout and
the online-softmax step.

Layout. Queries are folded per KV head: ``q [B, S, Hq, D]`` becomes
``[B, Hkv, S_pad * Gp, D]`` with rows ordered (query slot, head of the group), so one
block of ``block_q`` query slots is ``block_q * Gp`` contiguous rows that share their
KV head's key and value blocks (Gp is the group, padded to a power of 2 for Triton;
padded heads are zero queries whose rows are dropped). Each row carries its query's
slot (``slot_rows [B, S_pad * Gp, 1]``), so the mask is the op's own:
``kv_start[b] <= t <= slot``. Slots are clamped to ``[-1, T - 1]`` and ``kv_start`` to
``>= 0`` (the same visibility), padded queries get slot -1 (they see nothing) and
padded keys sit past T - 1 (no query sees them). ``hi [B * nq]`` is the newest slot
of each query block: key blocks after it, or wholly before ``kv_start``, are skipped.

Rows that see no key (left-padding queries, slot < kv_start) return zeros and a
logsumexp of ``MASKED``; the op's reference returns a uniform average there. Callers
drop those rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._util import is_pow2, next_pow2

from .block_sizes import BlockSizes

# Score of a masked slot and logsumexp of a row that sees no key: finite, so the
# online softmax never computes inf - inf.
MASKED = -1e30
HEAD_DIMS = (64, 128)
# A block that does not divide its sequence is halved down to this before padding.
MIN_HALVED_BLOCK = 64
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _shape(x) -> tuple:
  return tuple(x.shape)


def check_inputs(name: str, q, k, v, q_slots, kv_start) -> None:
  """The kernel's own guard (the op validates first; this keeps a direct call from
  failing deep in lowering): a one-line ValueError/TypeError naming the shape."""
  for arg, x in (("q", q), ("k", k), ("v", v), ("q_slots", q_slots), ("kv_start", kv_start)):
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}")
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(
      f"{name}: q {_shape(q)} must be [B, S, Hq, D] and k {_shape(k)} [B, Hkv, T, D]"
    )
  b, s, hq, d = q.shape
  hkv = k.shape[1]
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"{name}: k {_shape(k)} does not fit q {_shape(q)} (same B and head_dim)")
  if hkv == 0 or hq % hkv:
    raise ValueError(
      f"{name}: {hkv} KV heads (k {_shape(k)}) do not divide {hq} query heads (q {_shape(q)})"
    )
  if _shape(v) != _shape(k):
    raise ValueError(f"{name}: v {_shape(v)} differs from k {_shape(k)}")
  if _shape(q_slots) != (b, s) or _shape(kv_start) != (b,):
    raise ValueError(
      f"{name}: q_slots {_shape(q_slots)} must be {(b, s)} and kv_start {_shape(kv_start)} {(b,)}"
    )
  for arg, x in (("q_slots", q_slots), ("kv_start", kv_start)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name}: {arg} must be integer, got {x.dtype}")
  for arg, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}: {arg} must be float, got {x.dtype}")
  if s == 0 or k.shape[2] == 0:
    raise ValueError(f"{name}: empty sequence (q {_shape(q)}, k {_shape(k)})")
  if d not in HEAD_DIMS:
    raise ValueError(f"{name}: head_dim {d} (q {_shape(q)}) is not one of {HEAD_DIMS}")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def fit_block(
  name: str, axis: str, n: int, block: int, *, pad: bool, pow2: bool, floor: int = 1
) -> tuple[int, int]:
  """``(block, padded n)`` for a sequence axis of length `n`.

  Up to one block: one block of ``n`` rounded up to 8 (TPU) or to a power of 2
  (Triton). Longer: `block`, halved while it does not divide ``n`` (not below
  `MIN_HALVED_BLOCK`); if none divides, `block` and ``n`` padded to its multiple.
  `floor` is the smallest block the kernel takes. Without `pad`, a block that does
  not divide ``n`` is a ValueError naming the axis.
  """
  if n <= block:
    b = next_pow2(n) if pow2 else (_round_up(n, 8) if pad else n)
  else:
    b = block
    while n % b and b // 2 >= MIN_HALVED_BLOCK and (b // 2) % 8 == 0:
      b //= 2
    if n % b:
      b = block
  b = max(b, floor)
  padded = _round_up(n, b)
  if padded != n and not pad:
    raise ValueError(
      f"{name}: {axis} = {n} is not a multiple of its block {b} and BlockSizes.pad is False"
    )
  return b, padded


@dataclasses.dataclass(frozen=True)
class Tiling:
  """The sizes of one call: the op's shapes, the blocks, and the padded lengths."""

  batch: int
  num_queries: int  # S
  num_slots: int  # T
  num_kv_heads: int
  group: int  # G = Hq / Hkv
  group_padded: int  # Gp: G, or the next power of 2 (Triton)
  head_dim: int
  block_q: int
  block_k: int
  padded_queries: int  # S_pad
  padded_slots: int  # T_pad

  @property
  def rows(self) -> int:
    """Rows of one query block: its query slots times the (padded) group."""
    return self.block_q * self.group_padded

  @property
  def num_q_blocks(self) -> int:
    return self.padded_queries // self.block_q

  @property
  def num_k_blocks(self) -> int:
    return self.padded_slots // self.block_k


def tiling(
  name: str, q, k, block_sizes: BlockSizes, *, pow2: bool, min_rows: int = 1, min_block_k: int = 1
) -> Tiling:
  """Blocks for these shapes (`fit_block` per axis); pow2: Triton's power-of-2 rule."""
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g = hq // hkv
  gp = next_pow2(g) if pow2 else g
  if pow2:
    for field in ("block_q", "block_k"):
      if not is_pow2(getattr(block_sizes, field)):
        raise ValueError(
          f"{name}: BlockSizes.{field} = {getattr(block_sizes, field)} is not a power of 2"
        )
  pad = block_sizes.pad
  floor_q = max(1, min_rows // gp)
  bq, s_pad = fit_block(name, "S", s, block_sizes.block_q, pad=pad, pow2=pow2, floor=floor_q)
  bk, t_pad = fit_block(name, "T", t, block_sizes.block_k, pad=pad, pow2=pow2, floor=min_block_k)
  return Tiling(b, s, t, hkv, g, gp, d, bq, bk, s_pad, t_pad)


def fold_inputs(q, k, v, q_slots, kv_start, tl: Tiling):
  """The kernels' inputs: ``(q_rows, k, v, slot_rows, start, hi)`` (see the module doc)."""
  b, s, t, hkv, g, gp, d = (
    tl.batch,
    tl.num_queries,
    tl.num_slots,
    tl.num_kv_heads,
    tl.group,
    tl.group_padded,
    tl.head_dim,
  )
  sp, nq = tl.padded_queries, tl.num_q_blocks
  slots = jnp.clip(q_slots.astype(jnp.int32), -1, t - 1)
  slots = jnp.pad(slots, ((0, 0), (0, sp - s)), constant_values=-1)
  hi = slots.reshape(b, nq, tl.block_q).max(axis=-1).reshape(b * nq)
  slot_rows = jnp.repeat(slots, gp, axis=1)[..., None]  # [B, S_pad * Gp, 1]
  start = jnp.maximum(kv_start.astype(jnp.int32), 0)
  qg = jnp.pad(q.reshape(b, s, hkv, g, d), ((0, 0), (0, sp - s), (0, 0), (0, gp - g), (0, 0)))
  q_rows = qg.transpose(0, 2, 1, 3, 4).reshape(b, hkv, sp * gp, d)
  kv_pad = ((0, 0), (0, 0), (0, tl.padded_slots - t), (0, 0))
  k = jnp.pad(k.astype(q.dtype), kv_pad)
  v = jnp.pad(v.astype(q.dtype), kv_pad)
  return q_rows, k, v, slot_rows, start, hi


def unfold_out(out, tl: Tiling):
  """``[B, Hkv, S_pad * Gp, D]`` -> ``[B, S, Hq, D]``."""
  b, s, hkv, g = tl.batch, tl.num_queries, tl.num_kv_heads, tl.group
  out = out.reshape(b, hkv, tl.padded_queries, tl.group_padded, tl.head_dim)[:, :, :s, :g]
  return out.transpose(0, 2, 1, 3, 4).reshape(b, s, hkv * g, tl.head_dim)


def unfold_lse(lse, tl: Tiling):
  """``[B, Hkv, S_pad * Gp, 1]`` -> ``[B, Hq, S]``."""
  b, s, hkv, g = tl.batch, tl.num_queries, tl.num_kv_heads, tl.group
  lse = lse.reshape(b, hkv, tl.padded_queries, tl.group_padded)[:, :, :s, :g]
  return lse.transpose(0, 1, 3, 2).reshape(b, hkv * g, s)


def dot_precision(dtype):
  """Full float32 products for float32 inputs; the dtype's native product otherwise."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def scores(q, k, sm_scale, precision):
  """``q @ k.T * sm_scale`` in float32: ``(R, D) x (bk, D) -> (R, bk)``."""
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=precision)
  return s * sm_scale


def online_step(m, total, acc, s, visible, v, precision):
  """Folds one key block into the running max ``m (R, 1)``, sum ``total (R, 1)`` and
  ``acc (R, D)`` (all float32); ``s (R, bk)`` scores, ``visible`` a bool mask
  broadcastable to them, ``v (bk, D)``. A row with no visible key so far keeps
  ``total == 0`` and ``acc == 0``."""
  s = jnp.where(visible, s, MASKED)
  m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
  total_new = alpha * total + p.sum(axis=-1, keepdims=True)
  pv = lax.dot_general(
    p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32, precision=precision
  )
  return m_new, total_new, alpha * acc + pv


def finish(m, total, acc) -> tuple[jax.Array, jax.Array]:
  """``(acc / total, m + log total)``; zeros and `MASKED` for a row that saw no key."""
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  out = jnp.where(seen, acc / safe, 0.0)
  lse = jnp.where(seen, m + jnp.log(safe), MASKED)
  return out, lse
