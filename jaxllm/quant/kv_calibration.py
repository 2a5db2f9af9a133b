"""KV-cache calibration (FireQ's RoPE-aware key scales, GPTQ key rounding) and the
model a cache method runs with (`prepare_model`).

FireQ's two per-channel key scales are both SmoothQuant-style
``s = amax_k**a / amax_q**(1-a)`` (a = `CacheSpec.smooth_alpha`; ``amax_q`` is the
max over the query heads that share the KV head) and rounded to powers of 2, so
dividing keys and multiplying queries by them is exact in floating point:

* pre-RoPE [L, Hkv, D], equal on every RoPE pair (i, i + D/2): RoPE rotates
  each pair, so a pair-shared scale commutes with it. Folded into the weights:
  W_k / s and W_q * s, which leaves every q·k (and the logits) unchanged.
* post-RoPE [L, Hkv, D], any per-channel value: applied by the cache at write
  time (keys / s) and multiplied into the queries at attention.

With both scales, the post-RoPE one only corrects the residual imbalance
*within* each RoPE pair (see `calibrate`): a full per-channel post-RoPE smoothing
scale calibrated on the folded model would absorb the pre-RoPE one (a
pair-shared scale commutes with RoPE), and "both" would store the same keys as
"post-RoPE only".

The caches (`jaxllm.kv_cache`) take the result as `create_cache(..., calibration=...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import ops
from jaxllm.kv_cache.spec import CacheSpec
from jaxllm.model import Llama
from jaxllm.quant.numerics import inverse_hessian_factor
from jaxllm.rope import apply_rope, rope_tables

_EPS = 1e-6


def _check_calib(calib_tokens) -> np.ndarray:
  calib_tokens = np.asarray(calib_tokens, np.int32)
  if calib_tokens.ndim != 2 or calib_tokens.shape[0] == 0 or calib_tokens.shape[1] == 0:
    raise ValueError(
      f"calib_tokens must be a non-empty int32 [N, L] array, got {calib_tokens.shape}"
    )
  return calib_tokens


def _per_window(model: Llama, reduce):
  """A jitted fn(state, tokens [1, L]) of `reduce(acts)`, where acts maps
  "k_pre_rope", "k", "q_pre_rope", "q" to per-layer lists of [1, L, H, D]."""
  graphdef, _ = nnx.split(model)

  @jax.jit
  def window(state, tokens):
    m = nnx.merge(graphdef, state)
    taps = {}
    m(tokens, logits_at="last", taps=taps)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    cos, sin = rope_tables(positions, m.config.head_dim, m.config.rope_theta)
    acts = {"k_pre_rope": [], "k": [], "q_pre_rope": [], "q": []}
    for i, layer in enumerate(m.layers):
      q_pre = ops.linear(taps[f"{i}.attn_in"], layer.attn.q.get_value(), m.kernels)
      acts["k_pre_rope"].append(taps[f"{i}.k_pre_rope"])
      acts["k"].append(taps[f"{i}.k"])
      acts["q_pre_rope"].append(q_pre)
      acts["q"].append(apply_rope(q_pre, cos, sin))
    return reduce(acts)

  return window


def activation_amax(model: Llama, calib_tokens) -> dict[str, np.ndarray]:
  """Per-channel |max| over calibration windows (one window per forward).

  Args:
    model: the model to observe.
    calib_tokens: int32 [N, L] token windows (RoPE positions 0..L-1).

  Returns:
    {"k_pre_rope", "k": [layers, Hkv, D], "q_pre_rope", "q": [layers, Hq, D]} float32.
  """
  calib_tokens = _check_calib(calib_tokens)

  def amax(acts):
    return {
      name: jnp.stack([jnp.abs(x.astype(jnp.float32)).max(axis=(0, 1)) for x in xs])
      for name, xs in acts.items()
    }

  window_amax, state = _per_window(model, amax), nnx.state(model)
  out = None
  for window in calib_tokens:
    got = jax.device_get(window_amax(state, window[None]))
    out = got if out is None else jax.tree.map(np.maximum, out, got)
  return out


def query_hessian(model: Llama, calib_tokens, key_scale=None) -> np.ndarray:
  """Second moment of the post-RoPE queries as the cache multiplies them, per KV head.

  Args:
    model: the model (pre-RoPE scale folded in, if any).
    calib_tokens: int32 [N, L] token windows.
    key_scale: optional post-RoPE key scale [layers, Hkv, D]; queries are multiplied
      by it, as the cache does.

  Returns:
    float64 [layers, Hkv, D, D]: the mean of q q^T over the calibration tokens and
    the query heads that read each KV head, so that a key error e moves the
    scores by ``e^T H e`` in mean square.
  """
  calib_tokens = _check_calib(calib_tokens)
  cfg = model.config
  scale = np.ones((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), np.float32)
  scale = jnp.asarray(scale if key_scale is None else key_scale, jnp.float32)

  def second_moment(acts):
    out = []
    for i, q in enumerate(acts["q"]):
      q = q.astype(jnp.float32)
      q = q.reshape(-1, cfg.num_kv_heads, cfg.queries_per_kv_head, cfg.head_dim)
      q = q * scale[i][None, :, None]
      out.append(jnp.einsum("thgd,thge->hde", q, q, precision="highest"))
    return jnp.stack(out)

  window_moment, state = _per_window(model, second_moment), nnx.state(model)
  total = sum(np.asarray(window_moment(state, w[None]), np.float64) for w in calib_tokens)
  return total / (calib_tokens.size * cfg.queries_per_kv_head)


def key_rounding(hessian, damp: float = 0.01) -> np.ndarray:
  """GPTQ factors [..., D, D] for `encode`, one per Hessian [..., D, D]: the upper
  Cholesky factor u of ``(H + damp * mean(diag H) * I)^-1 = u^T u``, as weight GPTQ
  takes it (`jaxllm.quant.numerics.inverse_hessian_factor`)."""
  h = jnp.asarray(hessian, jnp.float32)
  d = h.shape[-1]
  factor = jax.vmap(lambda one: inverse_hessian_factor(one, d, damp))
  return np.asarray(factor(h.reshape(-1, d, d))).reshape(h.shape)


def smooth_scale(k_amax, q_amax, alpha: float, pair_shared: bool) -> np.ndarray:
  """Power-of-2 per-channel key scale [layers, Hkv, D].

  Args:
    k_amax: [layers, Hkv, D] key |max| per channel.
    q_amax: [layers, Hq, D] query |max| per channel.
    alpha: migration strength (1: equalize keys fully; 0: no key smoothing).
    pair_shared: take one value per RoPE pair (i, i + D/2).
  """
  k_amax, q_amax = np.asarray(k_amax, np.float32), np.asarray(q_amax, np.float32)
  layers, hkv, d = k_amax.shape
  q_kv = q_amax.reshape(layers, hkv, -1, d).max(axis=2)
  if pair_shared:
    half = d // 2
    k_amax = np.tile(np.maximum(k_amax[..., :half], k_amax[..., half:]), 2)
    q_kv = np.tile(np.maximum(q_kv[..., :half], q_kv[..., half:]), 2)
  s = np.maximum(k_amax, _EPS) ** alpha / np.maximum(q_kv, _EPS) ** (1.0 - alpha)
  return np.exp2(np.round(np.log2(s))).astype(np.float32)


def fold_pre_rope_key_scale(model: Llama, scale) -> Llama:
  """A copy of `model` with W_k[:, h, c] / s[h, c] and W_q[:, j, c] * s[kv(j), c] per layer.

  Args:
    model: float-weight Llama (not modified).
    scale: [layers, Hkv, D], equal on RoPE pairs (checked), so q·k after RoPE is unchanged.
  """
  scale = np.asarray(scale, np.float32)
  cfg = model.config
  want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
  if scale.shape != want:
    raise ValueError(f"pre-RoPE key scale has shape {scale.shape}, expected {want}")
  half = cfg.head_dim // 2
  if not np.array_equal(scale[..., :half], scale[..., half:]):
    raise ValueError("a pre-RoPE key scale must be equal on each RoPE pair (i, i + D/2)")
  folded = nnx.clone(model)
  for i, layer in enumerate(folded.layers):
    w_k, w_q = layer.attn.k.get_value(), layer.attn.q.get_value()
    if not (isinstance(w_k, jax.Array) and isinstance(w_q, jax.Array)):
      raise ValueError("FireQ folds its pre-RoPE scale into float W_k/W_q; quantize weights after")
    s = jnp.asarray(scale[i])  # [Hkv, D]
    layer.attn.k.set_value((w_k.astype(jnp.float32) / s).astype(w_k.dtype))
    s_q = jnp.repeat(s, cfg.queries_per_kv_head, axis=0)  # [Hq, D]
    layer.attn.q.set_value((w_q.astype(jnp.float32) * s_q).astype(w_q.dtype))
  return folded


def pair_residual(k_amax) -> np.ndarray:
  """Power-of-2 within-pair residual scale [layers, Hkv, D]: each channel's |max|
  over the larger |max| of its RoPE pair (i, i + D/2), so in (0, 1] and 1 on the
  larger channel of every pair.

  Args:
    k_amax: [layers, Hkv, D] post-RoPE key |max| per channel (of the folded model).
  """
  k_amax = np.maximum(np.asarray(k_amax, np.float32), _EPS)
  half = k_amax.shape[-1] // 2
  pair = np.tile(np.maximum(k_amax[..., :half], k_amax[..., half:]), 2)
  return np.exp2(np.round(np.log2(k_amax / pair))).astype(np.float32)


def calibrate(model: Llama, spec: CacheSpec, calib_tokens):
  """FireQ calibration.

  Three genuinely different configurations:

  * pre-RoPE only: the pair-shared smoothing scale of the pre-RoPE keys/queries
    is folded into W_k / W_q; the cache stores those keys with no further scale.
  * post-RoPE only: a per-channel smoothing scale calibrated on the *un-folded*
    model's post-RoPE keys/queries, applied by the cache.
  * both: the pre-RoPE scale (folded) does the pair-shared part, measured before
    RoPE mixes the two channels of a pair; the post-RoPE scale does only the
    residual per-channel part within each pair (`pair_residual` of the folded
    model's post-RoPE keys, <= 1). The per-pair magnitude then comes from the
    pre-RoPE statistics, not the post-RoPE ones as in "post-RoPE only".

  With `CacheSpec.key_rounding="gptq"`, the calibration also holds
  "key_rounding": `key_rounding(query_hessian(...))` of the folded model's queries.

  Returns:
    (model with the pre-RoPE scale folded in, or the caller's model;
    {"key_scale": post-RoPE scale [L, Hkv, D], "key_rounding": [L, Hkv, D, D]},
    with only the entries enabled, or None).
  """
  amax = activation_amax(model, calib_tokens)
  if spec.pre_rope_scale:
    pre = smooth_scale(amax["k_pre_rope"], amax["q_pre_rope"], spec.smooth_alpha, True)
    model = fold_pre_rope_key_scale(model, pre)
  calibration = None
  if spec.post_rope_scale:
    if spec.pre_rope_scale:
      post = pair_residual(activation_amax(model, calib_tokens)["k"])
    else:
      post = smooth_scale(amax["k"], amax["q"], spec.smooth_alpha, False)
    calibration = {"key_scale": jnp.asarray(post)}
  if spec.key_rounding == "gptq":
    scale = None if calibration is None else calibration["key_scale"]
    hessian = query_hessian(model, calib_tokens, scale)
    calibration = {**(calibration or {}), "key_rounding": jnp.asarray(key_rounding(hessian))}
  return model, calibration


def prepare_model(model: Llama, spec: CacheSpec, calib_tokens=None):
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
  return calibrate(model, spec, calib_tokens)
