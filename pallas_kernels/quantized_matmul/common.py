"""Shared helpers for the quantized matmul kernels: int4 packing, block choice, checks.

Int4 packing layout ("global halves"), used by every int4 variant here:
a weight `q` of shape [K, N] is stored as int8 `packed` of shape [K/2, N] with

  packed[j, n] = (q[j, n] & 0xF) | (q[j + K/2, n] << 4)

so the low nibbles hold the first half of K and the high nibbles the second half.
A kernel then computes `x[:, :K/2] @ lo + x[:, K/2:] @ hi` with two dots per K
chunk and never needs to interleave rows (interleaving needs stack/concat, which
Triton rejects). Nibbles are always unpacked after widening to int32 (shifts on
int8 vectors do not legalize in Mosaic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

from pallas_kernels._util import is_pow2, next_pow2

_VMEM_LIMIT_BYTES = 64 << 20
FP8_E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # largest finite float8_e4m3fn


def is_triton(compiler_params) -> bool:
  """Whether `compiler_params` selects the Triton backend."""
  return isinstance(compiler_params, pltr.CompilerParams)


def default_compiler_params(compiler_params):
  """The caller's parameters, else Triton's on a GPU backend, else Mosaic TPU's.

  CPU (interpret mode, and export for another platform) gets the TPU defaults, so
  block choices there follow TPU rules unless Triton parameters are passed.
  """
  if compiler_params is not None:
    return compiler_params
  if jax.default_backend() in ("gpu", "cuda", "rocm"):
    return triton_params()
  return tpu_params()


def tpu_params(vmem_bytes: int | None = None):
  """Mosaic TPU compiler parameters: both grid axes parallel, a raised VMEM limit.

  The limit is 64 MiB, or the chip's VMEM (`vmem_bytes`) where that is smaller (TPU
  v4: 16 MiB). The kernels read it back as their block budget (`fit_blocks`).
  """
  limit = _VMEM_LIMIT_BYTES if vmem_bytes is None else min(_VMEM_LIMIT_BYTES, vmem_bytes)
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=limit)


def triton_params(num_warps: int = 4, num_stages: int = 2):
  """Triton compiler parameters for `compiler_params=` (GPU export)."""
  return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pick_block_m(m: int, block_m: int | None) -> int:
  """Rows per block: a power of two in [16, 128] (Triton dots need >= 16)."""
  if block_m is not None:
    return block_m
  return min(128, max(16, next_pow2(m)))


def pick_block_n(n: int, block_n: int | None, triton: bool) -> int:
  """Output columns per block; must divide N (N is never padded)."""
  if block_n is not None:
    return block_n
  cands = (128, 64, 32, 16) if triton else (256, 128)
  for c in cands:
    if n % c == 0:
      return c
  return n


def pick_chunk(length: int, chunk: int | None, triton: bool) -> int:
  """Length of one fori_loop step along K; must divide `length`."""
  if chunk is not None:
    if triton and not is_pow2(chunk):
      raise ValueError(f"Triton needs a power-of-2 block_k, got {chunk} (K part {length})")
    return chunk
  cands = (256, 128, 64, 32, 16) if triton else (512, 256, 128)
  for c in cands:
    if length % c == 0:
      return c
  if triton:
    raise ValueError(f"no power-of-2 K chunk divides {length}; pass block_sizes.block_k")
  return length


def tile_bytes(shape, dtype) -> int:
  """VMEM bytes of one block on TPU: the last two dims padded to the (sublane, 128) tile.

  A sublane tile holds 8 rows of 32-bit values (16 of bf16, 32 of int8).
  """
  itemsize = jnp.dtype(dtype).itemsize
  *lead, rows, cols = (1, *shape) if len(shape) == 1 else shape
  sublanes = 8 * max(1, 4 // itemsize)
  count = round_up(rows, sublanes) * round_up(cols, 128)
  for d in lead:
    count *= d
  return count * itemsize


def vmem_estimate(blocks, temporaries: int = 0) -> int:
  """Bytes of VMEM a kernel step needs: its blocks (`(shape, dtype)` pairs) with a
  quarter more for pipelining buffers, plus in-kernel temporaries. Calibrated on
  libtpu compiles (TPU v4, W4A16 at K=14336: 16.2 MiB used where this gives 18.7)."""
  return int(1.25 * sum(tile_bytes(shape, dtype) for shape, dtype in blocks)) + temporaries


def vmem_limit(compiler_params) -> int | None:
  """The VMEM budget in Mosaic compiler parameters (None for Triton)."""
  return None if is_triton(compiler_params) else compiler_params.vmem_limit_bytes


def fit_blocks(name: str, m: int, n: int, bs, triton: bool, compiler_params, need) -> tuple:
  """(block_m, block_n, padded M) for an (M/bm, N/bn) grid, checked against the rules.

  On TPU the default blocks shrink (block_m first, then block_n, halving) until
  `need(bm, bn)` bytes fit the VMEM limit in `compiler_params`; blocks the caller
  chose are never changed, and blocks that cannot fit raise a ValueError naming the
  bytes and the limit.
  """
  bm = pick_block_m(m, bs.block_m)
  bn = pick_block_n(n, bs.block_n, triton)
  limit = vmem_limit(compiler_params)
  if limit is not None:
    while need(bm, bn) > limit and bs.block_m is None and bm > 8:
      bm //= 2
    while need(bm, bn) > limit and bs.block_n is None and bn % 256 == 0:
      bn //= 2
    if need(bm, bn) > limit:
      raise ValueError(
        f"{name}: blocks block_m={bm}, block_n={bn} need ~{need(bm, bn) / 2**20:.1f} MiB of "
        f"VMEM; the limit is {limit / 2**20:.0f} MiB"
      )
  m_pad = round_up(m, bm)
  check_blocks(name, m_pad, n, bm, bn, triton)
  return bm, bn, m_pad


def check_blocks(name: str, m_pad: int, n: int, bm: int, bn: int, triton: bool) -> None:
  """Validate block sizes against the array shapes and backend rules."""
  if bm % 8 or m_pad % bm:
    raise ValueError(f"{name}: block_m={bm} must be a multiple of 8 dividing padded M={m_pad}")
  if n % bn:
    raise ValueError(f"{name}: block_n={bn} must divide N={n}")
  if not triton and bn % 128 and bn != n:
    raise ValueError(f"{name}: block_n={bn} must be a multiple of 128 or N={n} (TPU (8,128) rule)")
  if triton and not (is_pow2(bm) and is_pow2(bn) and bm >= 16 and bn >= 16):
    raise ValueError(f"{name}: Triton needs power-of-2 blocks >= 16, got block_m={bm} block_n={bn}")


def check_array(name: str, arg: str, arr) -> None:
  """Raise TypeError unless `arr` is an array (a jax or numpy array, or a tracer),
  and ValueError if a dimension has size 0 (M=0 rows, say): Pallas cannot tile it."""
  if not (hasattr(arr, "shape") and hasattr(arr, "dtype")):
    raise TypeError(f"{name}: {arg} must be a jax or numpy array, got {type(arr).__name__}")
  shape = tuple(arr.shape)
  if 0 in shape:
    raise ValueError(f"{name}: {arg} has shape {shape}; every dimension must be >= 1")


def check_dtype(name: str, arg: str, arr, allowed) -> None:
  """Raise ValueError unless the dtype of `arr` (an array or a dtype) is in `allowed`."""
  dt = jnp.dtype(arr) if isinstance(arr, (type, str, jnp.dtype)) else jnp.dtype(arr.dtype)
  if dt not in [jnp.dtype(d) for d in allowed]:
    names = ", ".join(jnp.dtype(d).name for d in allowed)
    raise ValueError(f"{name}: {arg} has dtype {dt.name}; expected one of {names}")


def check_shape(name: str, arg: str, arr, shape) -> None:
  """Raise ValueError unless `arr.shape == shape`."""
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"{name}: {arg} has shape {tuple(arr.shape)}; expected {tuple(shape)}")


def pad_rows(x: jax.Array, m_pad: int) -> jax.Array:
  """Zero-pad the leading dim of a 2-D array to `m_pad` rows."""
  if x.shape[0] == m_pad:
    return x
  return jnp.pad(x, ((0, m_pad - x.shape[0]), (0, 0)))


def pack_int4(q: jax.Array) -> jax.Array:
  """Pack int4 values [K, N] (signed [-8,7] or unsigned [0,15]) into int8 [K/2, N]."""
  k = q.shape[0]
  if k % 2:
    raise ValueError(f"pack_int4: K={k} must be even (shape {tuple(q.shape)})")
  q = q.astype(jnp.int32)
  lo, hi = q[: k // 2], q[k // 2 :]
  packed = (lo & 0xF) | ((hi & 0xF) << 4)
  return jnp.where(packed > 127, packed - 256, packed).astype(jnp.int8)


def unpack_int4(packed: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
  """Split packed int8 nibbles (any shape) into (low, high) int32 arrays.

  Works on values inside kernels as well as in jnp references.

  Args:
    packed: int8 or uint8 array of packed nibbles.
    signed: decode nibbles as two's-complement [-8, 7] instead of [0, 15].

  Returns:
    (low, high) int32 arrays with the shape of `packed`.
  """
  p = packed.astype(jnp.int32)
  if signed:
    lo = jnp.left_shift(p, 28) >> 28
    hi = jnp.left_shift(p, 24) >> 28
  else:
    lo = p & 0xF
    hi = (p >> 4) & 0xF
  return lo, hi


def unpack_int4_full(packed: jax.Array, signed: bool) -> jax.Array:
  """Inverse of `pack_int4`: [K/2, N] packed -> [K, N] int32 (jnp only)."""
  lo, hi = unpack_int4(packed, signed)
  return jnp.concatenate([lo, hi], axis=0)


def k_loop(n_steps: int, chunk: int, body, init, triton: bool = False):
  """Run `body(i, carry)` for i in [0, n_steps): a `fori_loop`, or unrolled when needed.

  Mosaic TPU can only load at dynamic lane offsets it can prove 128-aligned (E2003
  otherwise), so when `chunk` is not a multiple of 128 (e.g. group 32 at SmolLM2's
  K=576) the loop is unrolled in Python and every slice start is static. Triton
  loads at any offset, so its loop is never unrolled.
  """
  if triton or chunk % 128 == 0:
    return jax.lax.fori_loop(0, n_steps, body, init)
  carry = init
  for i in range(n_steps):
    carry = body(i, carry)
  return carry


def chunk_start(i, chunk: int):
  """Start of chunk `i`: static for a Python int, else hinted as a multiple of `chunk`."""
  if isinstance(i, int):
    return i * chunk
  return pl.multiple_of(i * chunk, chunk)
