"""Token-quantized caches: INT8 (K, V, symmetric) and FireQ INT4 (K, V) with FP8 queries.

Each (token, KV head) has, for its key and for its value, one scale per channel
group (`CacheSpec.key_groups` / `channel_groups`, default 1) and, with `CacheSpec.zero_point`
(FireQ's default), one zero point per scale (asymmetric min/max: a 4-bit code
then spans the row's actual range instead of a symmetric +-amax). FireQ
adds a per-channel post-RoPE key scale ``s`` [L, Hkv, D]: keys are stored as
``k / s`` and queries multiplied by ``s`` (so q·k is unchanged), and queries
are rounded to FP8 e4m3 for the score product. FireQ's pre-RoPE scale lives in
the weights (see `jaxllm.quant.kv_calibration`), so the cache never sees it. With
`CacheSpec.rotate_keys` (an ablation), keys and queries are also rotated by a
normalized Hadamard matrix (q·k unchanged again), which spreads a token's
outlier channels over the whole row before its per-token quantization.

Exact tokens (`CacheSpec.residual` R, `CacheSpec.n_sink`, both 0 by default for
these caches): every token is quantized when written, and besides, the newest
tokens sit in a float ring buffer of ``R + ROLLBACK_SLACK`` slots (position p in
slot ``p % slots``) and the first `n_sink` tokens of each row in a sink buffer;
attention reads the R newest and the sinks exactly. The slack keeps a rollback of
up to ROLLBACK_SLACK tokens exact (the R tokens before the new length are still
in the ring); after a deeper one, the ring entries that discarded tokens
overwrote fall back to their quantized copies (the ring records which position
each slot holds). Every token keeps its codes, so a row can roll back to any
length (`rollback_floor` 0); only that exactness of the window is limited.

Lengths are per row (``length`` [B], ring positions ``recent_pos`` [B, slots]):
rows of one prompt batch move together, and part after a per-row `rollback`.

Codes: 8-bit symmetric as int8; asymmetric as uint8 in [0, 2**bits); 4-bit
symmetric as ``code + 8``; 4-bit nibbles packed two per uint8 along
channels (lane c holds channels c and c + D/2).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.kv_cache import hadamard
from jaxllm.kv_cache.base import (
  SlotCacheMixin,
  attend_two_copies,
  bf16_bytes_per_token,
  check_room,
  initial_lengths,
  insert_chunk,
  memory_report,
  no_overflow,
  no_refused_rollback,
  overflow_after,
  repeat_kv_heads,
  tree_bytes,
  update_rows,
)
from jaxllm.kv_cache.quantize import fp8_quantize_dequantize
from jaxllm.kv_cache.spec import CacheSpec
from jaxllm.quant.numerics import (
  gptq_codes,
  pack_along,
  quantize_asymmetric,
  quantize_symmetric,
  unpack_along,
)

ROLLBACK_SLACK = 32  # ring slots beyond R: rollbacks this deep keep the window exact


class TokenQuantizedLayer(NamedTuple):
  """One layer: codes [B, Hkv, T, D * bits / 8]; scales (and zero points, or None)
  [B, Hkv, T, groups] (the spec's key groups for k_*, channel groups for v_*);
  the exact ring [B, Hkv, R + ROLLBACK_SLACK (none if R = 0), D] and sinks
  [B, Hkv, n_sink, D], keys as stored (divided by the post-RoPE key scale)."""

  k_codes: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array | None
  v_codes: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array | None
  k_recent: jax.Array
  v_recent: jax.Array
  k_sink: jax.Array
  v_sink: jax.Array


def encode(x: jax.Array, spec: CacheSpec, groups: int, least_error: bool = False, rounding=None):
  """[..., D] float -> (codes [..., D * bits / 8], scale [..., groups], zero [..., groups] or None).

  Each of the `groups` equal channel sub-groups of a row gets its own scale (and
  zero point when `spec.zero_point`, then with `least_error` the range of least
  rounding error instead of min..max). `rounding`: None rounds each channel to
  its nearest code; an upper triangular [..., D, D] factor (its rows [..., D]
  broadcastable against x) rounds the row's channels by GPTQ on the same grid
  (`jaxllm.quant.numerics.gptq_codes`).
  """
  bits = spec.bits
  *lead, d = x.shape
  xg = x.reshape(*lead, groups, d // groups)
  if spec.zero_point:
    codes, scale, zero = quantize_asymmetric(xg, bits, -1, spec.scale_jnp_dtype, None, least_error)
    code_range, offset = (0, 2**bits - 1), 0
  else:
    codes, scale = quantize_symmetric(xg, bits, -1, spec.scale_jnp_dtype)
    zero, offset = None, 0 if bits == 8 else 2 ** (bits - 1)
    code_range = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
  scale, zero = scale[..., 0], None if zero is None else zero[..., 0]
  if rounding is not None:
    per_channel = lambda a: jnp.repeat(a.astype(jnp.float32), d // groups, axis=-1)
    zero_c = 0.0 if zero is None else per_channel(zero)
    codes = gptq_codes(x, per_channel(scale), zero_c, code_range, rounding)
  codes = codes.reshape(*lead, d)
  if bits == 8 and zero is None:
    return codes.astype(jnp.int8), scale, None
  return pack_along((codes + offset).astype(jnp.uint8), bits, -1), scale, zero


def decode(codes: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int) -> jax.Array:
  """Inverse of `encode` up to rounding: float32 [..., D]."""
  if codes.dtype == jnp.int8:
    values = codes.astype(jnp.float32)
  else:
    values = unpack_along(codes, bits, -1).astype(jnp.float32)
    if zero is None and bits < 8:
      values = values - 2 ** (bits - 1)
  *lead, d = values.shape
  groups = scale.shape[-1]
  values = values.reshape(*lead, groups, d // groups) * scale.astype(jnp.float32)[..., None]
  if zero is not None:
    values = values + zero.astype(jnp.float32)[..., None]
  return values.reshape(*lead, d)


@flax.struct.dataclass
class TokenQuantizedKVCache(SlotCacheMixin):
  """K/V integer codes quantized per token as each is written (a scale, and a zero point
  with `CacheSpec.zero_point`, per channel group), with optional exact newest tokens and
  sinks: INT8 and FireQ.

  Attributes:
    layers: one `TokenQuantizedLayer` per layer.
    key_scale: [L, Hkv, D] post-RoPE per-channel key scale, or None.
    key_rounding: [L, Hkv, D, D] upper triangular GPTQ factors for the keys
      (`CacheSpec.key_rounding="gptq"`, `jaxllm.quant.kv_calibration.key_rounding`), or None.
    recent_pos: [B, ring slots] int32, the position each ring entry of a row holds;
      -1 = none.
    length: [B] int32, slots written in each row.
    start: [B] int32 first valid slot per row.
    overflow: bool scalar, set once a write went past the capacity (see
      `SlotCacheMixin.check_overflow`).
    refused_rollback: [B] bool, set for a row once a rollback under jit asked it to go
      below 0 tokens (see `SlotCacheMixin`).
    spec, config: static.
    chunks_as_decode: static; a chunk of S > 1 tokens reads its own earlier
      tokens as S one-token steps would (see `for_chunked_decode`), not exactly
      as a prefill does.
    attention: static, the attention method (`jaxllm.sparse_attention`; None: dense);
      set with `with_attention`.
  """

  layers: tuple[TokenQuantizedLayer, ...]
  key_scale: jax.Array | None
  key_rounding: jax.Array | None
  recent_pos: jax.Array
  length: jax.Array
  start: jax.Array
  overflow: jax.Array
  refused_rollback: jax.Array
  spec: CacheSpec = flax.struct.field(pytree_node=False)
  config: ModelConfig = flax.struct.field(pytree_node=False)
  chunks_as_decode: bool = flax.struct.field(pytree_node=False, default=False)
  attention: Any = flax.struct.field(pytree_node=False, default=None)

  # Logical names of every array, by its field name (`jaxllm.sharded.shard_cache`).
  _CODES = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")
  _SCALES = ("cache_batch", "cache_kv_heads", "cache_length", "cache_channel_groups")
  ARRAY_AXES = {
    "k_codes": _CODES,
    "k_scale": _SCALES,
    "k_zero": _SCALES,
    "v_codes": _CODES,
    "v_scale": _SCALES,
    "v_zero": _SCALES,
    "k_recent": ("cache_batch", "cache_kv_heads", "cache_window", "head_dim"),
    "v_recent": ("cache_batch", "cache_kv_heads", "cache_window", "head_dim"),
    "k_sink": ("cache_batch", "cache_kv_heads", "cache_sinks", "head_dim"),
    "v_sink": ("cache_batch", "cache_kv_heads", "cache_sinks", "head_dim"),
    "key_scale": ("cache_layers", "cache_kv_heads", "head_dim"),
    "key_rounding": ("cache_layers", "cache_kv_heads", "head_dim", "head_dim"),
    "recent_pos": ("cache_batch", "cache_window"),
    "length": ("cache_batch",),
    "start": ("cache_batch",),
    "overflow": (),
    "refused_rollback": ("cache_batch",),
  }

  @classmethod
  def create(
    cls, spec, config, batch, capacity, start, key_scale=None, dtype=jnp.float32, key_rounding=None
  ) -> "TokenQuantizedKVCache":
    d, bits = config.head_dim, spec.bits
    if d % (8 // bits):
      raise ValueError(f"{spec.name}: head_dim {d} cannot be packed {8 // bits} codes per byte")
    if spec.rotate_keys:
      hadamard.hadamard(d)  # raises for a head_dim that is not a power of 2
    for groups in {spec.key_groups, spec.channel_groups}:
      if d % groups:
        raise ValueError(f"{spec.name}: head_dim {d} does not split into {groups} channel groups")
    if key_scale is not None and key_scale.shape != (config.num_layers, config.num_kv_heads, d):
      raise ValueError(
        f"{spec.name}: key scale shape {key_scale.shape}, expected "
        f"{(config.num_layers, config.num_kv_heads, d)}"
      )
    want = (config.num_layers, config.num_kv_heads, d, d)
    if spec.key_rounding == "gptq" and key_rounding is None:
      raise ValueError(
        f"{spec.name}: key_rounding='gptq' needs the GPTQ key rounding factors {want}: pass "
        "jaxllm.quant.kv_calibration.prepare_model's calibration"
      )
    if key_rounding is not None and key_rounding.shape != want:
      raise ValueError(f"{spec.name}: key rounding factors {key_rounding.shape}, expected {want}")
    rows = (batch, config.num_kv_heads, capacity)
    code_dtype = jnp.int8 if bits == 8 and not spec.zero_point else jnp.uint8
    codes = jnp.zeros((*rows, d * bits // 8), code_dtype)
    k_scale = jnp.zeros((*rows, spec.key_groups), spec.scale_jnp_dtype)
    v_scale = jnp.zeros((*rows, spec.channel_groups), spec.scale_jnp_dtype)
    k_zero, v_zero = (k_scale, v_scale) if spec.zero_point else (None, None)
    ring = spec.residual + ROLLBACK_SLACK if spec.residual else 0
    recent = jnp.zeros((batch, config.num_kv_heads, ring, d), dtype)
    sink = jnp.zeros((batch, config.num_kv_heads, spec.n_sink, d), dtype)
    layer = TokenQuantizedLayer(
      codes, k_scale, k_zero, codes, v_scale, v_zero, recent, recent, sink, sink
    )
    return cls(
      layers=tuple(layer for _ in range(config.num_layers)),
      key_scale=None if key_scale is None else jnp.asarray(key_scale, jnp.float32),
      key_rounding=None if key_rounding is None else jnp.asarray(key_rounding, jnp.float32),
      recent_pos=jnp.full((batch, ring), -1, jnp.int32),
      length=initial_lengths(batch),
      start=start,
      overflow=no_overflow(),
      refused_rollback=no_refused_rollback(batch),
      spec=spec,
      config=config,
    )

  @property
  def capacity(self) -> int:
    return self.layers[0].k_scale.shape[2]

  @property
  def head_dim(self) -> int:
    return self.config.head_dim

  def attend(self, layer, q, k_pre_rope, k, v, q_slots, kernels=ops.KernelConfig()):
    """Attends q [B, S, Hq, D] over the stored (quantized) tokens and this chunk
    (full precision, causal; with `chunks_as_decode`, as S one-token steps would),
    then writes the chunk; returns (out [B, S, Hq, D], layer state)."""
    del k_pre_rope
    check_room(self.length, q.shape[1], self.capacity)
    stored = self.layers[layer]
    if self.key_scale is not None:
      scale = self.key_scale[layer]  # [Hkv, D]
      k = k.astype(jnp.float32) / scale
      q = q.astype(jnp.float32) * repeat_kv_heads(scale, self.config)
    if self.spec.rotate_keys:  # q·k is unchanged: the rotation is orthogonal
      k, q = hadamard.rotate(k), hadamard.rotate(q)
    if self.spec.fp8_queries:
      q = fp8_quantize_dequantize(q)

    def write(codes_buf, scale_buf, zero_buf, x, search, rounding=None):
      groups = scale_buf.shape[-1]
      codes, scale, zero = encode(x.transpose(0, 2, 1, 3), self.spec, groups, search, rounding)
      at = self.length
      zero_buf = None if zero is None else update_rows(zero_buf, zero, at, 2)
      return update_rows(codes_buf, codes, at, 2), update_rows(scale_buf, scale, at, 2), zero_buf

    rounding = None if self.key_rounding is None else self.key_rounding[layer][:, None]
    new = TokenQuantizedLayer(
      *write(stored.k_codes, stored.k_scale, stored.k_zero, k, self.spec.search_keys, rounding),
      *write(stored.v_codes, stored.v_scale, stored.v_zero, v, self.spec.search_values),
      *self._write_exact(stored, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)),
    )
    if self.chunks_as_decode and q.shape[1] > 1:
      out = self._attend_as_decoded(stored, new, q, k, v, q_slots)
    else:
      k_buf, v_buf = self.stored_view(stored)
      k_buf, v_buf = insert_chunk(k_buf, k, self.length), insert_chunk(v_buf, v, self.length)
      out = self.attend_slots(q.astype(jnp.float32), k_buf, v_buf, q_slots, kernels)
    return out.astype(v.dtype), new

  def _attend_as_decoded(self, stored, new, q, k, v, q_slots):
    """The chunk attended as that many one-token steps would: query i reads the
    chunk's earlier tokens as stored (exact only among the R newest before it,
    and the sinks) and itself exact."""
    s = q.shape[1]
    quantized = self._dequantized(new, self.length + s)
    k_exact, v_exact = self.stored_view(stored)  # exact at the R newest slots before the chunk
    k_exact, v_exact = insert_chunk(k_exact, k, self.length), insert_chunk(v_exact, v, self.length)
    t = jnp.arange(self.capacity, dtype=jnp.int32)[None, None]
    use_exact = (t >= q_slots[:, :, None] - self.spec.residual) & (t <= q_slots[:, :, None])
    return attend_two_copies(q, quantized, (k_exact, v_exact), use_exact, q_slots, self.start)

  def for_chunked_decode(self, first: int, chunk: int) -> "TokenQuantizedKVCache":
    """This cache with chunks of more than one token attended as one-token steps
    would read them (`_attend_as_decoded`), so any chunk scores exactly. With a sparse
    attention method only one token per step (ValueError otherwise)."""
    del first
    if self.attention is not None and chunk > 1:
      raise ValueError(
        f"{self.name}: decoding {chunk} tokens per step reads the chunk as stored with dense "
        f"attention only; with {self.attention.name} use chunk=1"
      )
    return self.replace(chunks_as_decode=True)

  def for_speculation(self, gamma: int) -> "TokenQuantizedKVCache":
    """This cache for speculative verify chunks of gamma + 1 tokens: attended as one-token
    steps would (`chunks_as_decode`). Every token's codes depend on that token only and
    rollback only moves `length`, so written chunks need no deferred commit; the exact
    ring stays exact through rollbacks of up to ROLLBACK_SLACK tokens, so with a residual
    window gamma is limited to that. ValueError for a deeper gamma or a sparse attention
    method."""
    if self.spec.residual and gamma > ROLLBACK_SLACK:
      raise ValueError(
        f"{self.name}: gamma={gamma} is deeper than the exact ring stays exact through "
        f"rollbacks (ROLLBACK_SLACK={ROLLBACK_SLACK}); use gamma <= {ROLLBACK_SLACK}"
      )
    return self.for_chunked_decode(0, gamma + 1)

  def end_speculation(self) -> "TokenQuantizedKVCache":
    """This cache back in the normal mode (chunks attended as a prefill does)."""
    return self.replace(chunks_as_decode=False)

  def stored_view(self, stored: TokenQuantizedLayer):
    """Keys and values [B, Hkv, T, D] (float32, keys divided by the post-RoPE scale)
    as attention reads them: dequantized codes, with the R newest slots and the
    sinks replaced by their exact copies; slot = index, slots >= length unspecified."""
    k_buf, v_buf = self._dequantized(stored, self.length)
    t = jnp.arange(self.capacity, dtype=jnp.int32)
    window = self.spec.residual
    if window:
      ring = t % self.recent_pos.shape[1]
      length = self.length[:, None]
      newest = (t[None] >= length - window) & (t[None] < length)  # [B, T]
      use = ((self.recent_pos[:, ring] == t[None]) & newest)[:, None, :, None]
      k_buf = jnp.where(use, stored.k_recent[:, :, ring].astype(jnp.float32), k_buf)
      v_buf = jnp.where(use, stored.v_recent[:, :, ring].astype(jnp.float32), v_buf)
    return k_buf, v_buf

  def _dequantized(self, stored: TokenQuantizedLayer, length):
    """Keys and values [B, Hkv, T, D] (float32) from the codes, the sinks written
    before slot `length[b]` ([B]) replaced by their exact copies."""
    bits, n = self.spec.bits, self.spec.n_sink
    k_buf = decode(stored.k_codes, stored.k_scale, stored.k_zero, bits)
    v_buf = decode(stored.v_codes, stored.v_scale, stored.v_zero, bits)
    if n:
      t = jnp.arange(self.capacity, dtype=jnp.int32)
      rel = t[None] - self.start[:, None]  # [B, T]
      use = ((rel >= 0) & (rel < n) & (t[None] < length[:, None]))[:, None, :, None]
      idx = jnp.clip(rel, 0, n - 1)[:, None, :, None]
      k_sink = jnp.take_along_axis(stored.k_sink, idx, axis=2).astype(jnp.float32)
      v_sink = jnp.take_along_axis(stored.v_sink, idx, axis=2).astype(jnp.float32)
      k_buf, v_buf = jnp.where(use, k_sink, k_buf), jnp.where(use, v_sink, v_buf)
    return k_buf, v_buf

  def _write_exact(self, stored: TokenQuantizedLayer, k_st, v_st):
    """New (k_recent, v_recent, k_sink, v_sink) with the chunk [B, Hkv, S, D] (row b's
    slots length[b] .. length[b] + S - 1) written: its newest tokens into the ring, and
    the tokens at start + i (i < n_sink) into the sinks."""
    s = k_st.shape[2]
    slots, n = self.recent_pos.shape[1], self.spec.n_sink
    k_recent, v_recent = stored.k_recent, stored.v_recent
    if slots:
      length = self.length[:, None]
      pos = length + jnp.arange(s, dtype=jnp.int32)[None]  # [B, S]
      # tokens older than the newest `slots` of the chunk go to index `slots`: dropped
      ring = jnp.where(pos >= length + s - slots, pos % slots, slots)
      put = jax.vmap(lambda buf, new, idx: buf.at[:, idx].set(new, mode="drop"))
      k_recent = put(k_recent, k_st.astype(k_recent.dtype), ring)
      v_recent = put(v_recent, v_st.astype(v_recent.dtype), ring)
    k_sink, v_sink = stored.k_sink, stored.v_sink
    if n:
      offset = self.start[:, None] + jnp.arange(n, dtype=jnp.int32)[None] - self.length[:, None]
      hit = ((offset >= 0) & (offset < s))[:, None, :, None]
      idx = jnp.clip(offset, 0, s - 1)[:, None, :, None]
      k_new = jnp.take_along_axis(k_st, idx, axis=2).astype(k_sink.dtype)
      v_new = jnp.take_along_axis(v_st, idx, axis=2).astype(v_sink.dtype)
      k_sink, v_sink = jnp.where(hit, k_new, k_sink), jnp.where(hit, v_new, v_sink)
    return k_recent, v_recent, k_sink, v_sink

  def advance(self, layer_states, num_tokens: int) -> "TokenQuantizedKVCache":
    recent_pos = self.recent_pos
    slots = recent_pos.shape[1]
    if slots:
      length = self.length[:, None]
      last = length + num_tokens - 1
      entry = jnp.arange(slots, dtype=jnp.int32)[None]
      newest = last - (last - entry) % slots  # [B, slots] newest position written to each entry
      recent_pos = jnp.where(newest >= length, newest, recent_pos)
    return self.replace(
      layers=tuple(layer_states),
      recent_pos=recent_pos,
      length=self.length + num_tokens,
      overflow=overflow_after(self.overflow, self.length, num_tokens, self.capacity),
    )

  def memory(self) -> dict:
    """Exact bytes: per token and KV head, for K and V each: D*bits/8 code bytes
    + one scale (and one zero point with `zero_point`) per channel group;
    residual_bytes: the exact recent ring and sinks, all layers, per row."""
    c, spec = self.config, self.spec
    scale_bytes = jnp.dtype(spec.scale_dtype).itemsize * (2 if spec.zero_point else 1)
    groups = spec.key_groups + spec.channel_groups
    per_head = 2 * c.head_dim * spec.bits // 8 + groups * scale_bytes
    bf16 = bf16_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim)
    total = tree_bytes((self.layers, self.key_scale, self.key_rounding))
    exact = self.layers[0].k_recent
    slots = self.recent_pos.shape[1] + spec.n_sink
    residual = c.num_layers * c.num_kv_heads * slots * c.head_dim * 2 * exact.dtype.itemsize
    return memory_report(bf16, c.num_layers * c.num_kv_heads * per_head, residual, total)
