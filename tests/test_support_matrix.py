"""The chip table, per-chip variants, VMEM-fitted blocks and the committed support matrix.

Runs in the default suite (no libtpu or triton): variants and refusals are decided
from the chip table before anything is compiled, and the variants' numerics are
checked in interpret mode. The compiles themselves are `tests/test_chips.py`.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import chips, compile_cases, compile_guards, registry
from pallas_kernels.op_api import Platform, UnsupportedError
from pallas_kernels.quantized_matmul import common, quantize_w4_fireq, quantize_w8
from pallas_kernels.quantized_matmul import w4a16 as w4a16_kernel

MATRIX = os.path.join(os.path.dirname(__file__), "..", "docs", "support_matrix.md")
W8A8 = registry.get("w8a8_matmul")
FIREQ = registry.get("w4a8_fireq_matmul")
W4A16 = registry.get("w4a16_matmul")


def _platform(name: str) -> Platform:
  return chips.platform_of(chips.chip_named(name))


def test_chips_are_found_from_jax_device_kinds_and_compute_capabilities():
  assert chips.chip_of(Platform("tpu", "TPU v4")).name == "tpu_v4"
  assert chips.chip_of(Platform("tpu", "TPU v5 lite")).name == "tpu_v5e"
  assert chips.chip_of(Platform("tpu", "TPU v6e")).name == "tpu_v6e"
  assert chips.chip_of(Platform("tpu", "TPU7x")).name == "tpu_7x"
  h100 = chips.chip_of(Platform("gpu", "NVIDIA H100 80GB HBM3"))
  assert (h100.name, h100.hbm_bytes_per_s) == ("sm90", 3.35e12)
  a100 = chips.chip_of(Platform("gpu", "NVIDIA A100-SXM4-80GB", compute_capability="8.0"))
  assert (a100.name, a100.hbm_bytes_per_s) == ("sm80", 2.039e12)
  unknown = chips.chip_of(Platform("gpu", "Some Future GPU", compute_capability="8.9"))
  assert (unknown.name, unknown.hbm_bytes_per_s) == ("sm89", None)
  for platform in (Platform("cpu"), Platform("gpu", "export"), Platform("tpu", "TPU v9")):
    assert chips.chip_of(platform) is None
  for chip in chips.CHECKED:  # the platform a compile check uses maps back to its chip
    assert chips.chip_of(chips.platform_of(chip)) == chip


@pytest.mark.parametrize(
  "chip, w8a8, fireq",
  [
    ("tpu_v4", "bf16_dot", "bf16_dot"),
    ("tpu_v5e", "int8_dot", "bf16_dot"),
    ("tpu_v6e", "int8_dot", "fp8_dot"),
    ("tpu_7x", "bf16_dot", "fp8_dot"),
    ("sm80", "int8_dot", "bf16_inputs"),
    ("sm89", "int8_dot", "fp8_dot"),
    ("sm90", "int8_dot", "fp8_dot"),
  ],
)
def test_each_chip_gets_the_variant_its_matrix_units_run_natively(chip, w8a8, fireq):
  platform = _platform(chip)
  kernel = "mosaic_tpu" if platform.backend == "tpu" else "triton"
  assert W8A8.get(kernel).variant_for(platform, None) == w8a8
  assert FIREQ.get(kernel).variant_for(platform, None) == fireq


def _fireq_args(m=16, k=256, n=128, group=32):
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.05
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
  return (x, *quantize_w4_fireq(w, group))


def _w8a8_args(m=16, k=256, n=128):
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.05
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
  return (x, *quantize_w8(w))


@pytest.mark.parametrize(
  "op, args, variant, chip, dtype",
  [
    (W8A8, _w8a8_args, "int8_dot", "tpu_v4", "int8"),
    (FIREQ, _fireq_args, "fp8_dot", "tpu_v4", "float8_e4m3fn"),
    (FIREQ, _fireq_args, "fp8_dot", "sm80", "float8_e4m3fn"),
    (FIREQ, _fireq_args, "bf16_dot", "sm80", "float8_e4m3fn"),
  ],
)
def test_a_variant_the_chip_cannot_build_is_refused_naming_chip_and_dtype(
  op, args, variant, chip, dtype
):
  pattern = rf"\(variant '{variant}'\) cannot run on [^:]+: {chip} has no {dtype}"
  with pytest.raises(UnsupportedError, match=pattern):
    op(*args(), implementation="pallas", platform=_platform(chip), variant=variant)


def test_variants_compute_the_same_products_in_interpret_mode():
  """bf16 dots of int8 codes and of fp8 values are exact, so every variant of an op
  gives the product its default gives (f32 sums of exact products; order may differ)."""
  cpu = Platform("cpu", "cpu", interpret=True)
  args = _w8a8_args()
  outs = {
    v: W8A8(*args, implementation="mosaic_tpu", interpret=True, platform=cpu, variant=v)
    for v in ("int8_dot", "bf16_dot")
  }
  np.testing.assert_allclose(outs["bf16_dot"], outs["int8_dot"], rtol=1e-6, atol=1e-6)
  ref = W8A8(*args, implementation="reference", platform=cpu)
  np.testing.assert_allclose(outs["bf16_dot"], ref, rtol=1e-5, atol=1e-5)
  args = _fireq_args()
  ref = FIREQ(*args, implementation="reference", platform=cpu)
  for variant in ("bf16_dot", "bf16_inputs"):
    out = FIREQ(*args, implementation="triton", interpret=True, platform=cpu, variant=variant)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_default_blocks_shrink_to_the_chips_vmem_and_chosen_blocks_that_do_not_fit_are_refused():
  """W4A16 at Llama-3-8B's down projection with 512 f32 rows: the default blocks fit
  TPU v4's 16 MiB by shrinking; blocks the caller fixes are refused before lowering."""
  case = compile_guards._VMEM_CASE  # pylint: disable=protected-access
  v4 = common.tpu_params(chips.chip_named("tpu_v4").onchip_bytes)
  assert v4.vmem_limit_bytes == 16 << 20 and common.tpu_params().vmem_limit_bytes == 64 << 20
  out = jax.eval_shape(lambda *a: w4a16_kernel.w4a16_matmul(*a, compiler_params=v4), *case.args)
  assert out.shape == (512, 4096)
  big = w4a16_kernel.BlockSizes(block_m=512, block_n=512)
  with pytest.raises(ValueError, match=r"need ~\d+\.\d MiB of VMEM; the limit is 16 MiB"):
    w4a16_kernel.w4a16_matmul(*case.args, block_sizes=big, compiler_params=v4)
  assert W4A16.select("mosaic_tpu", _platform("tpu_v4"), *case.args).name == "mosaic_tpu"


