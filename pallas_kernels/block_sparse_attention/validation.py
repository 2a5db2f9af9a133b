"""Input checks for the block-sparse attention op and its router: a one-line
ValueError/TypeError naming the argument and its shape, before any work."""

from __future__ import annotations

import jax.numpy as jnp

NAME = "block_sparse_attention"


def _shape(x) -> tuple:
  return tuple(x.shape)


def _array(name: str, arg: str, x) -> None:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}")


def check_block(name: str, arg: str, value) -> None:
  """`value` is a positive Python int (not a bool)."""
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")


def num_q_blocks(num_queries: int, block_q: int) -> int:
  """nQ = ceil(S / block_q): query tile i holds queries i * block_q .. (i + 1) * block_q - 1."""
  return -(-num_queries // block_q)


def check_qkv(name: str, q, k, q_slots, kv_start, block_k: int) -> None:
  """q [B, S, Hq, D] float; k [B, Hkv, T, D] (or pooled keys) with Hkv dividing Hq;
  q_slots [B, S] and kv_start [B] integer; block_k a positive int dividing T."""
  for arg, x in (("q", q), ("k", k), ("q_slots", q_slots), ("kv_start", kv_start)):
    _array(name, arg, x)
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
  if s == 0 or k.shape[2] == 0:
    raise ValueError(f"{name}: empty sequence (q {_shape(q)}, k {_shape(k)})")
  if _shape(q_slots) != (b, s) or _shape(kv_start) != (b,):
    raise ValueError(
      f"{name}: q_slots {_shape(q_slots)} must be {(b, s)} and kv_start {_shape(kv_start)} {(b,)}"
    )
  for arg, x in (("q_slots", q_slots), ("kv_start", kv_start)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name}: {arg} must be integer, got {x.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"{name}: q must be float, got {q.dtype}")
  check_block(name, "block_k", block_k)


def check_top_k(name: str, top_k, num_blocks: int) -> None:
  if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
    raise ValueError(f"{name}: top_k must be a positive int, got {top_k!r}")
  if top_k > num_blocks:
    raise ValueError(
      f"{name}: top-k larger than the number of blocks: top_k {top_k} > {num_blocks} key blocks"
    )


def validate(q, k, v, q_slots, kv_start, block_indices, *, block_q, block_k) -> None:
  """The op's inputs (shapes, dtypes, block sizes); values are never read.

  q [B, S, Hq, D] float; k, v [B, Hkv, T, D] float with Hkv dividing Hq and block_k
  dividing T; q_slots [B, S] and kv_start [B] integer; block_indices
  [B, Hkv, ceil(S / block_q), K] integer with 1 <= K <= T // block_k.
  """
  _array(NAME, "v", v)
  _array(NAME, "block_indices", block_indices)
  check_qkv(NAME, q, k, q_slots, kv_start, block_k)
  check_block(NAME, "block_q", block_q)
  if _shape(v) != _shape(k):
    raise ValueError(f"{NAME}: v {_shape(v)} differs from k {_shape(k)}")
  for arg, x in (("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{NAME}: {arg} must be float, got {x.dtype}")
  b, s = q.shape[:2]
  hkv, t = k.shape[1], k.shape[2]
  if t % block_k:
    raise ValueError(f"{NAME}: T = {t} (k {_shape(k)}) is not a multiple of block_k = {block_k}")
  nq = num_q_blocks(s, block_q)
  if block_indices.ndim != 4 or _shape(block_indices)[:3] != (b, hkv, nq):
    raise ValueError(
      f"{NAME}: block_indices {_shape(block_indices)} must be [B, Hkv, nQ, K] = "
      f"[{b}, {hkv}, {nq}, K] (nQ = ceil(S / block_q) = ceil({s} / {block_q}))"
    )
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    raise ValueError(f"{NAME}: block_indices must be integer, got {block_indices.dtype}")
  top_k = block_indices.shape[3]
  if top_k == 0:
    raise ValueError(f"{NAME}: block_indices {_shape(block_indices)} selects no block (K = 0)")
  if top_k > t // block_k:
    raise ValueError(
      f"{NAME}: top-k larger than the number of blocks: block_indices "
      f"{_shape(block_indices)} has K = {top_k} > T / block_k = {t} / {block_k}"
    )
