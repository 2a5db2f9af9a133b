"""Cache method specifications: one frozen `CacheSpec` per named method."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

KINDS = ("dense", "int8", "fireq", "kivi", "rotatekv")
SUPPORTED_BITS = (2, 4, 8)
SEARCH_RANGES = ("none", "keys", "values", "both")
KEY_ROUNDINGS = ("nearest", "gptq")
_KIND_BITS = {"int8": (8,), "fireq": (4, 8), "kivi": SUPPORTED_BITS, "rotatekv": SUPPORTED_BITS}


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """How a KV cache stores keys and values.

  Attributes:
    name: method name (a key of `METHODS`).
    kind: storage family, one of KINDS.
    bits: code width for K and V (2, 4 or 8; ignored by "dense").
    group_size: KIVI/RotateKV key quantization group, in tokens.
    residual: the `residual` most recent tokens are always kept in full
      precision (once that many exist). KIVI/RotateKV: the window buffer holds
      `residual + group_size` slots; 0 = no residual window: the pending partial
      group is still staged in a `group_size`-slot buffer (per-channel stats need
      the whole group), but attention only ever sees it quantize-dequantized.
      int8/FireQ: an R-slot float ring beside the per-token codes.
    per_channel_keys: KIVI keys per channel over token groups (True) or per
      token like values (False, an ablation).
    n_sink: the first `n_sink` tokens of every row are kept in full precision
      (attention sinks); RotateKV also leaves them out of its key statistics.
    pre_rope_scale: FireQ: fold a pair-shared per-channel pre-RoPE key scale
      into W_k / W_q.
    post_rope_scale: FireQ: apply a per-channel post-RoPE key scale at write time.
    rotate_keys: int8/FireQ: rotate keys (after the post-RoPE scale) and queries
      by a normalized Hadamard matrix before quantizing (needs a power-of-2 head_dim);
      RotateKV: rotate pre-RoPE keys and values (False: the no-rotation ablation,
      KIVI's codes taken before RoPE).
    fp8_queries: FireQ: queries quantized to FP8 e4m3 (per token and head).
    smooth_alpha: FireQ: scale = amax_k**alpha / amax_q**(1 - alpha). Default 1:
      the query is FP8 (floating point, so its precision per element does not
      depend on a channel's magnitude), so the keys' whole channel range can move
      into it (SmolLM2, one 512-token window: alpha 0.5 gave +7.7% ppl, 1.0 +3.1%).
      Slightly below 1 keeps a little of the queries' weight in the keys, so the
      channels the scores lean on get finer key steps: `fireq_int4_r128_s4_a09`.
    channel_groups: per-token scales over this many equal channel sub-groups of
      a head (1: one scale per token and head): int8/FireQ for values, and for
      keys unless `key_channel_groups` is set; KIVI/RotateKV for values only
      (the XLA path: the decode kernel reads one value scale per token).
    key_channel_groups: int8/FireQ: the keys' channel groups when they differ
      from the values' (None: `channel_groups`).
    zero_point: int8/FireQ: asymmetric per-token quantization (min/max, a zero
      point per scale) instead of symmetric.
    search_range: "none", "keys", "values" or "both": for these, asymmetric
      codes (KIVI/RotateKV, FireQ/int8 with `zero_point`) take as each scale's
      range the shrunk min..max of least squared rounding error
      (`jaxllm.kv_cache.quantize.quantize_asymmetric`) instead of min..max. The
      stored format is unchanged; only the choice of scale and zero differs.
    key_rounding: FireQ: "nearest" rounds each key channel to its nearest code;
      "gptq" rounds a key's channels in turn on the same grid, each rounding
      error pushed onto the channels not yet rounded so that the score error
      ``q·(k̂ - k)`` is least for the calibration queries (GPTQ with the
      queries' second moment as the Hessian; `jaxllm.kv_cache.fireq.key_rounding`).
      The stored format and bytes are unchanged.
    scale_dtype: storage dtype of scales and zero points.
  """

  name: str
  kind: str
  bits: int = 16
  group_size: int = 32
  residual: int = 0
  per_channel_keys: bool = True
  n_sink: int = 0
  pre_rope_scale: bool = False
  post_rope_scale: bool = False
  rotate_keys: bool = False
  fp8_queries: bool = False
  smooth_alpha: float = 1.0
  channel_groups: int = 1
  key_channel_groups: int | None = None
  zero_point: bool = False
  search_range: str = "none"
  key_rounding: str = "nearest"
  scale_dtype: str = "bfloat16"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"CacheSpec.kind={self.kind!r}; choose one of {KINDS}")
    if self.kind != "dense":
      allowed = _KIND_BITS[self.kind]
      if self.bits not in SUPPORTED_BITS:
        raise ValueError(
          f"{self.name}: bits must be one of {SUPPORTED_BITS} (2, 4 or 8), got {self.bits!r}"
        )
      if self.bits not in allowed:
        raise ValueError(
          f"{self.name}: a {self.kind} cache supports bits {allowed}, got {self.bits}"
        )
    if self.search_range not in SEARCH_RANGES:
      raise ValueError(
        f"{self.name}: search_range must be one of {SEARCH_RANGES}, got {self.search_range!r}"
      )
    if self.key_rounding not in KEY_ROUNDINGS:
      raise ValueError(
        f"{self.name}: key_rounding must be one of {KEY_ROUNDINGS}, got {self.key_rounding!r}"
      )
    if self.key_rounding == "gptq" and (self.kind != "fireq" or self.rotate_keys):
      raise ValueError(
        f"{self.name}: key_rounding='gptq' needs a FireQ cache (calibrated queries) "
        f"without rotate_keys, got kind={self.kind!r}, rotate_keys={self.rotate_keys}"
      )
    if self.group_size <= 0:
      raise ValueError(f"{self.name}: group_size must be positive, got {self.group_size}")
    if self.residual < 0 or self.n_sink < 0:
      raise ValueError(
        f"{self.name}: residual and n_sink must be >= 0, got {self.residual}, {self.n_sink}"
      )
    if self.channel_groups < 1 or self.key_groups < 1:
      raise ValueError(
        f"{self.name}: channel groups must be >= 1, got {self.channel_groups} (values) "
        f"and {self.key_groups} (keys)"
      )
    if not 0.0 <= self.smooth_alpha <= 1.0:
      raise ValueError(f"{self.name}: smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
    if self.scale_dtype not in ("bfloat16", "float16", "float32"):
      raise ValueError(f"{self.name}: scale_dtype {self.scale_dtype!r} is not a float dtype")

  @property
  def key_groups(self) -> int:
    """Per-token scales per key row (int8/FireQ)."""
    return self.channel_groups if self.key_channel_groups is None else self.key_channel_groups

  @property
  def search_keys(self) -> bool:
    return self.search_range in ("keys", "both")

  @property
  def search_values(self) -> bool:
    return self.search_range in ("values", "both")

  @property
  def scale_jnp_dtype(self):
    return jnp.dtype(self.scale_dtype)

  def replace(self, **changes) -> "CacheSpec":
    return dataclasses.replace(self, **changes)


# R = 96: the window buffer is then R + G = 128 slots, a power of 2 as the portable
# kernel needs; SmolLM2, one 512-token window: KIVI-2 +13.0% ppl at R=32, +8.8% at R=96
# (the KIVI paper uses G=32, R=128).
_KIVI = dict(kind="kivi", group_size=32, residual=96)
# zero_point: SmolLM2, one 512-token wikitext window, streaming: symmetric +5.8% ppl,
# asymmetric +3.4%. key_channel_groups=2: SmolLM2, 2 windows at context 1024: one
# scale per key row +8.2%, two per key row +4.9% (0.297x bf16), two for keys and
# values +5.6% (0.312x, over the 0.30x budget); FP8 queries off: -0.2 points only.
_FIREQ = dict(
  kind="fireq",
  bits=4,
  pre_rope_scale=True,
  post_rope_scale=True,
  fp8_queries=True,
  zero_point=True,
  key_channel_groups=2,
)
_ROTATEKV = dict(kind="rotatekv", group_size=32, residual=96, n_sink=4, rotate_keys=True)
# fireq_int4_rot: a Hadamard rotation of FireQ's scaled keys before their per-token INT4
# was worse, not better (2 windows: +7.21% vs +5.26%): the channel scales already even out
# the key channels, and the rotation mixes channels the queries weight very differently.

METHODS: dict[str, CacheSpec] = {
  s.name: s
  for s in (
    CacheSpec("dense", "dense"),
    CacheSpec("int8", "int8", bits=8),
    CacheSpec("fireq_int4", **_FIREQ),
    CacheSpec("kivi4", bits=4, **_KIVI),
    CacheSpec("kivi2", bits=2, **_KIVI),
    CacheSpec("rotatekv2", bits=2, **_ROTATEKV),
    CacheSpec("rotatekv4", bits=4, **_ROTATEKV),
    # FireQ's codes plus KIVI's exact recent window (R=128, the KIVI paper's) and
    # RotateKV's 4 exact sinks, both outside the per-token byte count. SmolLM2, 2 windows
    # at context 1024: fireq_int4 +5.26%; R=96 +2.60%; 4 sinks +5.52%; R=96 and 4 sinks
    # +2.09%, 8 sinks +1.78%; R=128 and 4 sinks +1.27%. 8 windows: R=96 +1.27%, R=128 +0.93%.
    CacheSpec("fireq_int4_r128_s4", **{**_FIREQ, "residual": 128, "n_sink": 4}),
    # The same with smoothing strength 0.9 instead of 1 (`smooth_alpha`). SmolLM2, the
    # first 16 windows at context 1024, 32-token decode steps: +1.16% -> +0.81% (top-1
    # 0.942 -> 0.950); 0.297x. Checked on windows 17-48, not used to choose alpha:
    # +0.83% -> +0.64%; the first 48: +0.94% -> +0.70% (top-1 0.944 -> 0.952).
    CacheSpec(
      "fireq_int4_r128_s4_a09", **{**_FIREQ, "residual": 128, "n_sink": 4, "smooth_alpha": 0.9}
    ),
    # GPTQ-rounded keys (`key_rounding`): the query-weighted score error of the keys
    # drops 41% (one window, all layers), top-1 agreement rises, perplexity does not
    # move. 16 windows: fireq_int4_r128_s4 +1.16% (top-1 0.942) -> +1.15% (0.951).
    CacheSpec(
      "fireq_int4_r128_s4_gptq",
      **{**_FIREQ, "residual": 128, "n_sink": 4, "key_rounding": "gptq"},
    ),
    CacheSpec("fireq_int4_gptq", **{**_FIREQ, "key_rounding": "gptq"}),
    # KIVI-2 with the paper's R=128 and RotateKV's 4 exact sinks (no rotation). SmolLM2,
    # 8 windows at context 1024: kivi2 +21.2%; 4 sinks +10.0%; R=128 and 4 sinks +8.6%;
    # 8 sinks +8.5%; float16 instead of bfloat16 scales +8.8% (no gain).
    CacheSpec("kivi2_r128_s4", bits=2, **{**_KIVI, "residual": 128, "n_sink": 4}),
    # kivi2_r128_s4 with each scale's range chosen for the least squared rounding error
    # instead of min..max (`search_range`). SmolLM2, 8 windows at context 1024: +8.67% vs
    # +8.61%, top-1 agreement 0.882 vs 0.849: closer logits, no better perplexity.
    CacheSpec(
      "kivi2_r128_s4_search",
      bits=2,
      **{**_KIVI, "residual": 128, "n_sink": 4, "search_range": "both"},
    ),
    # ablations
    CacheSpec("kivi2_per_token_keys", bits=2, per_channel_keys=False, **_KIVI),
    CacheSpec("kivi2_no_residual", bits=2, **{**_KIVI, "residual": 0}),
    CacheSpec("fireq_int4_pre_rope_only", **{**_FIREQ, "post_rope_scale": False}),
    CacheSpec("fireq_int4_post_rope_only", **{**_FIREQ, "pre_rope_scale": False}),
    CacheSpec("fireq_int4_rot", **{**_FIREQ, "rotate_keys": True}),
    CacheSpec("kivi2_r128", bits=2, **{**_KIVI, "residual": 128}),
    CacheSpec("fireq_int4_r96_s4", **{**_FIREQ, "residual": 96, "n_sink": 4}),
    # KIVI-2 with RotateKV's 4 exact sinks, no rotation: SmolLM2, 2 windows at context
    # 1024: +14.5% against kivi2's +30.9% (R=128 too: +13.5%).
    CacheSpec("kivi2_s4", bits=2, **{**_KIVI, "n_sink": 4}),
    # RotateKV-2 without its Hadamard rotation: KIVI-2 codes of pre-RoPE keys, 4 sinks.
    # SmolLM2, 8 windows at context 1024: +8.40% (kivi2_s4, post-RoPE: +10.03%; rotatekv2
    # +4.29%): the rotation is worth 4 points, quantizing before RoPE 1.6.
    CacheSpec("rotatekv2_no_rotation", bits=2, **{**_ROTATEKV, "rotate_keys": False}),
    # The same with KIVI's R=128: KIVI-2 codes of pre-RoPE keys, 4 exact sinks. SmolLM2,
    # 8 windows at context 1024: +8.01% (top-1 0.858) against +8.62% for the same codes
    # after RoPE (kivi2_r128_s4); 16 windows: +8.34% against +9.33%.
    CacheSpec(
      "kivi2_pre_rope_r128_s4", bits=2, **{**_ROTATEKV, "rotate_keys": False, "residual": 128}
    ),
    # Key-range search: each key scale's range (per channel over 32 tokens) is the one
    # of least squared rounding error; values keep min..max. SmolLM2, context 1024,
    # 32-token decode steps. 8 windows: kivi2_pre_rope_r128_s4 +7.99% -> +5.56% (top-1
    # 0.907); searching the value ranges instead is worse (+8.51%). 16 windows:
    # pre-RoPE +8.27% -> +5.96%, post-RoPE kivi2_r128_s4 +9.34% -> +5.97% (0.903),
    # rotatekv2_ksearch +5.70% (0.908).
    CacheSpec(
      "kivi2_pre_rope_r128_s4_ksearch",
      bits=2,
      **{**_ROTATEKV, "rotate_keys": False, "residual": 128, "search_range": "keys"},
    ),
    CacheSpec(
      "kivi2_r128_s4_ksearch",
      bits=2,
      **{**_KIVI, "residual": 128, "n_sink": 4, "search_range": "keys"},
    ),
    CacheSpec("rotatekv2_ksearch", bits=2, **{**_ROTATEKV, "search_range": "keys"}),
    # The same bytes spent otherwise: key groups of 64 tokens pay for two value scale
    # groups of 32 channels (KIVI's channel group); 2 windows: +20.0%, worse than kivi2_s4.
    CacheSpec(
      "kivi2_s4_g64_v2", bits=2, **{**_KIVI, "n_sink": 4, "group_size": 64, "channel_groups": 2}
    ),
  )
}


def spec_for(name: str) -> CacheSpec:
  """The `CacheSpec` registered as `name`."""
  if name not in METHODS:
    raise ValueError(f"unknown KV cache method {name!r}; choose one of {sorted(METHODS)}")
  return METHODS[name]
