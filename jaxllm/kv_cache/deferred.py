"""Speculative mode of the group-quantized (KIVI) cache: verify chunks read as one-token
steps would, and a deferred, per-row commit of the tokens each row keeps.

A verify call runs S = gamma + 1 tokens through the target at once; afterwards each row
keeps a prefix of them (`rollback(lengths)`). Plain decoding would have written those
tokens one at a time, and both of that order's effects are reproduced here:

* Visibility (`attend_chunk`): before query i's own step the cache held L + i tokens
  (L: the length before the chunk), of which ``ql(L + i)`` were quantized, where
  ``ql(n) = Q + G * floor(max(n - Q - R, 0) / G)`` follows the flush rule from the
  current quantized length Q (window R <= held < R + G). So query i reads slot t from the
  quantized copy iff ``t < ql(L + i)``, else exactly (sinks always exactly). Groups that
  flush inside the chunk are quantized from the old window plus the chunk with the same
  codes the write path gives (`_quantize_groups`, the same statistics mask), so their
  dequantized copies are the ones plain decoding reads after the flush.
* Deferred writes: the chunk's storage-form keys and values become the cache's pending
  chunk (`advance`), and nothing is quantized or moved. `commit` (the cache's `rollback`
  in this mode) writes each row's kept prefix n_b into the state from before the verify
  call with the normal write path given a per-row token count (`_write(count=n)`), so a
  group flushes only when kept tokens push it out of the window: after the commit the
  cache equals one that was written those n_b tokens one at a time and never saw the
  rejected ones.

Without a residual window (R = 0) the pending partial group is read quantize-dequantized
with statistics over the tokens present at each step, which a chunk cannot reproduce, so
that cache has no speculative mode; nor RotateKV (its stored keys are re-rotated and
re-RoPE'd when read, which a token's own exact copy in plain decoding is not) or a sparse
attention method (their routing reads the cache as one state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.kv_cache.base import (
  SlotCacheMixin,
  attend_two_copies,
  check_room,
  concrete_ints,
  overflow_after,
  row_lengths,
  update_rows,
)


def speculation_problem(cache) -> str | None:
  """Why `cache` (a GroupQuantizedKVCache) has no speculative mode, or None."""
  spec = cache.spec
  if spec.kind != "kivi":
    return (
      f"{cache.name}: speculative mode is for KIVI caches; {spec.kind} re-applies RoPE to its "
      "stored keys, so a verify chunk cannot read its own tokens as one-token steps do"
    )
  if spec.residual == 0:
    return (
      f"{cache.name} cannot roll back at all: without a residual window its pending partial "
      "group is read quantize-dequantized (statistics over the tokens present at each "
      "step), so a verify chunk is not read as one-token steps would read it"
    )
  if cache.attention is not None:
    return (
      f"{cache.name}: speculative mode needs dense attention; {cache.attention.name} routes "
      "over the cache as one state, not as one-token steps"
    )
  return None


def for_speculation(cache, gamma: int):
  """`cache` in speculative mode for verify chunks of gamma + 1 tokens (an empty pending
  chunk); ValueError if this cache has none (`speculation_problem`)."""
  problem = speculation_problem(cache)
  if problem is not None:
    raise ValueError(problem)
  b, h, _, d = cache.layers[0].k_residual.shape
  dtype = cache.layers[0].k_residual.dtype
  chunk = lambda: jnp.zeros((b, h, gamma + 1, d), dtype)  # distinct buffers (donated)
  return cache.replace(
    pending=tuple((chunk(), chunk()) for _ in cache.layers),
    pending_tokens=jnp.zeros((b,), jnp.int32),
  )


def attend_chunk(cache, layer: int, q, k_pre_rope, k, v, q_slots):
  """Attention of the chunk's queries q [B, S, Hq, D] as S one-token steps would compute
  it (see the module docstring); returns (out [B, S, Hq, D], the chunk in storage form
  (k, v) [B, Hkv, S, D]), the layer's pending state. Writes nothing."""
  s = q.shape[1]
  size = cache.pending[layer][0].shape[2]
  if s != size:
    raise ValueError(
      f"{cache.name}: in speculative mode every call runs a verify chunk of {size} tokens "
      f"(gamma + 1), got {s}"
    )
  check_room(cache.length, s, cache.capacity)
  pending = concrete_ints(cache.pending_tokens)
  if pending is not None and pending.any():
    raise ValueError(
      f"{cache.name}: a verify chunk is pending; roll back (commit) before the next one"
    )
  stored = cache.layers[layer]
  g, r = cache.spec.group_size, cache.spec.residual
  k_st, v_st = cache._to_storage(k_pre_rope, k, v)
  ql = cache.quantized_length
  held = cache.length - ql
  pad = ((0, 0), (0, 0), (0, s + g), (0, 0))
  window_k = update_rows(jnp.pad(stored.k_residual, pad), k_st, held, 2)
  window_v = update_rows(jnp.pad(stored.v_residual, pad), v_st, held, 2)
  n = (g - 1 + s) // g * g  # the groups that can flush while these S tokens are written
  groups = cache._quantize_groups(window_k[:, :, :n], window_v[:, :, :n], cache._stat_mask(ql, n))
  group_k, group_v = cache._dequantize_store(groups)
  store_k, store_v = cache._dequantize_store(stored.store)
  slots = ((0, 0), (0, 0), (0, window_k.shape[2]), (0, 0))
  store_k, store_v = jnp.pad(store_k, slots), jnp.pad(store_v, slots)
  exact_k = update_rows(store_k, window_k.astype(jnp.float32), ql, 2)
  exact_v = update_rows(store_v, window_v.astype(jnp.float32), ql, 2)
  quant_k = update_rows(store_k, group_k, ql, 2)
  quant_v = update_rows(store_v, group_v, ql, 2)
  if cache.num_sinks:  # exact wherever they are read
    k_sink, v_sink = cache._write_sinks(stored, k_st, v_st)
    put = jax.vmap(lambda buf, sink, at: jax.lax.dynamic_update_slice(buf, sink, (0, at, 0)))
    quant_k = put(quant_k, k_sink.astype(jnp.float32), cache.start)
    quant_v = put(quant_v, v_sink.astype(jnp.float32), cache.start)
  before = cache.length[:, None] + jnp.arange(s, dtype=jnp.int32)[None]  # [B, S]
  ql_before = ql[:, None] + jnp.maximum(before - ql[:, None] - r, 0) // g * g
  t = jnp.arange(exact_k.shape[2], dtype=jnp.int32)[None, None]
  use_exact = t >= ql_before[:, :, None]  # [B, S, T]
  out = attend_two_copies(
    q, (quant_k, quant_v), (exact_k, exact_v), use_exact, q_slots, cache.start
  )
  return out, (k_st, v_st)


