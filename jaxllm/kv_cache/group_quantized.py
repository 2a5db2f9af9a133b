"""Group-quantized caches with a full-precision residual window: KIVI and RotateKV.

Storage per layer (``pf = 8 // bits``; Tq quantized slots, Rb = residual + G):

* quantized store, the `pallas_kernels.quantized_kv_attention` layout: keys
  per channel over groups of G tokens (``k_packed`` uint8 [B, Hkv, Tq/pf, D],
  ``k_scale``/``k_zero`` [B, Hkv, Tq/G, D]) or, for the per-token-keys
  ablation, like values; values per token (``v_packed`` [B, Hkv, Tq, D/pf],
  ``v_scale``/``v_zero`` [B, Hkv, Tq], or [B, Hkv, Tq, C] with
  ``CacheSpec.channel_groups`` C > 1: one scale per token and slab of D/C
  channels); asymmetric ``x ~= code * scale + zero``.
* residual window [B, Hkv, Rb, D] in the cache dtype: slot r of row b holds position
  ``quantized_length[b] + r`` (the kernel's convention).
* sink buffer [B, Hkv, n_sink, D] (RotateKV; KIVI as an ablation): the first n_sink
  tokens of each row, exact, left out of key statistics.

Lengths are per row (``length``, ``quantized_length``: [B]), and so is everything
below: rows of one prompt batch flush together, rows whose lengths differ (after a
per-row `rollback`) each at their own lengths.

Flush rule: after every write the window holds ``n = length - quantized_length``
tokens with ``residual <= n < residual + G`` (once ``length >= residual``): when
it reaches ``residual + G`` the oldest whole group is quantized and moved to the
store. So the `residual` newest tokens are always exact. Static shapes: every
write quantizes the ``ceil((G - 1 + S) / G)`` candidate groups of the window
and writes them at ``quantized_length``; only the first ``f`` count (the
quantized length grows by ``f * G``), the rest land in unused slots and are
never read (the store keeps one spare group of slots for them).

No residual (residual=0): the pending partial group still sits in a G-slot
buffer (per-channel statistics need the whole group), but attention reads it
quantize-dequantized (keys per channel over the tokens present so far, values
per token); only tokens of the same `attend` call see each other exactly.

KIVI stores keys after RoPE; its decode step (one token) runs the
``quantized_kv_attention`` op through `jaxllm.ops`, exact sinks included (see
`_decode_op`); the op reads one value scale per token, so KIVI with
value channel groups (C > 1) attends through the XLA path. RotateKV stores keys
*before* RoPE rotated by a per-head Hadamard matrix (SmolLM2's 3 KV heads of 64
channels do not form a power-of-2 grouped-head block, so each head is rotated
on its own), values rotated too; attention dequantizes, un-rotates and applies
RoPE at each slot's position, so it always uses the dequantize-then-attend path.
Sink tokens are left out of the group statistics and overwrite their
dequantized slots with the exact copies.

Rollback: quantized tokens cannot return to the window, so a row can roll back to
no fewer than its ``quantized_length`` tokens (`rollback_floor`): at most the
window's ``length - quantized_length`` newest tokens (R..R+G-1 once R tokens are
written; the pending group, fewer than G, without a residual window). In the normal
mode the tokens kept stay as stored: if the rolled-back tokens had pushed a group out
of the window, it stays quantized, where a cache that never saw them would hold it
exactly. The speculative mode (`for_speculation`, `jaxllm.kv_cache.deferred`; KIVI with
a residual window, dense attention) makes flushes rollback-aware: a verify chunk is
attended as one-token steps would and not written, and `rollback` then commits each
row's kept prefix into the state from before the chunk, so a group flushes only when
kept tokens push it out; any part of the chunk can be rolled back.
`check_rollback` refuses a rollback below the floor on the host; under jit the row
stays at its floor and `refused_rollback` is set (`SlotCacheMixin`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.kv_cache import deferred, hadamard
from jaxllm.kv_cache.base import (
  SlotCacheMixin,
  bf16_bytes_per_token,
  check_room,
  initial_lengths,
  insert_chunk,
  memory_report,
  no_overflow,
  no_refused_rollback,
  overflow_after,
  slice_rows,
  tree_bytes,
  update_rows,
)
from jaxllm.kv_cache.quantize import fake_quantize_asymmetric
from jaxllm.kv_cache.spec import CacheSpec
from jaxllm.quant.numerics import pack_along, quantize_asymmetric, unpack_along
from jaxllm.rope import rope_table_constants
from jaxllm.sparse_attention import MoBA
from pallas_kernels.quantized_kv_attention import QuantizedKV, dequantize_keys, dequantize_values

_TPU_BLOCK = 256  # the TPU kernel's default block_t: Tq is a multiple of it once larger


class GroupQuantizedLayer(NamedTuple):
  """One layer: quantized store, residual window [B, Hkv, Rb, D], sinks [B, Hkv, n_sink, D]."""

  store: QuantizedKV
  k_residual: jax.Array
  v_residual: jax.Array
  k_sink: jax.Array
  v_sink: jax.Array


def quantized_slots(capacity: int, group_size: int) -> int:
  """Store slots: capacity plus one spare group, in whole groups (and TPU blocks when large)."""
  slots = -(-(capacity + group_size) // group_size) * group_size
  if slots > _TPU_BLOCK:
    block = math.lcm(_TPU_BLOCK, group_size)
    slots = -(-slots // block) * block
  return slots


@flax.struct.dataclass
class GroupQuantizedKVCache(SlotCacheMixin):
  """K/V integer codes quantized a group of G tokens at a time, with the newest tokens and
  the sinks kept exact: KIVI and RotateKV (see the module docstring for the layout).

  Attributes:
    layers: one `GroupQuantizedLayer` per layer.
    length: [B] int32, tokens written in each row.
    quantized_length: [B] int32, tokens of each row in the quantized store (a multiple of G).
    start: [B] int32 first valid slot per row.
    overflow: bool scalar, set once a write went past `capacity_tokens` (see
      `SlotCacheMixin.check_overflow`).
    refused_rollback: [B] bool, set for a row once a rollback under jit asked it to go
      below its `quantized_length` (see `SlotCacheMixin`).
    capacity_tokens: static capacity (tokens); the store has extra spare slots.
    spec, config: static.
    attention: static, the attention method (`jaxllm.sparse_attention`; None: dense);
      set with `with_attention`. A sparse method attends over the dequantized store
      and the window (never the decode op); MoBA over KIVI routes by block means
      taken from the key group statistics (`block_key_means`).
    pending: speculative mode only (`for_speculation`; None otherwise): per layer the
      verify chunk's storage-form (k, v) [B, Hkv, gamma + 1, D], not yet written.
    pending_tokens: speculative mode only: [B] int32, tokens of `pending` counted in
      `length` (0 once `rollback` has committed them).
  """

  layers: tuple[GroupQuantizedLayer, ...]
  length: jax.Array
  quantized_length: jax.Array
  start: jax.Array
  overflow: jax.Array
  refused_rollback: jax.Array
  capacity_tokens: int = flax.struct.field(pytree_node=False)
  spec: CacheSpec = flax.struct.field(pytree_node=False)
  config: ModelConfig = flax.struct.field(pytree_node=False)
  attention: Any = flax.struct.field(pytree_node=False, default=None)
  pending: Any = None
  pending_tokens: Any = None

  # Logical names of every array, by its field name (`jaxllm.sharded.shard_cache`); an
  # array with fewer dims takes the leading names (per-token key scales [B, Hkv, Tq]).
  _STORE = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")
  _GROUP_SCALES = ("cache_batch", "cache_kv_heads", "cache_groups", "head_dim")
  _TOKEN_SCALES = ("cache_batch", "cache_kv_heads", "cache_length", "cache_channel_groups")
  ARRAY_AXES = {
    "k_packed": _STORE,
    "k_scale": _GROUP_SCALES,
    "k_zero": _GROUP_SCALES,
    "v_packed": _STORE,
    "v_scale": _TOKEN_SCALES,
    "v_zero": _TOKEN_SCALES,
    "k_residual": ("cache_batch", "cache_kv_heads", "cache_window", "head_dim"),
    "v_residual": ("cache_batch", "cache_kv_heads", "cache_window", "head_dim"),
    "k_sink": ("cache_batch", "cache_kv_heads", "cache_sinks", "head_dim"),
    "v_sink": ("cache_batch", "cache_kv_heads", "cache_sinks", "head_dim"),
    "pending": _STORE,
    "pending_tokens": ("cache_batch",),
    "length": ("cache_batch",),
    "quantized_length": ("cache_batch",),
    "start": ("cache_batch",),
    "overflow": (),
    "refused_rollback": ("cache_batch",),
  }

  @classmethod
  def create(
    cls, spec, config, batch, capacity, start, dtype=jnp.float32
  ) -> "GroupQuantizedKVCache":
    d, g, bits = config.head_dim, spec.group_size, spec.bits
    pf = 8 // bits
    if d % pf:
      raise ValueError(
        f"{spec.name}: head_dim {d} is not a multiple of {pf}: {bits}-bit values pack "
        f"{pf} channels per byte"
      )
    if spec.per_channel_keys and g % (8 * pf):
      raise ValueError(
        f"{spec.name}: group_size {g} must be a multiple of {8 * pf} for {bits}-bit "
        "per-channel keys (packed layout of the decode kernel)"
      )
    if g % pf:
      raise ValueError(f"{spec.name}: group_size {g} is not a multiple of {pf}")
    if d % spec.channel_groups:
      raise ValueError(
        f"{spec.name}: head_dim {d} does not split into {spec.channel_groups} value channel groups"
      )
    if g > capacity:
      raise ValueError(
        f"{spec.name}: group_size {g} is larger than the cache capacity {capacity} tokens"
      )
    if spec.kind == "rotatekv" and spec.rotate_keys:
      hadamard.hadamard(d)  # raises for a head_dim that is not a power of 2
    hkv, tq, rb = config.num_kv_heads, quantized_slots(capacity, g), spec.residual + g
    sdt = spec.scale_jnp_dtype
    if spec.per_channel_keys:
      k_store = (jnp.zeros((batch, hkv, tq // pf, d), jnp.uint8),)
      k_store += (jnp.zeros((batch, hkv, tq // g, d), sdt),) * 2
    else:
      k_store = (jnp.zeros((batch, hkv, tq, d // pf), jnp.uint8),)
      k_store += (jnp.zeros((batch, hkv, tq), sdt),) * 2
    v_store = (jnp.zeros((batch, hkv, tq, d // pf), jnp.uint8),)
    v_store += (jnp.zeros((batch, hkv, tq, *_value_groups(spec)), sdt),) * 2
    residual = jnp.zeros((batch, hkv, rb, d), dtype)
    sink = jnp.zeros((batch, hkv, spec.n_sink, d), dtype)
    layer = GroupQuantizedLayer(QuantizedKV(*k_store, *v_store), residual, residual, sink, sink)
    return cls(
      layers=tuple(layer for _ in range(config.num_layers)),
      length=initial_lengths(batch),
      quantized_length=initial_lengths(batch),
      start=start,
      overflow=no_overflow(),
      refused_rollback=no_refused_rollback(batch),
      capacity_tokens=capacity,
      spec=spec,
      config=config,
    )

  @property
  def capacity(self) -> int:
    return self.capacity_tokens

  @property
  def head_dim(self) -> int:
    return self.config.head_dim

  @property
  def residual_slots(self) -> int:
    return self.spec.residual + self.spec.group_size

  @property
  def num_sinks(self) -> int:
    return self.layers[0].k_sink.shape[2]

  # -- storage domain <-> attention domain --------------------------------------------

  def _to_storage(self, k_pre_rope, k, v):
    """Chunk [B, S, Hkv, D] -> the stored form [B, Hkv, S, D]: KIVI (k, v); RotateKV (H k_pre, H v)."""
    if self.spec.kind == "rotatekv":
      k = k_pre_rope
      if self.spec.rotate_keys:
        k, v = hadamard.rotate(k), hadamard.rotate(v)
    dtype = self.layers[0].k_residual.dtype
    return k.transpose(0, 2, 1, 3).astype(dtype), v.transpose(0, 2, 1, 3).astype(dtype)

  def _to_attention(self, k, v):
    """Stored-domain buffers [B, Hkv, T, D] (slot = index) -> post-RoPE keys and values."""
    if self.spec.kind != "rotatekv":
      return k, v
    t = k.shape[2]
    # The cos/sin table of positions 0..T-1 is a trace-time constant; each row
    # gathers its own positions from it, so no step evaluates a transcendental.
    cos_table, sin_table = rope_table_constants(t, self.config.head_dim, self.config.rope_theta)
    positions = jnp.maximum(jnp.arange(t, dtype=jnp.int32)[None] - self.start[:, None], 0)
    cos = jnp.take(cos_table, positions, axis=0)[:, None]  # [B, 1, T, D/2]
    sin = jnp.take(sin_table, positions, axis=0)[:, None]
    if self.spec.rotate_keys:
      k, v = hadamard.rotate(k), hadamard.rotate(v)
    k = k.astype(jnp.float32)
    half = k.shape[-1] // 2
    k1, k2 = k[..., :half], k[..., half:]
    k = jnp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)
    return k, v

  # -- quantization --------------------------------------------------------------------

  def _stat_mask(self, first_position, num: int) -> jax.Array:
    """[B, 1, num, 1]: of the `num` tokens from position first_position[b] ([B]), those
    that enter key statistics (not left padding, not sinks)."""
    pos = first_position[:, None] + jnp.arange(num, dtype=jnp.int32)[None]
    lo = self.start + self.num_sinks
    return (pos >= lo[:, None])[:, None, :, None]

  def _quantize_groups(self, k, v, valid):
    """k, v [B, Hkv, n*G, D] stored domain -> the store arrays of those n groups."""
    bits, g, sdt = self.spec.bits, self.spec.group_size, self.spec.scale_jnp_dtype
    search = self.spec.search_keys
    b, h, t, d = k.shape
    if self.spec.per_channel_keys:
      grouped = k.reshape(b, h, t // g, g, d)
      mask = valid.reshape(b, 1, t // g, g, 1)
      codes, k_scale, k_zero = quantize_asymmetric(grouped, bits, -2, sdt, mask, search)
      k_packed = pack_along(codes, bits, -2).reshape(b, h, t // (8 // bits), d)
      k_scale, k_zero = k_scale[..., 0, :], k_zero[..., 0, :]
    else:
      codes, k_scale, k_zero = quantize_asymmetric(k, bits, -1, sdt, None, search)
      k_packed, k_scale, k_zero = pack_along(codes, bits, -1), k_scale[..., 0], k_zero[..., 0]
    v_codes, v_scale, v_zero = _quantize_values(v, self.spec)
    return QuantizedKV(k_packed, k_scale, k_zero, v_codes, v_scale, v_zero)

  def _dequantize_store(self, store: QuantizedKV):
    """Float32 keys and values [B, Hkv, Tq, D] of the whole store (stored domain)."""
    bits = self.spec.bits
    if self.spec.per_channel_keys:
      k = dequantize_keys(store.k_packed, store.k_scale, store.k_zero, bits, self.spec.group_size)
    else:
      k = dequantize_values(store.k_packed, store.k_scale, store.k_zero, bits)
    codes = unpack_along(store.v_packed, bits, -1).astype(jnp.float32)
    slabs = codes.reshape(*codes.shape[:-1], self.spec.channel_groups, -1)
    scale, zero = (
      x.astype(jnp.float32).reshape(*slabs.shape[:-1], 1) for x in (store.v_scale, store.v_zero)
    )
    return k, (slabs * scale + zero).reshape(codes.shape)

  def _attended_residual(self, stored: GroupQuantizedLayer):
    """The window as attention reads it: exact, or quantize-dequantized when residual == 0."""
    k, v = stored.k_residual, stored.v_residual
    if self.spec.residual:
      return k, v
    bits, sdt, rb = self.spec.bits, self.spec.scale_jnp_dtype, self.residual_slots
    held = self.length - self.quantized_length
    pending = jnp.arange(rb)[None, None, :, None] < held[:, None, None, None]
    valid = pending & self._stat_mask(self.quantized_length, rb)
    key_axis = -2 if self.spec.per_channel_keys else -1
    fq_k = fake_quantize_asymmetric(k, bits, key_axis, valid, sdt, self.spec.search_keys)
    slabs = v.reshape(*v.shape[:-1], self.spec.channel_groups, -1)
    fq_v = fake_quantize_asymmetric(slabs, bits, -1, None, sdt, self.spec.search_values)
    fq_v = fq_v.reshape(v.shape)
    return fq_k.astype(k.dtype), fq_v.astype(v.dtype)

  # -- the cache interface -------------------------------------------------------------

  def attend(self, layer, q, k_pre_rope, k, v, q_slots, kernels=ops.KernelConfig()):
    """Attends q [B, S, Hq, D] over the stored tokens (as stored) and this chunk
    (exact, causal), then writes the chunk; returns (out [B, S, Hq, D], layer state).
    In speculative mode, as S one-token steps would, writing nothing (`deferred`)."""
    if self.pending is not None:
      out, chunk = deferred.attend_chunk(self, layer, q, k_pre_rope, k, v, q_slots)
      return out.astype(v.dtype), chunk
    check_room(self.length, q.shape[1], self.capacity)
    stored = self.layers[layer]
    k_st, v_st = self._to_storage(k_pre_rope, k, v)
    # One decode token over a layout the `quantized_kv_attention` op reads (per-channel
    # keys, one value scale per token) is that op; anything else is `attention` over the
    # dequantized store. Which implementation runs either op is the op table's choice.
    layout_fits_decode_op = (
      self.spec.kind == "kivi"
      and self.spec.per_channel_keys
      and self.spec.channel_groups == 1
      and q.shape[1] == 1
      and self.attention is None
    )
    if layout_fits_decode_op:
      out = self._decode_op(stored, q, k_st, v_st, kernels)
    else:
      out = self._attend_dequantized(stored, q, k, v, q_slots, kernels)
    return out.astype(v.dtype), self._write(stored, k_st, v_st)

  def _decode_op(self, stored, q, k_st, v_st, kernels):
    """One query token: the `quantized_kv_attention` op over the store and the window.

    Exact sinks ride in the op's window argument: for the c sinks of a row
    already written (c = min(n_sink, length - start)), the row's `start` moves
    past their copies in the store or the window, and their exact copies follow
    the held tokens and this one, the row's `length` extended to cover them. The
    op masks by position only, and keys are stored after RoPE, so where a slot
    sits does not matter.
    """
    k_res, v_res = self._attended_residual(stored)
    held = self.length - self.quantized_length  # [B]
    k_res = update_rows(k_res, k_st, held, 2)
    v_res = update_rows(v_res, v_st, held, 2)
    start, length = self.start, self.length + 1
    if self.num_sinks:
      pad = ((0, 0), (0, 0), (0, self.num_sinks), (0, 0))
      k_res = update_rows(jnp.pad(k_res, pad), stored.k_sink, held + 1, 2)
      v_res = update_rows(jnp.pad(v_res, pad), stored.v_sink, held + 1, 2)
      written = jnp.clip(self.length - self.start, 0, self.num_sinks)
      start, length = start + written, length + written
    out = ops.quantized_kv_attention(
      q[:, 0],
      stored.store,
      start,
      self.quantized_length,
      length,
      k_res,
      v_res,
      bits=self.spec.bits,
      group_size=self.spec.group_size,
      config=kernels,
    )
    return out[:, None]

  def _attend_dequantized(self, stored, q, k, v, q_slots, kernels):
    """Dequantized stored tokens plus the exact chunk in slot-indexed buffers, then this
    cache's attention method (dense: `ops.attention`)."""
    k_buf, v_buf = self.stored_view(stored)
    k_buf, v_buf = insert_chunk(k_buf, k, self.length), insert_chunk(v_buf, v, self.length)
    block_keys = None
    if isinstance(self.attention, MoBA) and self._routes_by_group_stats(self.attention):
      block_keys = self.block_key_means(stored, k, k_buf.shape[2], self.attention.block_size)
    return self.attend_slots(q, k_buf, v_buf, q_slots, kernels, block_keys)

  def _routes_by_group_stats(self, method: MoBA) -> bool:
    """KIVI keys (post-RoPE, per channel over groups) whose groups tile MoBA's blocks,
    no key convolution: the block means follow from the group statistics."""
    spec = self.spec
    return (
      spec.kind == "kivi"
      and spec.per_channel_keys
      and method.block_size % spec.group_size == 0
      and spec.residual % spec.group_size == 0
      and method.key_conv is None
    )

  def block_key_means(self, stored, k_chunk, num_slots: int, block: int) -> jax.Array:
    """Post-RoPE key means [B, Hkv, ceil(num_slots / block), D] (float32) per block of the
    slots attention reads (`stored_view` plus this chunk, `k_chunk` [B, S, Hkv, D] at
    `length`), for MoBA's router, without dequantizing the store.

    A quantized group's key mean per channel is zero + scale * mean(code) (the codes'
    mean: the scale and zero point are the group's); the window's and the chunk's groups
    are averaged exactly. Left padding and sinks are averaged as stored (their group
    statistics exclude them; the router only ranks blocks wholly before a query tile).
    """
    g, bits = self.spec.group_size, self.spec.bits
    packed = stored.store.k_packed  # [B, Hkv, Tq / pf, D], each group's rows packed together
    b, h, rows, d = packed.shape
    tq = rows * (8 // bits)
    by_group = packed.reshape(b, h, tq // g, g * bits // 8, d)
    code_mean = unpack_along(by_group, bits, -2).astype(jnp.float32).mean(3)
    store = (
      stored.store.k_zero.astype(jnp.float32) + stored.store.k_scale.astype(jnp.float32) * code_mean
    )  # [B, Hkv, Tq/G, D]
    s = k_chunk.shape[1]
    window = stored.k_residual.astype(jnp.float32)
    held = self.length - self.quantized_length
    pad = ((0, 0), (0, 0), (0, -(-s // g) * g), (0, 0))
    window = update_rows(jnp.pad(window, pad), k_chunk.transpose(0, 2, 1, 3), held, 2)
    window = window.reshape(b, h, window.shape[2] // g, g, d).mean(3)
    groups = -(-num_slots // block) * (block // g)
    store = jnp.pad(store, ((0, 0), (0, 0), (0, groups + window.shape[2] - tq // g), (0, 0)))
    means = update_rows(store, window, self.quantized_length // g, 2)[:, :, :groups]
    return means.reshape(b, h, groups * g // block, block // g, d).mean(3)

  def stored_view(self, stored: GroupQuantizedLayer):
    """Post-RoPE keys and values [B, Hkv, Tq + Rb, D] (float32) of the stored tokens as
    attention reads them: dequantized store, window (exact, or fake-quantized when
    residual == 0) at `quantized_length`, exact sinks at `start`; slot = index."""
    k_buf, v_buf = self._dequantize_store(stored.store)
    k_res, v_res = self._attended_residual(stored)
    pad = ((0, 0), (0, 0), (0, self.residual_slots), (0, 0))
    at = self.quantized_length
    k_buf = update_rows(jnp.pad(k_buf, pad), k_res.astype(jnp.float32), at, 2)
    v_buf = update_rows(jnp.pad(v_buf, pad), v_res.astype(jnp.float32), at, 2)
    if self.num_sinks:
      put = jax.vmap(lambda buf, sink, s: jax.lax.dynamic_update_slice(buf, sink, (0, s, 0)))
      k_buf = put(k_buf, stored.k_sink.astype(jnp.float32), self.start)
      v_buf = put(v_buf, stored.v_sink.astype(jnp.float32), self.start)
    return self._to_attention(k_buf, v_buf)

  def _write(self, stored: GroupQuantizedLayer, k_st, v_st, count=None):
    """Appends the chunk [B, Hkv, S, D] to each row's window, flushing whole groups;
    returns (new GroupQuantizedLayer, new quantized_length [B]). `count` [B]: row b
    writes only its first count[b] tokens (the rest land in slots never read; None: all)."""
    g, r = self.spec.group_size, self.spec.residual
    s = k_st.shape[2]
    written = s if count is None else count
    held = self.length - self.quantized_length  # [B]
    pad = ((0, 0), (0, 0), (0, s + g), (0, 0))
    window_k = update_rows(jnp.pad(stored.k_residual, pad), k_st, held, 2)
    window_v = update_rows(jnp.pad(stored.v_residual, pad), v_st, held, 2)
    flushed = jnp.maximum(held + written - r, 0) // g  # [B] whole groups leaving the window
    candidates = (g - 1 + s) // g
    n = candidates * g
    valid = self._stat_mask(self.quantized_length, n)
    groups = self._quantize_groups(window_k[:, :, :n], window_v[:, :, :n], valid)
    store = _put_groups(stored.store, groups, self.quantized_length, self.spec)
    size = stored.k_residual.shape[2]
    k_sink, v_sink = stored.k_sink, stored.v_sink
    if self.num_sinks:
      k_sink, v_sink = self._write_sinks(stored, k_st, v_st, count)
    new = GroupQuantizedLayer(
      store,
      slice_rows(window_k, flushed * g, size, 2),
      slice_rows(window_v, flushed * g, size, 2),
      k_sink,
      v_sink,
    )
    return new, self.quantized_length + flushed * g

  def _write_sinks(self, stored, k_st, v_st, count=None):
    """Copies chunk tokens at positions start + i (i < n_sink) into the sink buffers
    (of row b's first count[b] chunk tokens; None: all S)."""
    s = k_st.shape[2]
    pos = self.start[:, None] + jnp.arange(self.num_sinks, dtype=jnp.int32)[None]  # [B, n]
    offset = pos - self.length[:, None]
    written = s if count is None else count[:, None]
    hit = ((offset >= 0) & (offset < written))[:, None, :, None]
    idx = jnp.clip(offset, 0, s - 1)[:, None, :, None]
    k_new = jnp.take_along_axis(k_st, idx, axis=2)
    v_new = jnp.take_along_axis(v_st, idx, axis=2)
    return jnp.where(hit, k_new, stored.k_sink), jnp.where(hit, v_new, stored.v_sink)

  def advance(self, layer_states, num_tokens: int) -> "GroupQuantizedKVCache":
    if self.pending is not None:
      return deferred.advance(self, layer_states, num_tokens)
    return self.replace(
      layers=tuple(state for state, _ in layer_states),
      quantized_length=layer_states[0][1],
      length=self.length + num_tokens,
      overflow=overflow_after(self.overflow, self.length, num_tokens, self.capacity),
    )

  def for_chunked_decode(self, first: int, chunk: int) -> "GroupQuantizedKVCache":
    """This cache, if decoding `chunk` tokens per step, the first step at position
    `first`, scores exactly as one token per step does; else ValueError.

    One token per step, a token reads the window exactly until its group is
    flushed. So chunks are exact when the window is exact (residual > 0) and no
    flush falls inside a chunk: flushes happen at lengths = residual (mod G), so
    `chunk` must divide G and `first` = residual (mod chunk).
    """
    g, r, name = self.spec.group_size, self.spec.residual, self.spec.name
    if chunk == 1:
      return self
    if r == 0:
      raise ValueError(
        f"{name}: decoding {chunk} tokens per step is not exact without a residual window "
        "(the pending group is read quantized); use chunk=1"
      )
    if g % chunk or (first - r) % chunk:
      raise ValueError(
        f"{name}: decoding {chunk} tokens per step from position {first} would flush a group "
        f"inside a step: the chunk must divide group_size {g} and the first position must "
        f"equal the residual {r} modulo the chunk (e.g. prefill={r % chunk or chunk})"
      )
    return self

  def for_speculation(self, gamma: int) -> "GroupQuantizedKVCache":
    """This cache in speculative mode for verify chunks of gamma + 1 tokens: each chunk
    is attended as one-token steps would and kept pending, and `rollback` commits each
    row's kept prefix (`jaxllm.kv_cache.deferred`). ValueError for a cache without one:
    no residual window, RotateKV, a sparse attention method."""
    return deferred.for_speculation(self, gamma)

  def end_speculation(self) -> "GroupQuantizedKVCache":
    """This cache back in the normal mode, a pending verify chunk committed whole."""
    cache = self.rollback(self.length) if self.pending is not None else self
    return cache.replace(pending=None, pending_tokens=None)

  def rollback(self, length) -> "GroupQuantizedKVCache":
    """`SlotCacheMixin.rollback`; in speculative mode it first commits each row's kept
    part of the pending verify chunk (`deferred.commit`)."""
    if self.pending is not None:
      return deferred.commit(self, length)
    return SlotCacheMixin.rollback(self, length)

  def rollback_floor(self) -> jax.Array:
    """[B]: each row's `quantized_length`: quantized tokens cannot return to the window,
    so a row can roll back to no fewer tokens (`SlotCacheMixin.rollback`)."""
    return self.quantized_length

  def memory(self) -> dict:
    """Exact bytes (see `bytes_per_token`); residual_bytes = window + sinks, all layers."""
    c, spec = self.config, self.spec
    per_token = bytes_per_token(spec, c)
    itemsize = self.layers[0].k_residual.dtype.itemsize
    fixed_slots = self.residual_slots + self.num_sinks
    residual = c.num_layers * c.num_kv_heads * fixed_slots * c.head_dim * 2 * itemsize
    bf16 = bf16_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim)
    return memory_report(bf16, per_token, residual, tree_bytes(self.layers))


def bytes_per_token(spec: CacheSpec, config: ModelConfig):
  """Bytes per token over all layers: codes + scales + zero points of K and V.

  Per (token, KV head): K codes D*bits/8 and, per channel, a scale and a zero
  shared by G tokens (2*D*scale_bytes/G) or, per token, 2*scale_bytes; V codes
  D*bits/8 plus a scale and a zero per token and value channel group C
  (2*C*scale_bytes). An int when exact, else a float.
  """
  d, sb = config.head_dim, jnp.dtype(spec.scale_dtype).itemsize
  codes = Fraction(d * spec.bits, 8)
  k_params = Fraction(2 * d * sb, spec.group_size) if spec.per_channel_keys else 2 * sb
  per_head = 2 * codes + k_params + 2 * sb * spec.channel_groups
  total = per_head * config.num_layers * config.num_kv_heads
  return int(total) if total.denominator == 1 else float(total)


def _value_groups(spec: CacheSpec) -> tuple[int, ...]:
  """Trailing shape of the value scales: () for one per token, (C,) for C channel groups."""
  return () if spec.channel_groups == 1 else (spec.channel_groups,)


def _quantize_values(v, spec: CacheSpec):
  """v [..., T, D] -> (codes packed along channels, scale, zero [..., T, *_value_groups])."""
  slabs = v.reshape(*v.shape[:-1], spec.channel_groups, -1)
  codes, scale, zero = quantize_asymmetric(
    slabs, spec.bits, -1, spec.scale_jnp_dtype, None, spec.search_values
  )
  shape = v.shape[:-1] + _value_groups(spec)
  return (
    pack_along(codes.reshape(v.shape), spec.bits, -1),
    scale.reshape(shape),
    zero.reshape(shape),
  )


def _put_groups(store: QuantizedKV, groups: QuantizedKV, quantized_length, spec) -> QuantizedKV:
  """Writes the packed arrays of whole groups into the store, row b at token
  `quantized_length[b]` ([B]); every array's token axis is axis 2."""
  pf, g = 8 // spec.bits, spec.group_size
  k_code_at, k_scale_at = (
    (quantized_length // pf, quantized_length // g)
    if spec.per_channel_keys
    else (quantized_length, quantized_length)
  )
  at = (k_code_at, k_scale_at, k_scale_at, quantized_length, quantized_length, quantized_length)
  return QuantizedKV(*(update_rows(s, new, i, 2) for s, new, i in zip(store, groups, at)))
