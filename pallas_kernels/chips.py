"""What each accelerator can build and how fast it moves bytes: the chip table.

A `Chip` is data: the dtypes its matrix units take natively, the dtypes its
compiler rejects in a kernel, its on-chip memory and its HBM bandwidth. Kernels
read it at trace time (through `chip_of(platform)`) to pick a variant: an int8 or
fp8 dot where the chip has one, a dot of dequantized bf16 values where it has not.
`supports()` functions read it to refuse, by design and with the chip's name and
the dtype, what the compiler would reject.

Sources of the figures:
  * TPU native dtypes, VMEM per core and HBM bandwidth: jax 0.10.2's
    ``jax/_src/pallas/mosaic/tpu_info.py`` (`TpuInfo`); rejected dtypes: libtpu
    0.0.42.1 compile-only topologies (Mosaic E2001 for int8 and fp8 operands on v4),
    re-checked by `make test-chips`.
  * GPU: fp8 (e4m3) needs compute capability >= 8.9 (Triton: "Conversion from/to
    f8e4m3nv is only supported on compute capability >= 89", re-checked by `make
    test-chips` on sm80); shared memory per block from NVIDIA's CUDA C programming
    guide (compute capabilities table); HBM bandwidth from each product's data sheet.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from pallas_kernels.op_api import Platform

BF16, INT8, FP8 = "bfloat16", "int8", "float8_e4m3fn"
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator generation.

  Attributes:
    name: short name used in tables ("tpu_v4", "tpu_v5e", "sm80", ...).
    backend: "tpu" or "gpu".
    native_dots: matmul operand dtypes the matrix units run at full rate.
    rejected: dtypes the compiler rejects as matmul operands on this chip.
    rejected_values: dtypes a kernel may not hold at all, not even to convert them
      (fp8 on CUDA chips before sm89; none on TPU, where v4 converts fp8 fine).
    onchip_bytes: TPU VMEM per core; GPU shared memory per block (opt-in maximum).
    hbm_bytes_per_s: peak HBM bandwidth (None where the product is not known).
    topology: libtpu's compile-only topology name (TPU), or None.
    compute_capability: (major, minor) for GPUs.
  """

  name: str
  backend: str
  native_dots: frozenset
  rejected: frozenset
  onchip_bytes: int
  rejected_values: frozenset = frozenset()
  hbm_bytes_per_s: float | None = None
  topology: str | None = None
  compute_capability: tuple[int, int] | None = None

  def rejects(self, dtype) -> bool:
    """Whether this chip's compiler rejects `dtype` (a dtype or its name) as a matmul operand."""
    return jnp.dtype(dtype).name in self.rejected

  def rejects_values(self, dtype) -> bool:
    """Whether a kernel on this chip may not hold `dtype` values at all."""
    return jnp.dtype(dtype).name in self.rejected_values

  def native(self, dtype) -> bool:
    return jnp.dtype(dtype).name in self.native_dots

  def rejection(self, what: str, dtype) -> str | None:
    """None when `dtype` is allowed, else a reason naming the chip and the dtype."""
    if not self.rejects(dtype):
      return None
    name = jnp.dtype(dtype).name
    if self.backend == "tpu":
      return f"{self.name} has no {name} matrix-unit operands ({what}; Mosaic E2001)"
    return f"{self.name} has no {name} support ({what}; fp8 needs sm89 or newer)"


def _tpu(name, native, rejected, vmem_mib, hbm, topology):
  return Chip(
    name, "tpu", frozenset(native), frozenset(rejected), vmem_mib * MiB, frozenset(), hbm, topology
  )


# jax device_kind -> chip. v5p and v4i exist in jax's table but are not checked here.
TPU_CHIPS = {
  "TPU v4": _tpu("tpu_v4", (BF16,), (INT8, FP8), 16, 1.2e12, "v4:1x1x1"),
  "TPU v5 lite": _tpu("tpu_v5e", (BF16, INT8), (), 128, 8.2e11, "v5e:1x1"),
  "TPU v6 lite": _tpu("tpu_v6e", (BF16, INT8, FP8), (), 128, 1.64e12, "v6e:1x1"),
  "TPU7x": _tpu("tpu_7x", (BF16, FP8), (), 64, 7.37e12, "tpu7x:1x1x1"),
}
TPU_ALIASES = {"TPU v5e": "TPU v5 lite", "TPU v6e": "TPU v6 lite"}


