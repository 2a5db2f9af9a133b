"""KV caches: one interface, several storage formats.

Every cache is a pytree with static shapes and the same calls the model makes:
``attend(layer, q, k_pre_rope, k, v, q_slots, kernels)`` (attend over everything
cached, as stored, and causally over the chunk, then write the chunk),
``advance(layer_states, num_tokens)`` and ``rollback(length)``; plus
``check_room(num_tokens)``, ``check_rollback(length)``, ``memory()`` (exact bytes)
and ``for_chunked_decode(first, chunk)`` (the cache set to decode `chunk` tokens
per step with the scores of one per step, or ValueError; see `jaxllm.streaming`).

Lengths are per row: ``length`` (and ``quantized_length`` where tokens are quantized
a group at a time) is int32 [B]; row b's next chunk is written from slot
``length[b]``. A batch of left-padded prompts keeps every row at the same length;
``rollback(length)`` takes a scalar (every row) or [B] (one length per row), so
rows can part (speculative decoding's rejected tails, continuous batching).

Rollback limits: a row can roll back to no fewer than ``rollback_floor()[b]``
tokens (0, or the tokens a group-quantized cache has already quantized).
``check_rollback(length)`` is the host-side check (raises ValueError naming the
cache, row, requested length and floor); ``rollback`` runs it itself on concrete
(eager) input. Under jit nothing raises: the row is held at its floor and its
``refused_rollback`` flag set, which ``check_overflow()`` reports on the host.

Capacity: `check_room` raises before a write past the capacity when the length
is concrete. Under jit it is traced, so every cache carries ``overflow``, a bool
scalar set by a write past the capacity (such writes are clamped) and kept from
then on; ``check_overflow()`` raises ValueError on the host when it (or a
``refused_rollback`` flag) is set.

Three cache classes, named by what they store: `DenseKVCache` (float K/V),
`TokenQuantizedKVCache` (integer codes per token as it is written: int8, FireQ) and
`GroupQuantizedKVCache` (integer codes a group of tokens at a time, beside an exact
window of the newest tokens: KIVI, RotateKV). `create_cache` picks the class for a spec.

Presets (`CACHE_PRESETS`, by name; the runners' `--methods`; measured in docs/results.md):
  * dense: float K/V.
  * int8: K and V int8, symmetric, one scale per (token, KV head).
  * fireq_int4: FireQ: pre-RoPE pair-shared key scale folded into W_k / W_q,
    post-RoPE per-channel key scale, K/V INT4 per token (asymmetric, scale and
    zero point), FP8 e4m3 queries.
  * kivi4 / kivi2: KIVI: keys per channel in groups of G tokens, values per
    token, asymmetric, full-precision residual window; decode runs the
    ``quantized_kv_attention`` op (Pallas kernel / fused XLA / reference).
  * fireq_int4_r128_s4: FireQ's codes, plus the 128 newest tokens (KIVI's R)
    and the first 4 of each row read exactly (from float buffers beside the codes).
  * fireq_int4_r128_s4_a09: the same with smoothing strength 0.9 instead of 1
    (`CacheSpec.smooth_alpha`): `experiments.kv_compression`'s FireQ row.
  * fireq_int4_gptq / fireq_int4_r128_s4_gptq: the same storage; each key's
    channels rounded in turn by GPTQ, with the calibration queries' second
    moment as the Hessian (`CacheSpec.key_rounding="gptq"`): less score error,
    closer logits, no better perplexity on SmolLM2.
  * kivi2_r128_s4: KIVI-2 with R=128 and the first 4 tokens of each row exact.
  * kivi2_r128_s4_ksearch: the same storage; each key scale's range (per channel
    over G tokens) is the one of least squared rounding error instead of min..max
    (`CacheSpec.search_range="keys"`): `experiments.kv_compression`'s KIVI-2 row.
  * rotatekv2 / rotatekv4: KIVI storage of Hadamard-rotated pre-RoPE keys and
    rotated values, attention-sink tokens kept exact.
  * ablations: kivi2_per_token_keys, kivi2_no_residual, kivi2_r128, kivi2_s4
    (4 exact sinks), kivi2_s4_g64_v2 (key groups of 64 tokens, two value scale
    groups per token), rotatekv2_no_rotation (RotateKV-2 without the Hadamard
    rotation), kivi2_r128_s4_search (key and value ranges searched; values
    clipped hurt), kivi2_pre_rope_r128_s4[_ksearch], rotatekv2_ksearch,
    fireq_int4_r96_s4 (a 96-token window), fireq_int4_pre_rope_only,
    fireq_int4_post_rope_only, fireq_int4_rot
    (keys and queries Hadamard-rotated after the post-RoPE scale).

Typical use::

    from jaxllm.quant.kv_calibration import prepare_model

    spec = spec_for("kivi2")
    model, calibration = prepare_model(model, spec, calib_tokens)
    cache = create_cache(spec, model.config, batch, capacity, calibration=calibration)
    logits, cache = model(tokens, cache=cache)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache.dense import DenseKVCache, KVCache
from jaxllm.kv_cache.group_quantized import GroupQuantizedKVCache
from jaxllm.kv_cache.spec import CACHE_PRESETS, CacheSpec, spec_for
from jaxllm.kv_cache.token_quantized import TokenQuantizedKVCache


def create_cache(
  spec: CacheSpec,
  config: ModelConfig,
  batch: int,
  capacity: int,
  dtype=jnp.float32,
  calibration=None,
  start=None,
  attention=None,
):
  """An empty cache for `spec`.

  Args:
    spec: the cache spec (`spec_for(name)`).
    config: the model's config.
    batch: rows.
    capacity: tokens per row (prompt + generated, left padding included).
    dtype: float dtype of dense/residual/sink storage.
    calibration: `jaxllm.quant.kv_calibration.prepare_model`'s calibration (FireQ:
      post-RoPE scale, GPTQ key rounding factors).
    start: [B] first valid slot per row (left padding); zeros by default.
    attention: the cache's attention method (`jaxllm.sparse_attention.MoBA` / `SparQ`;
      None: dense), see `with_attention`.
  """
  cache = _create(spec, config, batch, capacity, dtype, calibration, start)
  return cache if attention is None else cache.with_attention(attention)


def _create(spec, config, batch, capacity, dtype, calibration, start):
  if batch <= 0 or capacity <= 0:
    raise ValueError(f"KV cache needs batch > 0 and capacity > 0, got {batch=}, {capacity=}")
  start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
  if spec.kind == "dense":
    return DenseKVCache.create(config, batch, capacity, dtype, start)
  if spec.kind in ("int8", "fireq"):
    key_scale = None
    if spec.kind == "fireq" and spec.post_rope_scale:
      if calibration is None or "key_scale" not in calibration:
        raise ValueError(
          f"{spec.name} needs the post-RoPE key scale: pass "
          "jaxllm.quant.kv_calibration.prepare_model's calibration"
        )
      key_scale = calibration["key_scale"]
    # TokenQuantizedKVCache.create refuses a "gptq" spec without its factors
    rounding = (calibration or {}).get("key_rounding") if spec.key_rounding == "gptq" else None
    return TokenQuantizedKVCache.create(
      spec, config, batch, capacity, start, key_scale, dtype, key_rounding=rounding
    )
  return GroupQuantizedKVCache.create(spec, config, batch, capacity, start, dtype)


def key_value_bytes(spec: CacheSpec, config: ModelConfig) -> tuple[float, float]:
  """(key, value) bytes one token takes per KV head in `spec`'s stored format: codes plus
  scales and zero points (amortized over a group where a group shares them); dense: bf16.
  Exact windows and sinks are left out (a fixed cost per sequence)."""
  d = config.head_dim
  if spec.kind == "dense":
    return 2.0 * d, 2.0 * d
  sb = jnp.dtype(spec.scale_dtype).itemsize
  codes = d * spec.bits / 8
  if spec.kind in ("int8", "fireq"):
    params = sb * (2 if spec.zero_point else 1)
    return codes + spec.key_groups * params, codes + spec.channel_groups * params
  keys = 2 * d * sb / spec.group_size if spec.per_channel_keys else 2 * sb
  return codes + keys, codes + 2 * sb * spec.channel_groups


# How `jaxllm.decoding.Generator` and `jaxllm.streaming.StreamingScorer` get their
# caches: ``make_cache(batch, capacity, start)`` -> an empty cache (any type here),
# `start` being int32 [batch], each row's first valid slot (its left padding).
# `cache_factory` builds one from a spec.
CacheFactory = Callable[[int, int, jax.Array], Any]


def cache_factory(
  spec: CacheSpec | str, config: ModelConfig, dtype=jnp.float32, calibration=None, attention=None
) -> CacheFactory:
  """The `CacheFactory` of `spec`'s caches (`create_cache` with these arguments).

  Args:
    spec: a `CacheSpec`, or a preset name in `CACHE_PRESETS`.
    config: the model's config.
    dtype: float dtype of dense/residual/sink storage (the model's activation dtype).
    calibration: `jaxllm.quant.kv_calibration.prepare_model`'s calibration.
    attention: the caches' attention method (`jaxllm.sparse_attention`; None: dense).

  Raises ValueError here, not at the first cache: for an unknown preset name, and
  for what `create_cache` refuses at any capacity (a FireQ spec without its
  calibration, a head_dim the format cannot pack). One cache of one row and the
  model's max_seq_len tokens is built in shape only (`jax.eval_shape`) to check.
  """
  if isinstance(spec, str):
    spec = spec_for(spec)
  elif not isinstance(spec, CacheSpec):
    raise TypeError(f"cache_factory: spec must be a CacheSpec or a preset name, got {spec!r}")

  def make_cache(batch: int, capacity: int, start: jax.Array) -> Any:
    return create_cache(spec, config, batch, capacity, dtype, calibration, start, attention)

  jax.eval_shape(lambda: make_cache(1, config.max_seq_len, jnp.zeros((1,), jnp.int32)))
  return make_cache


def check_cache_factory(make_cache, owner: str) -> None:
  """Raises TypeError, naming `owner`, unless `make_cache` can be called as a
  `CacheFactory`: ``make_cache(batch, capacity, start)``."""
  if not callable(make_cache):
    raise TypeError(f"{owner}: make_cache must be callable, got {type(make_cache).__name__}")
  try:
    signature = inspect.signature(make_cache)
  except (TypeError, ValueError):  # no signature to read (some builtins): trust the call
    return
  try:
    signature.bind(1, 1, None)
  except TypeError as e:
    raise TypeError(
      f"{owner}: make_cache{signature} cannot be called as make_cache(batch, capacity, start) "
      f"({e}); build one with jaxllm.kv_cache.cache_factory(spec, config, dtype, calibration)"
    ) from None


__all__ = [
  "CACHE_PRESETS",
  "CacheFactory",
  "CacheSpec",
  "DenseKVCache",
  "GroupQuantizedKVCache",
  "KVCache",
  "TokenQuantizedKVCache",
  "cache_factory",
  "check_cache_factory",
  "create_cache",
  "key_value_bytes",
  "spec_for",
]
