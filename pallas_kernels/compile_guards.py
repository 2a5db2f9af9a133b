"""Deliberately broken kernels, one per known trap, and their working twins.

Each trap passes interpret mode and export lowering but is rejected by a real chip
compiler (PALLAS_NOTES section 3). A `Guard` holds a broken form, the chips whose
compiler must reject it, a regex of the rejection, and the fixed form that must
build on the same chips (so a failure cannot come from the harness itself). The
chip checks (`make test-chips`) compile both and record the broken one as
failing; a broken form that builds fails the check.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import chips, registry
from pallas_kernels.compile_cases import Case, cases, sds
from pallas_kernels.quantized_matmul import common, w4a16


@dataclasses.dataclass(frozen=True)
class Guard:
  """A trap: `broken(chip)` and `fixed(chip)` each give ``(fn, case)`` to compile."""

  name: str
  trap: str
  chips: tuple[str, ...]
  expect: str  # regex the compiler's rejection of the broken form matches
  broken: Callable
  fixed: Callable


def _unpack_kernel(w_ref, o_ref, *, widen: bool):
  w = w_ref[...]
  if widen:  # the working form: shift after widening to int32
    w = w.astype(jnp.int32)
  low = jnp.right_shift(jnp.left_shift(w, 4), 4)  # sign-extended low nibble
  o_ref[...] = low.astype(jnp.float32)


def _unpack(widen: bool):
  def build(chip):
    del chip

    def fn(w):
      kernel = functools.partial(_unpack_kernel, widen=widen)
      return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(w.shape, jnp.float32))(w)

    return fn, Case("guard", "int8 [32, 128]", (sds((32, 128), jnp.int8),))

  return build


def _slice_kernel(x_ref, o_ref, *, lanes: int):
  def body(i, acc):
    start = pl.multiple_of(i * lanes, lanes)
    return acc + x_ref[:, pl.ds(start, lanes)]

  steps = x_ref.shape[1] // lanes
  o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros((8, lanes), jnp.float32))


def _dynamic_slice(lanes: int):
  """A loop over lane chunks of `lanes` at dynamic offsets (the trap `common.k_loop`
  avoids by unrolling when a K chunk is not a multiple of 128)."""

  def build(chip):
    del chip

    def fn(x):
      kernel = functools.partial(_slice_kernel, lanes=lanes)
      return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, lanes), jnp.float32))(x)

    label = f"f32 [8, 512], {lanes}-lane dynamic slices"
    return fn, Case("guard", label, (sds((8, 512), jnp.float32),))

  return build


def _fireq_on(variant: str):
  """The FireQ Triton kernel forced into `variant`, past its `supports()`."""

  def build(chip):
    impl = registry.get("w4a8_fireq_matmul").get("triton")
    case = cases("w4a8_fireq_matmul", ("smollm2",))[0]
    platform = chips.platform_of(chip)
    return functools.partial(impl.fn, variant=variant, platform=platform), case

  return build


# Llama-3-8B's down projection with f32 activations: a whole-K block of 512 rows.
_VMEM_CASE = Case(
  "guard",
  "w4a16 f32 M=512 K=14336 N=4096 g128",
  (
    sds((512, 14336), jnp.float32),
    sds((7168, 4096), jnp.int8),
    sds((112, 4096), jnp.float32),
    sds((112, 4096), jnp.float32),
  ),
)


def _w4a16_blocks(block_m: int, block_n: int, lift_vmem_check: bool):
  """W4A16 on `_VMEM_CASE` with fixed blocks under the chip's VMEM limit; the broken
  form lifts that limit far above the chip's VMEM, since the kernel's own block check
  would otherwise refuse it before lowering."""

  def build(chip):
    params = common.tpu_params(chip.onchip_bytes)
    if lift_vmem_check:
      params = dataclasses.replace(params, vmem_limit_bytes=1 << 30)
    blocks = w4a16.BlockSizes(block_m=block_m, block_n=block_n)

    def fn(*args):
      return w4a16.w4a16_matmul(*args, block_sizes=blocks, compiler_params=params)

    return fn, _VMEM_CASE

  return build


GUARDS = (
  Guard(
    "int8_vector_shift",
    "int4 unpacking with shifts on int8 vectors",
    ("tpu_v4", "tpu_v5e", "tpu_v6e", "tpu_7x"),
    r"failed to legalize operation 'arith\.(shli|shrsi)'",
    _unpack(widen=False),
    _unpack(widen=True),
  ),
  Guard(
    "fp8_dot_on_sm80",
    "an fp8 dot on a chip without fp8 (FireQ's fp8_dot variant on sm80)",
    ("sm80",),
    r"f8e4m3nv is only supported on compute capability >= 89",
    _fireq_on("fp8_dot"),
    _fireq_on("bf16_inputs"),
  ),
  Guard(
    "unaligned_dynamic_slice",
    "a dynamic lane slice of 64 f32 lanes (not provably 128-aligned)",
    ("tpu_v4", "tpu_v5e", "tpu_v6e", "tpu_7x"),
    r"cannot statically prove|E2003",
    _dynamic_slice(64),
    _dynamic_slice(128),
  ),
  Guard(
    "block_too_large_for_vmem",
    "a 512-row whole-K f32 block on TPU v4's 16 MiB VMEM",
    ("tpu_v4",),
    r"vmem|VMEM",
    _w4a16_blocks(512, 512, lift_vmem_check=True),
    _w4a16_blocks(64, 128, lift_vmem_check=False),
  ),
)
