"""`QTensor`: a quantized weight that stands in for a float one.

A weight ``w [K, *out]`` (the model computes ``x @ w`` over K) is stored as a
2-D quantized matrix ``[K', N]`` with ``N = prod(out)`` plus its scales (and
offsets), in the layouts the `pallas_kernels.quantized_matmul` kernels take.
``K' = K + k_pad``: when the group size does not divide K, K may be zero-padded
(``pad_k=True``); the padding rows are stored (and counted in `num_bytes`) and
the activations are zero-padded to match at run time.

What the parts mean, how they are made and read back, and which op multiplies by
them is the business of the QTensor's `format` (`jaxllm.quant.formats`); the
QTensor holds the arrays and the float weight's shape.

Every part keeps the original's logical axis names (K's name for rows, the
major output name for columns), so a QTensor shards exactly like the weight it
replaces: the same rules table applies unchanged.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm.quant.formats import WeightFormat, get_format

_WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
_PART_NAMES = ("values", "scales", "offsets", "tensor_scale")


@flax.struct.dataclass
class QTensor:
  """Quantized weight. Array parts are pytree leaves; the rest is static.

  `values` and `scales` always, `offsets` and `tensor_scale` where the format has
  them (see each format's class in `jaxllm.quant.formats`). `format` is the
  `WeightFormat` object (hashable); `method` is its name.
  """

  values: jax.Array
  scales: jax.Array
  offsets: jax.Array | None = None
  tensor_scale: jax.Array | None = None
  format: WeightFormat | None = flax.struct.field(pytree_node=False, default=None)
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # float weight's
  contract_dims: int = flax.struct.field(pytree_node=False, default=1)  # leading dims forming K
  k_pad: int = flax.struct.field(pytree_node=False, default=0)  # zero rows appended to K

  def __post_init__(self):
    if not isinstance(self.format, WeightFormat):
      raise TypeError(
        f"QTensor format must be a jaxllm.quant.formats.WeightFormat, got {self.format!r}"
      )

  @property
  def method(self) -> str:
    """The format's name (``w8a8``, ``w4a16``, ``fireq_w4a8``, ...)."""
    return self.format.name

  @property
  def parts(self) -> dict[str, jax.Array]:
    return {n: getattr(self, n) for n in _PART_NAMES if getattr(self, n) is not None}

  @property
  def num_bytes(self) -> int:
    """Exact storage: values (padding rows included), scales, offsets, tensor scale."""
    return self.format.num_bytes(self.parts)

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
    return self.format.dequantize(self.parts).astype(dtype)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The float weight this QTensor approximates, in its original shape."""
    return self.dequantize_padded(dtype)[: self.k].reshape(self.shape)

  # -- the `jaxllm.ops.QuantizedWeight` protocol ---------------------------------------

  @property
  def matmul_op(self) -> str:
    """The op (`pallas_kernels.registry`) that multiplies float rows by this weight.

    Raises:
      ValueError: a storage-only format (its `matmul_op` is None).
    """
    op = self.format.matmul_op
    if op is None:
      raise ValueError(
        f"weight format {self.method!r} has no matmul op (it only stores weights); "
        "dequantize() it or quantize to a format with one"
      )
    return op

  def matmul_operands(self, rows: jax.Array) -> tuple:
    """The matmul op's arguments for float rows [M, K]: rows zero-padded to K + k_pad."""
    x = jnp.pad(rows, ((0, 0), (0, self.k_pad))) if self.k_pad else rows
    return self.format.matmul_operands(self.parts, x)


def quantize(
  w: jax.Array,
  method: str | WeightFormat,
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
    method: a format name of `jaxllm.quant.formats.FORMATS`, or a `WeightFormat`.
    group_size: rows of K per scale for w4a16 (required) and fireq_w4a8 (None:
      one scale per output channel); ignored by w8a8.
    contract_dims: leading dims of `w` that form K.
    pad_k: zero-pad K up to a multiple of the group size (and of 2) instead of
      raising when it does not divide K; the padding is stored and counted.
    scale_dtype: storage of the scales, one of the format's `scale_dtypes`
      (default its first: f32 for w8a8/w4a16, float8_e4m3fn for fireq_w4a8).
    per_tensor_scale: fireq_w4a8 only: scales are stored relative to an f32
      per-tensor scale (FireQ); False stores them absolute, so small scales
      lose precision or underflow in FP8 (the ablation).
    clip_search: int4 formats only: per group (or channel), clip the range to the
      candidate (see `formats.clip_to_best_range`) with the least squared rounding error.

  Raises:
    ValueError: unknown format, unsupported weight or scale dtype, or a group
      size that does not divide K when `pad_k` is False.
  """
  fmt = get_format(method)
  if jnp.dtype(w.dtype).name not in _WEIGHT_DTYPES:
    raise ValueError(
      f"cannot quantize a weight of dtype {jnp.dtype(w.dtype).name}; "
      f"expected one of {', '.join(_WEIGHT_DTYPES)}"
    )
  if w.ndim <= contract_dims:
    raise ValueError(f"can only quantize a weight [*K, *out], got shape {tuple(w.shape)}")
  scale_dtype = scale_dtype or fmt.scale_dtypes[0]
  if scale_dtype not in fmt.scale_dtypes:
    raise ValueError(
      f"{fmt.name}: scale dtype {scale_dtype!r} is not supported; "
      f"expected one of {fmt.scale_dtypes}"
    )
  k = math.prod(w.shape[:contract_dims])
  w2 = jnp.asarray(w, jnp.float32).reshape(k, math.prod(w.shape[contract_dims:]))
  parts, k_pad = fmt.quantize(
    w2,
    group_size=group_size,
    pad_k=pad_k,
    scale_dtype=scale_dtype,
    per_tensor_scale=per_tensor_scale,
    clip_search=clip_search,
  )
  return QTensor(
    **parts, format=fmt, shape=tuple(w.shape), contract_dims=contract_dims, k_pad=k_pad
  )
