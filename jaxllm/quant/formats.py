"""Weight formats as objects: how a quantized weight is stored, made, read and multiplied.

A `WeightFormat` (a frozen dataclass, one class per format) owns everything in
which formats differ, so nothing else switches on a format's name:

  * `quantize`: float ``[K, N]`` -> its parts (``values``, ``scales`` and, where it
    has them, ``offsets`` and ``tensor_scale``) and the zero rows K was padded by;
    `dequantize`: parts -> float ``[K', N]``; `num_bytes`: the bytes they take;
  * `matmul_op`: the op (`pallas_kernels.registry`) that multiplies float rows by
    it, None for a storage-only format, and `matmul_operands`: that op's arguments;
  * `scale_dtypes`: the scale storage it allows (the first is the default);
  * its GPTQ grid (`supports_gptq`): `gptq_group_grid`, `gptq_codes`,
    `gptq_dequantize`, `pack_codes`, `grid_parts`, `gptq_fixed_grid`;
  * its learned-rounding fake quantization (`learnable`): `fake_quantize` and
    `fake_quantize_activations` (`jaxllm.quant.reconstruct`).

`FORMATS` maps each name (the ``method`` of recipes, checkpoints and runners) to its
format; `get_format` resolves a name. A `jaxllm.quant.QTensor` carries its format
object as a static field and delegates to it. Adding a format is one subclass and
one `register_format` call (see ``docs/architecture.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxllm.quant.numerics import FP8_E4M3_MAX, least_error_range, round_up_fp8
from pallas_kernels import quantized_matmul as qmm

Parts = Mapping[str, jax.Array]
# learned rounding parts (v [G, g, N] in [-1/2, 1/2], low [G, N], high [G, N] in [1/2, 1])
Learned = tuple[jax.Array, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class WeightFormat:
  """A storage format of quantized weights (subclass it; see the module docstring).

  Instances are hashable (a `QTensor` holds one as a static pytree field): keep
  any configuration in dataclass fields. Parts are 2-D: rows along K' (K plus the
  padding), columns along N.
  """

  name: ClassVar[str]
  description: ClassVar[str]
  matmul_op: ClassVar[str | None] = None
  scale_dtypes: ClassVar[tuple[str, ...]] = ("float32",)
  supports_gptq: ClassVar[bool] = False
  # GPTQ: the grid is fixed per row beforehand (from round-to-nearest) instead of
  # taken per group from the error-updated weights.
  gptq_fixed_grid: ClassVar[bool] = False
  grid_parts: ClassVar[tuple[str, ...]] = ("scales",)  # the parts that form the grid
  learnable: ClassVar[bool] = False

  def quantize(
    self,
    w2: jax.Array,
    *,
    group_size: int | None,
    pad_k: bool,
    scale_dtype: str,
    per_tensor_scale: bool,
    clip_search: bool,
  ) -> tuple[dict[str, jax.Array], int]:
    """f32 ``[K, N]`` -> (parts, zero rows appended to K). Options a format has no use
    for are ignored; `scale_dtype` is one of `scale_dtypes`."""
    raise NotImplementedError(f"weight format {self.name!r} does not quantize")

  def dequantize(self, parts: Parts) -> jax.Array:
    """The f32 ``[K', N]`` matrix the parts stand for."""
    raise NotImplementedError(f"weight format {self.name!r} does not dequantize")

  def num_bytes(self, parts: Parts) -> int:
    """Exact storage of the parts."""
    return sum(p.size * jnp.dtype(p.dtype).itemsize for p in parts.values())

  def matmul_operands(self, parts: Parts, x: jax.Array) -> tuple:
    """`matmul_op`'s positional arguments for float rows x ``[M, K']`` (already padded)."""
    raise NotImplementedError(f"weight format {self.name!r} has no matmul op")

  # -- GPTQ (`jaxllm.quant.gptq`) --------------------------------------------------------

  def gptq_group_grid(self, wg, tensor_scale, scale_dtype: str, clip: bool) -> tuple:
    """The grid parts ``[N]`` (in `grid_parts` order) of one group wg ``[g, N]``; with
    `clip`, over the group's range of least rounding error."""
    raise NotImplementedError(f"weight format {self.name!r} has no GPTQ group grid")

  def gptq_codes(self, w, grid: tuple, tensor_scale) -> jax.Array:
    """Codes (as f32) of w ``[..., rows, N]`` on the grid ``[..., N]`` each."""
    raise NotImplementedError(f"weight format {self.name!r} has no GPTQ grid")

  def gptq_dequantize(self, codes, grid: tuple, tensor_scale) -> jax.Array:
    """The f32 values of `codes` on the grid (the same shapes as `gptq_codes`)."""
    raise NotImplementedError(f"weight format {self.name!r} has no GPTQ grid")

  def pack_codes(self, codes: jax.Array) -> jax.Array:
    """The stored ``values`` of f32 codes ``[K', N]``."""
    raise NotImplementedError(f"weight format {self.name!r} has no GPTQ grid")

  # -- block reconstruction (`jaxllm.quant.reconstruct`) ------------------------------------

  def fake_quantize(
    self, wg: jax.Array, learned: Learned, tensor_scale: jax.Array, scale_dtype: str
  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Groups wg ``[G, g, N]`` quantized under the learned parts, differentiable
    (straight through the rounding and the scale storage): (dequantized ``[G, g, N]``,
    codes ``[G, g, N]``, stored grid parts ``{name: [G, N]}``). With v = 0 and both
    multipliers 1 this is the round-to-nearest grid of `quantize`."""
    raise NotImplementedError(f"weight format {self.name!r} cannot be learned")

  def fake_quantize_activations(self, x: jax.Array) -> jax.Array:
    """x rounded as `matmul_op` rounds its activations (straight through), in x's dtype."""
    return x


def register_format(fmt: WeightFormat, table: dict[str, WeightFormat]) -> WeightFormat:
  """Adds `fmt` to `table` under its name (a name taken raises); returns it.

  `FORMATS` is the table `get_format` reads by default; tests register into a copy.
  """
  if not isinstance(fmt, WeightFormat):
    raise TypeError(f"register_format takes a WeightFormat, got {type(fmt).__name__}")
  if fmt.name in table:
    raise ValueError(f"weight format {fmt.name!r} is already registered")
  table[fmt.name] = fmt
  return fmt


def get_format(
  name: str | WeightFormat, table: Mapping[str, WeightFormat] | None = None
) -> WeightFormat:
  """The format named `name` in `table` (default `FORMATS`); a format passes through."""
  if isinstance(name, WeightFormat):
    return name
  table = FORMATS if table is None else table
  if not isinstance(name, str) or name not in table:
    raise ValueError(f"unknown quantization method {name!r}; choose one of {sorted(table)}")
  return table[name]


def format_names(capability: str, table: Mapping[str, WeightFormat] | None = None) -> tuple:
  """Names of the formats in `table` (default `FORMATS`) whose `capability` attribute
  (``supports_gptq``, ``learnable``) is true, in registration order."""
  table = FORMATS if table is None else table
  return tuple(n for n, f in table.items() if getattr(f, capability))


def straight_through(x: jax.Array, forward: jax.Array) -> jax.Array:
  """`forward`'s value with x's gradient."""
  return x + jax.lax.stop_gradient(forward - x)


# ------------------------------------------------------------------------------- W8A8


@dataclasses.dataclass(frozen=True)
class W8A8(WeightFormat):
  """int8 per-output-channel weights: `values` int8 ``[K, N]``, `scales` f32 ``[1, N]``."""

  name = "w8a8"
  description = (
    "int8 per-output-channel weights; activations quantized to int8 per token at run time"
  )
  matmul_op = "w8a8_matmul"
  scale_dtypes = ("float32",)
  supports_gptq = True
  gptq_fixed_grid = True  # one scale per output channel over all of K

  def quantize(self, w2, **options):
    values, scales = qmm.quantize_w8(w2)
    return {"values": values, "scales": scales}, 0

  def dequantize(self, parts):
    return parts["values"].astype(jnp.float32) * parts["scales"]

  def matmul_operands(self, parts, x):
    return (x, parts["values"], parts["scales"])

  def gptq_codes(self, w, grid, tensor_scale):
    return qmm.int8_codes(w, grid[0])

  def gptq_dequantize(self, codes, grid, tensor_scale):
    return codes * grid[0]

  def pack_codes(self, codes):
    return codes.astype(jnp.int8)


# ------------------------------------------------------------------------------- int4


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


def _padding(k: int, group_size: int | None, pad_k: bool, name: str) -> int:
  """Rows to append to K so that the group size (and 2, for int4 packing) divides it."""
  multiple = 2 if group_size is None else math.lcm(2, group_size)
  if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
    raise ValueError(f"{name}: group_size must be an int >= 2, got {group_size!r}")
  pad = -k % multiple
  if pad and not pad_k:
    raise ValueError(
      f"{name}: K={k} is not divisible by group_size={group_size}"
      + (" (int4 packing needs an even K)" if group_size is None else "")
      + "; pass pad_k=True to zero-pad K (the padding is stored and counted)"
    )
  return pad


@dataclasses.dataclass(frozen=True)
class _Int4(WeightFormat):
  """Group-wise int4 codes, two per byte (`qmm.pack_int4`), K zero-padded to a whole
  number of groups (and an even count) on request."""

  supports_gptq = True
  learnable = True
  symmetric: ClassVar[bool]  # codes in [-8, 7] around 0, else [0, 15] from the minimum
  needs_group_size: ClassVar[bool] = False

  def quantize(self, w2, *, group_size, pad_k, scale_dtype, per_tensor_scale, clip_search):
    if self.needs_group_size and group_size is None:
      raise ValueError(f"{self.name} needs a group_size")
    k_pad = _padding(w2.shape[0], group_size, pad_k, self.name)
    w2 = jnp.pad(w2, ((0, k_pad), (0, 0)))
    if clip_search:
      w2 = clip_to_best_range(w2, group_size or w2.shape[0], symmetric=self.symmetric)
    return self._quantize_padded(w2, group_size, scale_dtype, per_tensor_scale), k_pad

  def _quantize_padded(self, w2, group_size, scale_dtype, per_tensor_scale) -> dict:
    raise NotImplementedError

  def gptq_group_grid(self, wg, tensor_scale, scale_dtype, clip):
    if clip:
      wg = clip_to_best_range(wg, wg.shape[0], symmetric=self.symmetric)
    return tuple(p[0] for p in self._group_grid(wg[None], tensor_scale, scale_dtype))

  def _group_grid(self, wg, tensor_scale, scale_dtype) -> tuple:
    """Stored grid parts [..., N] of groups wg [..., g, N]."""
    raise NotImplementedError

  def pack_codes(self, codes):
    return qmm.pack_int4(codes.astype(jnp.int32))


def w4a16_group_grid(wg: jax.Array, scale_dtype: str) -> tuple[jax.Array, jax.Array]:
  """Stored (scale, minimum) [..., N] of groups wg [..., g, N], as `qmm.quantize_w4a16`."""
  wmin, wmax = wg.min(axis=-2), wg.max(axis=-2)
  scales = jnp.maximum((wmax - wmin) / 15.0, 1e-12).astype(scale_dtype)
  return scales, wmin.astype(scale_dtype)


def w4a16_codes(w: jax.Array, scales: jax.Array, mins: jax.Array) -> jax.Array:
  """int4 codes in [0, 15] (as f32) of w [..., rows, N] on the grid (scales, mins) [..., N]."""
  s32, m32 = scales.astype(jnp.float32)[..., None, :], mins.astype(jnp.float32)[..., None, :]
  return jnp.clip(jnp.round((w - m32) / s32), 0, 15)


@dataclasses.dataclass(frozen=True)
class W4A16(_Int4):
  """int4 group-wise min/max weights: `values` int8 ``[K'/2, N]`` (two codes per byte),
  `scales` and `offsets` ``[K'/g, N]`` (f32 or bf16), ``w = code * scale + offset``."""

  name = "w4a16"
  description = (
    "int4 group-wise min/max weights (scale + float offset per group); float activations"
  )
  matmul_op = "w4a16_matmul"
  scale_dtypes = ("float32", "bfloat16")
  grid_parts = ("scales", "offsets")
  symmetric = False
  needs_group_size = True

  def _quantize_padded(self, w2, group_size, scale_dtype, per_tensor_scale):
    values, scales, offsets = qmm.quantize_w4a16(w2, group_size, jnp.dtype(scale_dtype))
    return {"values": values, "scales": scales, "offsets": offsets}

  def dequantize(self, parts):
    return qmm.dequantize_w4a16(parts["values"], parts["scales"], parts["offsets"])

  def matmul_operands(self, parts, x):
    return (x, parts["values"], parts["scales"], parts["offsets"])

  def _group_grid(self, wg, tensor_scale, scale_dtype):
    return w4a16_group_grid(wg, scale_dtype)

  def gptq_codes(self, w, grid, tensor_scale):
    return w4a16_codes(w, *grid)

  def gptq_dequantize(self, codes, grid, tensor_scale):
    scales, mins = grid
    return codes * scales.astype(jnp.float32) + mins.astype(jnp.float32)

  def fake_quantize(self, wg, learned, tensor_scale, scale_dtype):
    v, low, high = learned
    wmin, wmax = wg.min(axis=1) * low, wg.max(axis=1) * high
    scale = jnp.maximum((wmax - wmin) / 15.0, 1e-12)
    scale = straight_through(scale, scale.astype(scale_dtype).astype(jnp.float32))
    offset = straight_through(wmin, wmin.astype(scale_dtype).astype(jnp.float32))
    u = (wg - offset[:, None]) / scale[:, None] + v
    codes = jnp.clip(straight_through(u, jnp.round(u)), 0, 15)
    w_hat = codes * scale[:, None] + offset[:, None]
    return (
      w_hat,
      codes,
      {"scales": scale.astype(scale_dtype), "offsets": offset.astype(scale_dtype)},
    )


def quantize_fireq(w2: jax.Array, group_size: int | None, scale_dtype: str, per_tensor: bool):
  """FireQ int4 weights [K, N] -> (packed codes, scales [K/g, N], tensor_scale f32 [1, 1]).

  Scales ``absmax / 7`` per output channel (or group) are stored in FP8 e4m3
  relative to the per-tensor scale ``max(scale) / 448``, which maps the largest to
  the top of the FP8 range so none underflows. Each stored scale is rounded *up*
  to an e4m3 value (never clipping a weight), and codes are chosen against it.
  With `per_tensor` False the tensor scale is 1 and the scales are stored as they
  are; a scale under 2^-6 then falls in e4m3's coarse subnormal range.
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
  return (jnp.maximum(amax / 7.0, 1e-12).max() / FP8_E4M3_MAX).astype(jnp.float32).reshape(1, 1)


def fireq_group_scale(wg: jax.Array, tensor_scale: jax.Array, scale_dtype: str) -> jax.Array:
  """Stored scales [..., N] of groups wg [..., g, N] (the reduction is over axis -2).

  ``absmax / 7`` relative to `tensor_scale`, rounded up to e4m3 (or kept f32).
  """
  scale = jnp.maximum(jnp.abs(wg).max(axis=-2) / 7.0, 1e-12)
  rel = jnp.minimum(scale / tensor_scale[0, 0], FP8_E4M3_MAX)  # f32 division may exceed 448 a hair
  return round_up_fp8(rel) if scale_dtype == "float8_e4m3fn" else rel


def fireq_codes(w: jax.Array, stored: jax.Array, tensor_scale: jax.Array) -> jax.Array:
  """int4 codes in [-8, 7] (as f32) of w [..., rows, N] on the grid of `stored` [..., N]."""
  eff = stored.astype(jnp.float32) * tensor_scale[0, 0]
  return jnp.clip(jnp.round(w / eff[..., None, :]), -8, 7)


@dataclasses.dataclass(frozen=True)
class FireQW4A8(_Int4):
  """FireQ: `values` int8 ``[K'/2, N]`` (signed int4), `scales` ``[K'/g, N]``
  (float8_e4m3fn, or f32) relative to `tensor_scale` f32 ``[1, 1]``:
  ``w = code * scale * tensor_scale``; activations in FP8 e4m3 per token."""

  name = "fireq_w4a8"
  description = (
    "int4 symmetric weights with FP8 e4m3 per-channel (or group) scales relative to an f32 "
    "per-tensor scale; activations quantized to FP8 e4m3 with a dynamic per-token scale"
  )
  matmul_op = "w4a8_fireq_matmul"
  scale_dtypes = ("float8_e4m3fn", "float32")
  symmetric = True

  def _quantize_padded(self, w2, group_size, scale_dtype, per_tensor_scale):
    values, scales, tensor_scale = quantize_fireq(w2, group_size, scale_dtype, per_tensor_scale)
    return {"values": values, "scales": scales, "tensor_scale": tensor_scale}

  def dequantize(self, parts):
    return qmm.dequantize_w4_fireq(parts["values"], parts["scales"], parts["tensor_scale"])

  def matmul_operands(self, parts, x):
    return (x, parts["values"], parts["scales"].astype(jnp.float32), parts["tensor_scale"])

  def _group_grid(self, wg, tensor_scale, scale_dtype):
    return (fireq_group_scale(wg, tensor_scale, scale_dtype),)

  def gptq_codes(self, w, grid, tensor_scale):
    return fireq_codes(w, grid[0], tensor_scale)

  def gptq_dequantize(self, codes, grid, tensor_scale):
    return codes * grid[0].astype(jnp.float32) * tensor_scale[0, 0]

  def fake_quantize(self, wg, learned, tensor_scale, scale_dtype):
    """One learned multiplier (`high`) on each group's absmax; `low` is unused."""
    v, _, high = learned
    rel = fireq_group_scale(wg * high[:, None], tensor_scale, "float32")
    fp8 = scale_dtype == "float8_e4m3fn"
    stored = straight_through(rel, round_up_fp8(rel).astype(jnp.float32)) if fp8 else rel
    step = stored * tensor_scale[0, 0]
    u = wg / step[:, None] + v
    codes = jnp.clip(straight_through(u, jnp.round(u)), -8, 7)
    w_hat = codes * step[:, None]
    return w_hat, codes, {"scales": stored.astype(jnp.float8_e4m3fn if fp8 else jnp.float32)}

  def fake_quantize_activations(self, x):
    return qmm.fake_quantize_activations_fp8(x).astype(x.dtype)


# name -> format: the storage formats of quantized weights, in registration order.
FORMATS: dict[str, WeightFormat] = {}
for _fmt in (W8A8(), W4A16(), FireQW4A8()):
  register_format(_fmt, FORMATS)
del _fmt