def advance(cache, layer_states, num_tokens: int):
  """The cache holding the verify chunk as pending (every row `num_tokens` longer)."""
  return cache.replace(
    pending=tuple(layer_states),
    pending_tokens=jnp.full_like(cache.length, num_tokens),
    length=cache.length + num_tokens,
    overflow=overflow_after(cache.overflow, cache.length, num_tokens, cache.capacity),
  )


def commit(cache, length):
  """`rollback(length)` in speculative mode: row b keeps ``length[b] - L[b]`` tokens of
  the pending chunk (L: its length before the chunk; clipped to 0..S), written into the
  pre-verify state by the normal write path; then the ordinary rollback to `length`
  (deeper rollbacks reach into the committed tokens as usual). The pending chunk is
  cleared."""
  target = row_lengths(length, cache.batch, f"{cache.name}.rollback")
  held = cache.pending_tokens
  before = cache.length - held
  count = jnp.clip(target - before, 0, held)
  base = cache.replace(length=before, pending_tokens=jnp.zeros_like(held))
  layers, ql = [], cache.quantized_length
  for stored, (k_st, v_st) in zip(cache.layers, cache.pending):
    new, ql = base._write(stored, k_st, v_st, count=count)
    layers.append(new)
  committed = base.replace(layers=tuple(layers), quantized_length=ql, length=before + count)
  return SlotCacheMixin.rollback(committed, target)
