"""KV caches: one interface, several storage formats.

Every cache is a pytree with static shapes and the same calls the model makes:
``attend(layer, q, k_pre_rope, k, v, q_slots, kernels)`` (attend over everything
cached, as stored, and causally over the chunk, then write the chunk),
``advance(layer_states, num_tokens)`` and ``rollback(length)``; plus
``check_room(num_tokens)``, ``memory()`` (exact bytes) and
``for_chunked_decode(first, chunk)`` (the cache set to decode `chunk` tokens
per step with the scores of one per step, or ValueError; see `jaxllm.streaming`).

Capacity: `check_room` raises before a write past the capacity when the length
is concrete. Under jit it is traced, so every cache carries ``overflow``, a bool
scalar set by a write past the capacity (such writes are clamped) and kept from
then on; ``check_overflow()`` raises ValueError on the host when it is set.

Methods (`METHODS`, by name):
  * dense: float K/V (`KVCache`).
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
    (`CacheSpec.smooth_alpha`): the FireQ that meets the 1% target (48 windows).
  * fireq_int4_gptq / fireq_int4_r128_s4_gptq: the same storage; each key's
    channels rounded in turn by GPTQ, with the calibration queries' second
    moment as the Hessian (`CacheSpec.key_rounding="gptq"`): less score error,
    closer logits, no better perplexity on SmolLM2.
  * kivi2_r128_s4: KIVI-2 with R=128 and the first 4 tokens of each row exact.
  * kivi2_r128_s4_ksearch: the same storage; each key scale's range (per channel
    over G tokens) is the one of least squared rounding error instead of min..max
    (`CacheSpec.search_range="keys"`). The KIVI-2 that meets the 8% target.
  * rotatekv2 / rotatekv4: KIVI storage of Hadamard-rotated pre-RoPE keys and
    rotated values, attention-sink tokens kept exact.
  * ablations: kivi2_per_token_keys, kivi2_no_residual, kivi2_r128, kivi2_s4
    (4 exact sinks), kivi2_s4_g64_v2 (key groups of 64 tokens, two value scale
    groups per token), rotatekv2_no_rotation (RotateKV-2 without the Hadamard
    rotation), kivi2_r128_s4_search (key and value ranges searched; values
    clipped hurt), kivi2_pre_rope_r128_s4[_ksearch], rotatekv2_ksearch, fireq_int4_r96_s4 (a 96-token window),
    fireq_int4_pre_rope_only, fireq_int4_post_rope_only, fireq_int4_rot
    (keys and queries Hadamard-rotated after the post-RoPE scale).

Typical use::

    spec = spec_for("kivi2")
    model, calibration = prepare_model(model, spec, calib_tokens)
    cache = create_cache(spec, model.config, batch, capacity, calibration=calibration)
    logits, cache = model(tokens, cache=cache)
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import dispatch  # noqa: F401  registers quantized_kv_attention
from jaxllm.kv_cache.dense import KVCache
from jaxllm.kv_cache.grouped import GroupedKVCache
from jaxllm.kv_cache.spec import METHODS, CacheSpec, spec_for
from jaxllm.kv_cache.symmetric import SymmetricKVCache


def prepare_model(model, spec: CacheSpec, calib_tokens=None):
  """The model to run with `spec`'s cache and its calibration.

  Args:
    model: a `jaxllm.Llama` (never modified).
    spec: the cache method.
    calib_tokens: int32 [N, L] calibration windows (FireQ only; ignored otherwise).

  Returns:
    (model, calibration): FireQ returns a copy with the pre-RoPE key scale folded
    into W_k / W_q (when enabled) and {"key_scale": [L, Hkv, D]} (post-RoPE scale,
    when enabled); other methods return the model unchanged and None.
  """
  calibrated = spec.pre_rope_scale or spec.post_rope_scale or spec.key_rounding == "gptq"
  if spec.kind != "fireq" or not calibrated:
    return model, None
  if calib_tokens is None:
    raise ValueError(f"{spec.name} needs calib_tokens (int32 [N, L]) to calibrate its key scales")
  from jaxllm.kv_cache import fireq  # imports the model module

  return fireq.calibrate(model, spec, calib_tokens)


def create_cache(
  spec: CacheSpec,
  config: ModelConfig,
  batch: int,
  capacity: int,
  dtype=jnp.float32,
  calibration=None,
  start=None,
  kernels=None,
):
  """An empty cache for `spec`.

  Args:
    spec: the method (`spec_for(name)`).
    config: the model's config.
    batch: rows.
    capacity: tokens per row (prompt + generated, left padding included).
    dtype: float dtype of dense/residual/sink storage.
    calibration: `prepare_model`'s calibration (FireQ: post-RoPE scale, GPTQ key
      rounding factors).
    start: [B] first valid slot per row (left padding); zeros by default.
    kernels: optional `ops.KernelConfig` for KIVI's decode op only (e.g.
      ``KernelConfig("pallas", interpret=True)``); default: the model's.
  """
  if batch <= 0 or capacity <= 0:
    raise ValueError(f"KV cache needs batch > 0 and capacity > 0, got {batch=}, {capacity=}")
  start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
  if spec.kind == "dense":
    return KVCache.create(config, batch, capacity, dtype, start)
  if spec.kind in ("int8", "fireq"):
    key_scale = None
    if spec.kind == "fireq" and spec.post_rope_scale:
      if calibration is None or "key_scale" not in calibration:
        raise ValueError(
          f"{spec.name} needs the post-RoPE key scale: pass prepare_model's calibration"
        )
      key_scale = calibration["key_scale"]
    # SymmetricKVCache.create refuses a "gptq" spec without its factors
    rounding = (calibration or {}).get("key_rounding") if spec.key_rounding == "gptq" else None
    return SymmetricKVCache.create(
      spec, config, batch, capacity, start, key_scale, dtype, key_rounding=rounding
    )
  return GroupedKVCache.create(spec, config, batch, capacity, start, dtype, kernels)


__all__ = [
  "METHODS",
  "CacheSpec",
  "GroupedKVCache",
  "KVCache",
  "SymmetricKVCache",
  "create_cache",
  "prepare_model",
  "spec_for",
]