def gpu_chip(major: int, minor: int, hbm_bytes_per_s: float | None = None) -> Chip:
  """A CUDA chip from its compute capability (fp8 from 8.9 on)."""
  cc = (major, minor)
  fp8 = cc >= (8, 9)
  smem = 163 if cc == (8, 0) else 99 if cc < (9, 0) else 227  # KiB per block, opt-in
  return Chip(
    f"sm{major}{minor}",
    "gpu",
    frozenset((BF16, INT8, FP8) if fp8 else (BF16, INT8)),
    frozenset(() if fp8 else (FP8,)),
    smem * 1024,
    frozenset(() if fp8 else (FP8,)),
    hbm_bytes_per_s,
    compute_capability=cc,
  )


# Known products: a substring of jax's device_kind -> (compute capability, HBM bytes/s);
# the first listed substring found wins.
GPU_PRODUCTS = {
  "A100-SXM4-80GB": ((8, 0), 2.039e12),
  "A100": ((8, 0), 1.555e12),
  "A10G": ((8, 6), 6.0e11),
  "L40S": ((8, 9), 8.64e11),
  "L4": ((8, 9), 3.0e11),
  "H100 PCIe": ((9, 0), 2.0e12),
  "H100": ((9, 0), 3.35e12),
  "GH200": ((9, 0), 4.0e12),  # before "H200", which it contains
  "H200": ((9, 0), 4.8e12),
}
# The chips `make test-chips` compiles for (Triton targets by compute capability).
CHECKED_GPUS = (gpu_chip(8, 0), gpu_chip(8, 9), gpu_chip(9, 0))
CHECKED_TPUS = tuple(TPU_CHIPS.values())
CHECKED = CHECKED_TPUS + CHECKED_GPUS


def _parse_cc(text: str) -> tuple[int, int] | None:
  m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text or "")
  if m:
    return int(m.group(1)), int(m.group(2))
  m = re.fullmatch(r"sm_?(\d)(\d)", text or "")
  return (int(m.group(1)), int(m.group(2))) if m else None


def chip_of(platform) -> Chip | None:
  """The chip of an `op_api.Platform`; None for CPU and for a chip this table does not know.

  A GPU is identified by its compute capability (`Platform.compute_capability`,
  "9.0", or a device kind spelled "sm90") and, where the product is listed, gets
  its HBM bandwidth; a TPU by its jax device kind.
  """
  kind = platform.device_kind
  if platform.backend == "tpu":
    return TPU_CHIPS.get(TPU_ALIASES.get(kind, kind))
  if platform.backend != "gpu":
    return None
  cc = _parse_cc(getattr(platform, "compute_capability", "")) or _parse_cc(kind)
  hbm = None
  for product, (product_cc, bandwidth) in GPU_PRODUCTS.items():
    if product in kind:
      cc, hbm = cc or product_cc, bandwidth
      break
  return gpu_chip(*cc, hbm) if cc else None


def chip_named(name: str) -> Chip:
  """A checked chip by its short name ("tpu_v4", "sm80", ...); ValueError otherwise."""
  for chip in CHECKED:
    if chip.name == name:
      return chip
  raise ValueError(f"unknown chip {name!r}; checked chips: {[c.name for c in CHECKED]}")


def platform_of(chip: Chip, interpret: bool = False):
  """The `op_api.Platform` a compile-only check for `chip` runs on."""
  if chip.backend == "tpu":
    kind = next(k for k, c in TPU_CHIPS.items() if c is chip)
    return Platform("tpu", kind, interpret)
  major, minor = chip.compute_capability
  return Platform("gpu", chip.name, interpret, f"{major}.{minor}")
