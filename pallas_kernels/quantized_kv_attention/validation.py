"""Input checks shared by the kernels; every failure is a ValueError naming the
shape/dtype, or a TypeError naming an argument that is not an array."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .packing import QuantizedKV, pack_factor


@dataclasses.dataclass(frozen=True)
class Dims:
  """Static sizes of a validated call."""

  batch: int
  num_q_heads: int
  num_kv_heads: int
  group: int  # query heads per kv head
  head_dim: int
  num_tokens: int  # quantized slots T
  residual: int  # residual slots R (0 when absent)
  pack: int  # codes per uint8


def _check_array(name, x):
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(f"{name} must be a jax or numpy array, got {type(x).__name__}")


def _check_float(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array, got dtype {x.dtype} (shape {x.shape})")


def _check_shape(name, x, want):
  if tuple(x.shape) != tuple(want):
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(want)}")


def validate(q, kv: QuantizedKV, k_residual, v_residual, bits: int, group_size: int) -> Dims:
  """Checks shapes/dtypes of a decode call against the packed layout.

  Args:
    q: ``(B, Hq, D)`` float.
    kv: ``QuantizedKV`` with leading dims ``(B, Hkv)``.
    k_residual: ``None`` or float ``(B, Hkv, R, D)``.
    v_residual: ``None`` or float ``(B, Hkv, R, D)``.
    bits: 2, 4 or 8.
    group_size: key quant group in tokens.

  Returns:
    The call's ``Dims``.

  Raises:
    TypeError: an argument is not an array, or `kv` not a ``QuantizedKV``.
    ValueError: on any mismatch, or an empty batch, head or cache dimension.
  """
  pf = pack_factor(bits)
  _check_array("q", q)
  if not isinstance(kv, QuantizedKV):
    raise TypeError(f"kv must be a QuantizedKV, got {type(kv).__name__}")
  for name, x in zip(QuantizedKV._fields, kv):
    _check_array(name, x)
  for name, x in (("k_residual", k_residual), ("v_residual", v_residual)):
    if x is not None:
      _check_array(name, x)
  if q.ndim != 3:
    raise ValueError(f"q must be (B, Hq, D), got shape {q.shape}")
  _check_float("q", q)
  b, hq, d = q.shape
  if 0 in q.shape:
    raise ValueError(f"q has shape {tuple(q.shape)}; batch, heads and head_dim must be >= 1")
  kp = kv.k_packed
  if kp.ndim != 4:
    raise ValueError(f"k_packed must be (B, Hkv, T/{pf}, D), got shape {kp.shape}")
  hkv = kp.shape[1]
  if hkv == 0 or hq % hkv:
    raise ValueError(
      f"GQA mismatch: q has {hq} heads (shape {q.shape}), k_packed has {hkv} kv heads (shape {kp.shape})"
    )
  if d % pf or d < pf:
    raise ValueError(
      f"head_dim {d} (q shape {q.shape}) is not a multiple of {pf}, needed to pack {bits}-bit values"
    )
  if group_size <= 0 or group_size % (8 * pf):
    raise ValueError(
      f"group_size {group_size} must be a positive multiple of {8 * pf} for {bits}-bit keys"
    )
  t = kp.shape[2] * pf
  if t == 0:
    raise ValueError(f"k_packed has shape {tuple(kp.shape)}: an empty cache (T=0)")
  if t % group_size:
    raise ValueError(
      f"cache length T={t} (k_packed shape {kp.shape}) is not a multiple of group_size {group_size}"
    )
  for name, x in (("k_packed", kp), ("v_packed", kv.v_packed)):
    if x.dtype != jnp.uint8:
      raise ValueError(f"{name} must be uint8, got dtype {x.dtype} (shape {x.shape})")
  _check_shape("k_packed", kp, (b, hkv, t // pf, d))
  _check_shape("v_packed", kv.v_packed, (b, hkv, t, d // pf))
  for name in ("k_scale", "k_zero"):
    x = getattr(kv, name)
    _check_float(name, x)
    _check_shape(name, x, (b, hkv, t // group_size, d))
  for name in ("v_scale", "v_zero"):
    x = getattr(kv, name)
    _check_float(name, x)
    _check_shape(name, x, (b, hkv, t))
  r = 0
  if (k_residual is None) != (v_residual is None):
    raise ValueError("k_residual and v_residual must be given together")
  if k_residual is not None:
    if k_residual.ndim != 4:
      raise ValueError(f"k_residual must be (B, Hkv, R, D), got shape {k_residual.shape}")
    r = k_residual.shape[2]
    for name, x in (("k_residual", k_residual), ("v_residual", v_residual)):
      _check_float(name, x)
      _check_shape(name, x, (b, hkv, r, d))
    if r == 0:
      raise ValueError(f"residual window is empty (shape {k_residual.shape}); pass None instead")
  return Dims(b, hq, hkv, hq // hkv, d, t, r, pf)


def validate_block(dims: Dims, block_t: int, group_size: int) -> None:
  """Checks that ``block_t`` tiles the cache and meets the TPU (8, 128) block rule."""
  t = dims.num_tokens
  if block_t % group_size:
    raise ValueError(f"block_t {block_t} is not a multiple of group_size {group_size}")
  if t % block_t:
    raise ValueError(f"cache length T={t} is not a multiple of block_t {block_t}")
  if block_t % 128 and block_t != t:
    raise ValueError(f"block_t {block_t} must be a multiple of 128 or equal T={t} (TPU block rule)")
