"""KIVI-style asymmetric quantization of a KV cache and its packed layouts.

Keys are quantized per channel over groups of ``group_size`` tokens; values per
token. Both are asymmetric: ``x ~= code * scale + zero`` with ``zero`` the group
minimum, ``code`` in ``[0, 2**bits - 1]``.

Packed layouts (``pf = 8 // bits`` codes per ``uint8``):

* Keys ``(..., T // pf, D)``: packed along tokens, one quant group at a time.
  Within group ``g``, packed row ``r`` holds in bit slot ``j`` the token
  ``g * group_size + j * (group_size // pf) + r``. A group therefore packs on
  its own (a cache can append whole groups), and unpacking slot ``j`` of a
  group gives ``group_size // pf`` consecutive tokens.
* Values ``(..., T, D // pf)``: packed along channels. Lane ``c`` holds in slot
  ``j`` the channel ``j * (D // pf) + c``, so slot ``j`` is a contiguous
  channel slab.

Scales/zeros: keys ``(..., T // group_size, D)``, values ``(..., T)``; float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SUPPORTED_BITS = (2, 4, 8)


class QuantizedKV(NamedTuple):
  """A packed quantized K/V pair (arrays only; bits/group_size travel separately).

  Attributes:
    k_packed: uint8 ``(..., T // pf, D)``.
    k_scale: float ``(..., T // group_size, D)``.
    k_zero: float ``(..., T // group_size, D)``.
    v_packed: uint8 ``(..., T, D // pf)``.
    v_scale: float ``(..., T)``.
    v_zero: float ``(..., T)``.
  """

  k_packed: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  v_packed: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array


def pack_factor(bits: int) -> int:
  """Number of ``bits``-wide codes per uint8."""
  check_bits(bits)
  return 8 // bits


def check_bits(bits: int) -> None:
  """Raises ValueError unless ``bits`` is one of 2, 4, 8."""
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _asym_quantize(x: jax.Array, bits: int, axis: int):
  """Min/max asymmetric quantization along ``axis``; returns codes, scale, zero."""
  x = x.astype(jnp.float32)
  lo = jnp.min(x, axis=axis, keepdims=True)
  hi = jnp.max(x, axis=axis, keepdims=True)
  qmax = float(2**bits - 1)
  scale = jnp.where(hi > lo, (hi - lo) / qmax, 1.0)
  codes = jnp.clip(jnp.round((x - lo) / scale), 0, qmax).astype(jnp.uint8)
  return codes, scale, lo


def _pack_slots(codes: jax.Array, bits: int, slot_axis: int) -> jax.Array:
  """ORs the codes along ``slot_axis`` (size pf) into one uint8, slot j at bit j*bits."""
  pf = codes.shape[slot_axis]
  out = jnp.zeros(codes.shape[:slot_axis] + codes.shape[slot_axis + 1 :], jnp.uint8)
  for j in range(pf):
    part = jnp.take(codes, j, axis=slot_axis).astype(jnp.uint8)
    out = out | (part << (bits * j)).astype(jnp.uint8)
  return out


def _unpack_slots(packed: jax.Array, bits: int, slot_axis: int) -> jax.Array:
  """Inverse of ``_pack_slots``: inserts a new ``slot_axis`` of size pf."""
  pf = 8 // bits
  mask = (1 << bits) - 1
  x = packed.astype(jnp.int32)
  parts = [(x >> (bits * j)) & mask for j in range(pf)]
  return jnp.stack(parts, axis=slot_axis)


def quantize_keys(k: jax.Array, bits: int, group_size: int):
  """Quantizes keys per channel over token groups and packs them along tokens.

  Args:
    k: float ``(..., T, D)``; ``T`` a multiple of ``group_size``.
    bits: 2, 4 or 8.
    group_size: tokens per quant group; a multiple of ``8 // bits``.

  Returns:
    ``(k_packed (..., T // pf, D) uint8, scale, zero)``, scale/zero
    ``(..., T // group_size, D)`` float32.
  """
  pf = pack_factor(bits)
  *lead, t, d = k.shape
  if group_size <= 0 or group_size % pf:
    raise ValueError(
      f"group_size must be a positive multiple of {pf} for {bits}-bit, got {group_size}"
    )
  if t % group_size:
    raise ValueError(
      f"keys token axis {t} (shape {k.shape}) is not a multiple of group_size {group_size}"
    )
  ng = t // group_size
  kg = k.reshape(*lead, ng, group_size, d)
  codes, scale, zero = _asym_quantize(kg, bits, axis=-2)
  codes = codes.reshape(*lead, ng, pf, group_size // pf, d)
  packed = _pack_slots(codes, bits, slot_axis=len(lead) + 1)
  return (
    packed.reshape(*lead, t // pf, d),
    scale.reshape(*lead, ng, d),
    zero.reshape(*lead, ng, d),
  )


def dequantize_keys(k_packed, k_scale, k_zero, bits: int, group_size: int) -> jax.Array:
  """Inverse of ``quantize_keys`` up to rounding; returns float32 ``(..., T, D)``."""
  pf = pack_factor(bits)
  *lead, tp, d = k_packed.shape
  ng = tp * pf // group_size
  rows = group_size // pf
  codes = _unpack_slots(k_packed.reshape(*lead, ng, rows, d), bits, slot_axis=len(lead) + 1)
  codes = codes.astype(jnp.float32)  # (..., ng, pf, rows, d)
  scale = k_scale.astype(jnp.float32)[..., :, None, None, :]
  zero = k_zero.astype(jnp.float32)[..., :, None, None, :]
  return (codes * scale + zero).reshape(*lead, ng * group_size, d)


def quantize_values(v: jax.Array, bits: int):
  """Quantizes values per token and packs them along channels.

  Args:
    v: float ``(..., T, D)``; ``D`` a multiple of ``8 // bits``.
    bits: 2, 4 or 8.

  Returns:
    ``(v_packed (..., T, D // pf) uint8, scale (..., T), zero (..., T))``.
  """
  pf = pack_factor(bits)
  *lead, t, d = v.shape
  if d % pf:
    raise ValueError(
      f"values head_dim {d} (shape {v.shape}) is not a multiple of {pf} for {bits}-bit"
    )
  codes, scale, zero = _asym_quantize(v, bits, axis=-1)
  codes = codes.reshape(*lead, t, pf, d // pf)
  packed = _pack_slots(codes, bits, slot_axis=len(lead) + 1)
  return packed, scale[..., 0], zero[..., 0]


def dequantize_values(v_packed, v_scale, v_zero, bits: int) -> jax.Array:
  """Inverse of ``quantize_values`` up to rounding; returns float32 ``(..., T, D)``."""
  check_bits(bits)
  *lead, t, dp = v_packed.shape
  codes = _unpack_slots(v_packed, bits, slot_axis=len(lead) + 1).astype(jnp.float32)
  codes = codes.reshape(*lead, t, -1)
  return codes * v_scale.astype(jnp.float32)[..., None] + v_zero.astype(jnp.float32)[..., None]


def quantize_kv(k: jax.Array, v: jax.Array, bits: int, group_size: int) -> QuantizedKV:
  """Quantizes and packs a float K/V pair (KIVI: K per channel, V per token).

  Args:
    k: float ``(..., T, D)``.
    v: float ``(..., T, D)``.
    bits: 2, 4 or 8.
    group_size: key quant group (tokens).

  Returns:
    A ``QuantizedKV``.
  """
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  return QuantizedKV(*quantize_keys(k, bits, group_size), *quantize_values(v, bits))


def dequantize_kv(kv: QuantizedKV, bits: int, group_size: int):
  """Float32 ``(k, v)`` reconstructed from a ``QuantizedKV``."""
  k = dequantize_keys(kv.k_packed, kv.k_scale, kv.k_zero, bits, group_size)
  v = dequantize_values(kv.v_packed, kv.v_scale, kv.v_zero, bits)
  return k, v


def unpack_slot(x: jax.Array, bits: int, j: int) -> jax.Array:
  """Bit slot `j` of int32 packed codes as float32 (the kernels' in-register unpack)."""
  if bits == 8:
    return x.astype(jnp.float32)
  return ((x >> (bits * j)) & ((1 << bits) - 1)).astype(jnp.float32)


def unpack_along(packed: jax.Array, bits: int, axis: int) -> jax.Array:
  """int32 codes of `packed`, unpacked along `axis` (size n, which grows to n * pf):
  slot j of packed entry r is element ``j * n + r`` (the layouts above)."""
  if bits == 8:
    return packed.astype(jnp.int32)
  axis = axis % packed.ndim
  codes = _unpack_slots(packed, bits, axis)
  return codes.reshape(*packed.shape[:axis], -1, *packed.shape[axis + 1 :])


def pack_along(codes: jax.Array, bits: int, axis: int) -> jax.Array:
  """uint8 codes (each < 2**bits) packed along `axis` (size n, a multiple of pf, which
  shrinks to n / pf): element ``j * (n / pf) + r`` goes to bit slot j of packed entry r
  (the layouts above). The inverse of `unpack_along`."""
  pf = pack_factor(bits)
  if pf == 1:
    return codes.astype(jnp.uint8)
  axis = axis % codes.ndim
  n = codes.shape[axis]
  if n % pf:
    raise ValueError(
      f"cannot pack {bits}-bit codes of shape {tuple(codes.shape)} along axis {axis}: "
      f"its size {n} is not a multiple of {pf}"
    )
  split = codes.reshape(*codes.shape[:axis], pf, n // pf, *codes.shape[axis + 1 :])
  return _pack_slots(split, bits, axis)
