"""`QTensor`: a quantized weight that stands in for a float one.

A weight ``w [K, *out]`` (the model computes ``x @ w`` over K) is stored as a
2-D quantized matrix ``[K', N]`` with ``N = prod(out)`` plus its scales (and
offsets), in the layouts the `pallas_kernels.quantized_matmul` kernels take.
``K' = K + k_pad``: when the group size does not divide K, K may be zero-padded
(``pad_k=True``); the padding rows are stored (and counted in `num_bytes`) and
the activations are zero-padded to match at run time.

Every part keeps the original's logical axis names (K's name for rows, the
major output name for columns), so a QTensor shards exactly like the weight it
replaces: the same rules table applies unchanged.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm.kv_cache.quantize import least_error_range
from pallas_kernels import quantized_matmul as qmm

# method -> what is stored.
METHODS = {
  "w8a8": "int8 per-output-channel weights; activations quantized to int8 per token at run time",
  "w4a16": "int4 group-wise min/max weights (scale + float offset per group); float activations",
  "fireq_w4a8": (
    "int4 symmetric weights with FP8 e4m3 per-channel (or group) scales relative to an f32 "
    "per-tensor scale; activations quantized to FP8 e4m3 with a dynamic per-token scale"
  ),
}
_FP8 = jnp.float8_e4m3fn
_FP8_MAX = 448.0
_SCALE_DTYPES = {
  "w8a8": ("float32",),
  "w4a16": ("float32", "bfloat16"),
  "fireq_w4a8": ("float8_e4m3fn", "float32"),
}
_WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


@flax.struct.dataclass
class QTensor:
  """Quantized weight. Array parts are pytree leaves; the rest is static.

  Parts per method:
    * w8a8: `values` int8 [K, N], `scales` f32 [1, N].
    * w4a16: `values` int8 [K'/2, N] (two int4 per byte), `scales` and `offsets`
      [K'/g, N] (f32 or bf16): ``w = code * scale + offset``.
    * fireq_w4a8: `values` int8 [K'/2, N] (signed int4), `scales` [K'/g, N]
      (float8_e4m3fn, or f32) relative to `tensor_scale` f32 [1, 1]:
      ``w = code * scale * tensor_scale``.
  """

  values: jax.Array
  scales: jax.Array
  offsets: jax.Array | None = None
  tensor_scale: jax.Array | None = None
  method: str = flax.struct.field(pytree_node=False, default="w8a8")
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # float weight's
  contract_dims: int = flax.struct.field(pytree_node=False, default=1)  # leading dims forming K
  k_pad: int = flax.struct.field(pytree_node=False, default=0)  # zero rows appended to K

  @property
  def parts(self) -> dict[str, jax.Array]:
    names = ("values", "scales", "offsets", "tensor_scale")
    return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

  @property
  def num_bytes(self) -> int:
    """Exact storage: values (padding rows included), scales, offsets, tensor scale."""
    return sum(p.size * jnp.dtype(p.dtype).itemsize for p in self.parts.values())

  @property
  def bf16_bytes(self) -> int:
    """Bytes of the float weight it replaces, stored in bfloat16."""
    return 2 * math.prod(self.shape)

  @property
  def k(self) -> int:
    return math.prod(self.shape[: self.contract_dims])

  def logical_axes(self, weight_axes: tuple[str | None, ...]) -> QTensor:
    """Logical names for each part, given the float weight's names."""
    c = self.contract_dims
    rows = next((a for a in weight_axes[:c] if a is not None), None)
    cols = next((a for a in weight_axes[c:] if a is not None), None)
    names = (rows, cols)
    per_row_group = self.scales.shape[0] > 1
    return self.replace(
      values=names,
      scales=names if per_row_group else (None, cols),
      offsets=None if self.offsets is None else names,
      tensor_scale=None if self.tensor_scale is None else (None, None),
    )

  def dequantize_padded(self, dtype=jnp.float32) -> jax.Array:
    """The [K + k_pad, N] float matrix the kernels multiply by."""
    if self.method == "w8a8":
      w = self.values.astype(jnp.float32) * self.scales
    elif self.method == "w4a16":
      w = qmm.dequantize_w4a16(self.values, self.scales, self.offsets)
    else:
      codes = qmm.unpack_int4_full(self.values, signed=True).astype(jnp.float32)
      g = codes.shape[0] // self.scales.shape[0]
      scales = jnp.repeat(self.scales.astype(jnp.float32), g, axis=0) * self.tensor_scale
      w = codes * scales
    return w.astype(dtype)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The float weight this QTensor approximates, in its original shape."""
    return self.dequantize_padded(dtype)[: self.k].reshape(self.shape)


def quantize(
  w: jax.Array,
  method: str,
  group_size: int | None = 128,
  contract_dims: int = 1,
  *,
  pad_k: bool = False,
  scale_dtype: str | None = None,
  per_tensor_scale: bool = True,
  clip_search: bool = False,
) -> QTensor:
  """Quantizes a float weight [*K, *out] (K = its first `contract_dims` dims).

  Args:
    w: float32/bfloat16/float16 weight.
    method: one of `METHODS`.
    group_size: rows of K per scale for w4a16 (required) and fireq_w4a8 (None:
      one scale per output channel); ignored by w8a8.
    contract_dims: leading dims of `w` that form K.
    pad_k: zero-pad K up to a multiple of the group size (and of 2) instead of
      raising when it does not divide K; the padding is stored and counted.
    scale_dtype: storage of the scales (see `_SCALE_DTYPES`); default f32 for
      w8a8/w4a16, float8_e4m3fn for fireq_w4a8.
    per_tensor_scale: fireq_w4a8 only: scales are stored relative to an f32
      per-tensor scale (FireQ); False stores them absolute, so small scales
      lose precision or underflow in FP8 (the ablation).
    clip_search: int4 methods only: per group (or channel), clip the range to the
      candidate (see `clip_to_best_range`) with the least squared rounding error.

  Raises:
    ValueError: unknown method, unsupported weight or scale dtype, or a group
      size that does not divide K when `pad_k` is False.
  """
  if method not in METHODS:
    raise ValueError(f"unknown quantization method {method!r}; choose one of {sorted(METHODS)}")
  if jnp.dtype(w.dtype).name not in _WEIGHT_DTYPES:
    raise ValueError(
      f"cannot quantize a weight of dtype {jnp.dtype(w.dtype).name}; "
      f"expected one of {', '.join(_WEIGHT_DTYPES)}"
    )
  if w.ndim <= contract_dims:
    raise ValueError(f"can only quantize a weight [*K, *out], got shape {tuple(w.shape)}")
  scale_dtype = scale_dtype or _SCALE_DTYPES[method][0]
  if scale_dtype not in _SCALE_DTYPES[method]:
    raise ValueError(
      f"{method}: scale dtype {scale_dtype!r} is not supported; "
      f"expected one of {_SCALE_DTYPES[method]}"
    )
  k = math.prod(w.shape[:contract_dims])
  w2 = jnp.asarray(w, jnp.float32).reshape(k, math.prod(w.shape[contract_dims:]))
  common = dict(method=method, shape=tuple(w.shape), contract_dims=contract_dims)
  if method == "w8a8":
    values, scales = qmm.quantize_w8(w2)
    return QTensor(values, scales, **common)
  if method == "w4a16" and group_size is None:
    raise ValueError("w4a16 needs a group_size")
  k_pad = _padding(k, group_size, pad_k, method)
  w2 = jnp.pad(w2, ((0, k_pad), (0, 0)))
  if clip_search:
    w2 = clip_to_best_range(w2, group_size or w2.shape[0], symmetric=method == "fireq_w4a8")
  if method == "w4a16":
    values, scales, offsets = qmm.quantize_w4a16(w2, group_size, jnp.dtype(scale_dtype))
    return QTensor(values, scales, offsets, k_pad=k_pad, **common)
  values, scales, tensor_scale = quantize_fireq(w2, group_size, scale_dtype, per_tensor_scale)
  return QTensor(values, scales, None, tensor_scale, k_pad=k_pad, **common)


def _padding(k: int, group_size: int | None, pad_k: bool, method: str) -> int:
  """Rows to append to K so that the group size (and 2, for int4 packing) divides it."""
  multiple = 2 if group_size is None else math.lcm(2, group_size)
  if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
    raise ValueError(f"{method}: group_size must be an int >= 2, got {group_size!r}")
  pad = -k % multiple
  if pad and not pad_k:
    raise ValueError(
      f"{method}: K={k} is not divisible by group_size={group_size}"
      + (" (int4 packing needs an even K)" if group_size is None else "")
      + "; pass pad_k=True to zero-pad K (the padding is stored and counted)"
    )
  return pad


_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def clip_to_best_range(w2: jax.Array, group: int, symmetric: bool) -> jax.Array:
  """Clips each group of `group` rows of w2 [K, N] to the range of least int4 rounding error.

  Candidates shrink the group's range: symmetric (``±r * absmax``, int4 codes in
  [-8, 7]) or min/max with the low and high ends shrunk independently toward the
  group's middle (codes in [0, 15]). The chosen range is then exactly the clipped
  group's own range, so the quantizers that follow pick it up unchanged.
  """
  k, n = w2.shape
  wg = w2.reshape(k // group, group, n)
  ratios = jnp.asarray(_SHRINK, jnp.float32)
  if symmetric:
    amax = jnp.abs(wg).max(axis=1)  # [G, N]
    bound = ratios[:, None, None] * amax  # [R, G, N]
    scale = jnp.maximum(bound / 7.0, 1e-12)[:, :, None]
    q = jnp.clip(jnp.round(wg / scale), -8, 7)
    err = ((q * scale - wg) ** 2).sum(axis=2)  # [R, G, N]
    best = jnp.take_along_axis(bound, err.argmin(axis=0)[None], axis=0)[0]
    return jnp.clip(wg, -best[:, None], best[:, None]).reshape(k, n)
  lo, hi = wg.min(axis=1, keepdims=True), wg.max(axis=1, keepdims=True)
  best_lo, best_hi = least_error_range(wg, lo, hi, 15.0, axis=1, shrink=_SHRINK)
  return jnp.clip(wg, best_lo, best_hi).reshape(k, n)


def quantize_fireq(w2: jax.Array, group_size: int | None, scale_dtype: str, per_tensor: bool):
  """FireQ int4 weights [K, N] -> (packed codes, scales [K/g, N], tensor_scale f32 [1, 1]).

  Scales ``absmax / 7`` per output channel (or group) are stored in FP8 e4m3
  relative to the per-tensor scale ``max(scale) / 448``, which maps the largest to
  the top of the FP8 range so none underflows. Each stored scale is rounded *up*
  to an e4m3 value (never clipping a weight), and codes are chosen against it.
  With `per_tensor` False the tensor scale is 1 and the scales are stored as they
  are; a scale under 2^-6 then falls in e4m3's coarse subnormal range. (SmolLM2's
  weights are large: 0.28% of its unsmoothed g32 scales are under 2^-6, and the
  mean round-up of a scale is 4.7% either way, so the per-tensor scale barely
  matters there.)
  """
  k, n = w2.shape
  g = k if group_size is None else group_size
  wg = w2.reshape(k // g, g, n)
  tensor_scale = fireq_tensor_scale(w2, g, per_tensor)
  stored = fireq_group_scale(wg, tensor_scale, scale_dtype)  # [K/g, N]
  codes = fireq_codes(wg, stored, tensor_scale)
  return qmm.pack_int4(codes.reshape(k, n)), stored, tensor_scale


def fireq_tensor_scale(w2: jax.Array, group: int, per_tensor: bool) -> jax.Array:
  """f32 [1, 1]: ``max(group absmax / 7) / 448``, or 1 without the per-tensor scale."""
  if not per_tensor:
    return jnp.ones((1, 1), jnp.float32)
  k, n = w2.shape
  amax = jnp.abs(w2.reshape(k // group, group, n)).max(axis=1)
  return (jnp.maximum(amax / 7.0, 1e-12).max() / _FP8_MAX).astype(jnp.float32).reshape(1, 1)


def fireq_group_scale(wg: jax.Array, tensor_scale: jax.Array, scale_dtype: str) -> jax.Array:
  """Stored scales [..., N] of groups wg [..., g, N] (the reduction is over axis -2).

  ``absmax / 7`` relative to `tensor_scale`, rounded up to e4m3 (or kept f32).
  """
  scale = jnp.maximum(jnp.abs(wg).max(axis=-2) / 7.0, 1e-12)
  rel = jnp.minimum(scale / tensor_scale[0, 0], _FP8_MAX)  # f32 division may exceed 448 a hair
  return round_up_fp8(rel) if scale_dtype == "float8_e4m3fn" else rel


def fireq_codes(w: jax.Array, stored: jax.Array, tensor_scale: jax.Array) -> jax.Array:
  """int4 codes in [-8, 7] (as f32) of w [..., rows, N] on the grid of `stored` [..., N]."""
  eff = stored.astype(jnp.float32) * tensor_scale[0, 0]
  return jnp.clip(jnp.round(w / eff[..., None, :]), -8, 7)


def w4a16_group_grid(wg: jax.Array, scale_dtype: str) -> tuple[jax.Array, jax.Array]:
  """Stored (scale, minimum) [..., N] of groups wg [..., g, N], as `qmm.quantize_w4a16`."""
  wmin, wmax = wg.min(axis=-2), wg.max(axis=-2)
  scales = jnp.maximum((wmax - wmin) / 15.0, 1e-12).astype(scale_dtype)
  return scales, wmin.astype(scale_dtype)


def w4a16_codes(w: jax.Array, scales: jax.Array, mins: jax.Array) -> jax.Array:
  """int4 codes in [0, 15] (as f32) of w [..., rows, N] on the grid (scales, mins) [..., N]."""
  s32, m32 = scales.astype(jnp.float32)[..., None, :], mins.astype(jnp.float32)[..., None, :]
  return jnp.clip(jnp.round((w - m32) / s32), 0, 15)


def round_up_fp8(x: jax.Array) -> jax.Array:
  """Smallest float8_e4m3fn value >= x, for 0 < x <= 448 (x below 2^-9 gives 2^-9).

  (Above 448 the next bit pattern is e4m3fn's NaN, hence the bound.)
  """
  near = x.astype(_FP8)
  bits = jax.lax.bitcast_convert_type(near, jnp.uint8)
  up = jax.lax.bitcast_convert_type(bits + jnp.uint8(1), _FP8)
  return jnp.where(near.astype(jnp.float32) < x, up, near)