def test_tile_bytes_pad_to_the_tpu_tile():
  assert common.tile_bytes((1, 128), jnp.float32) == 8 * 128 * 4
  assert common.tile_bytes((112, 1, 4096), jnp.float32) == 112 * 8 * 4096 * 4
  assert common.tile_bytes((3, 100), jnp.int8) == 32 * 128
  assert common.tile_bytes((64, 576), jnp.bfloat16) == 64 * 640 * 2


def test_compile_cases_cover_every_op_at_both_named_models():
  for name in registry.OPS:
    labels = [case.label for case in compile_cases.cases(name)]
    assert any(lab.startswith("smollm2") for lab in labels), name
    assert any(lab.startswith("llama3_8b") for lab in labels), name
  with pytest.raises(ValueError, match="no compile cases for op 'conv'"):
    compile_cases.cases("conv")


# ------------------------------------------------------------------ the committed matrix


@pytest.fixture(scope="module")
def matrix() -> str:
  with open(MATRIX, encoding="utf-8") as fh:
    return fh.read()


def test_committed_matrix_names_every_op_and_implementation(matrix):
  for name, op in registry.OPS.items():
    section = matrix.split(f"## `{name}`", 1)
    assert len(section) == 2, f"no section for op {name}"
    body = section[1].split("\n## ", 1)[0]
    for impl in op.implementations:
      assert re.search(rf"\b{impl.name}\b", body), f"{name}: implementation {impl.name} missing"
      for variant in impl.variants:
        assert re.search(rf"\| {impl.name} \| {variant} \|", body), f"{name}/{impl.name}/{variant}"


def test_committed_matrix_has_its_run_and_no_failing_cell(matrix):
  assert re.search(r"on \d{4}-\d{2}-\d{2}", matrix)
  for wheel in ("jax", "libtpu", "triton"):
    assert re.search(rf"\b{wheel} \d+\.\d+", matrix), wheel
  for chip in chips.CHECKED:
    assert f" {chip.name} |" in matrix.split("\n## ", 2)[1], chip.name
  table_rows = [line for line in matrix.splitlines() if line.startswith("| ")]
  assert not [r for r in table_rows if "**FAILING**" in r and "guard" not in r]
  guards = matrix.split("## Guards", 1)[1]
  for guard in compile_guards.GUARDS:
    for chip in guard.chips:
      assert re.search(
        rf"\| {guard.name} \|.*\| {chip} \| failing, as expected \| built \|", guards
      )
