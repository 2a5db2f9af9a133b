"""Real chip compiles (`make test-chips`; needs the libtpu and triton wheels).

The full matrix is `python -m experiments.support_matrix`; these tests hold the
parts that must never regress: each guard's broken kernel is rejected by the chip
compiler while its fixed twin builds, each by-design refusal is one the compiler
would really make, and every op builds on every chip at SmolLM2's first shape.
"""

from __future__ import annotations

import functools
import re

import pytest

from pallas_kernels import chips, compile_cases, compile_check, compile_guards, registry

# No skip without the wheels: run outside `.venv-chips`, these fail (libtpu or triton
# cannot be imported), and the default suite deselects them by this marker.
pytestmark = pytest.mark.compile


@pytest.mark.parametrize("guard", compile_guards.GUARDS, ids=lambda g: g.name)
def test_guard_broken_form_fails_and_fixed_form_builds(guard):
  cells = compile_check.guard_cells(guard)
  assert sorted(cells) == sorted(guard.chips)
  for chip, (broken, fixed) in cells.items():
    assert broken.status == compile_check.FAILING, (chip, broken)
    assert re.search(guard.expect, broken.detail), (chip, broken.detail)
    assert fixed.status == compile_check.BUILT, (chip, fixed)


@pytest.mark.parametrize(
  "op, variant, chip, error",
  [
    ("w8a8_matmul", "int8_dot", "tpu_v4", r"E2001|Unsupported matmul RHS type"),
    ("w4a8_fireq_matmul", "fp8_dot", "tpu_v4", r"E2001|Unsupported matmul RHS type"),
    ("w4a8_fireq_matmul", "bf16_dot", "sm80", r"f8e4m3nv is only supported"),
  ],
)
def test_refusals_by_design_are_what_the_compiler_would_reject(op, variant, chip, error):
  """The op refuses the variant on the chip, naming chip and dtype; forced past the
  refusal, the chip's compiler rejects it with the error the refusal cites."""
  target = chips.chip_named(chip)
  case = compile_cases.cases(op, ("smollm2",))[1]  # M=128
  implementation = "mosaic_tpu" if target.backend == "tpu" else "triton"
  cell = compile_check.op_cell(case, implementation, variant, target)
  assert cell.status == compile_check.REFUSED and chip in cell.detail, cell
  assert re.search("int8|float8_e4m3fn", cell.detail), cell
  impl = registry.get(op).get(implementation)
  forced = functools.partial(impl.fn, variant=variant, platform=chips.platform_of(target))
  compile_fn = (
    compile_check.compile_tpu if target.backend == "tpu" else compile_check.compile_triton
  )
  broken = compile_fn(forced, case, target)
  assert broken.status == compile_check.FAILING and re.search(error, broken.detail), broken


@pytest.mark.parametrize("op", [name for name, op in registry.OPS.items() if op.has_pallas])
def test_every_kernel_builds_on_every_chip_at_smollm2(op):
  case = compile_cases.cases(op, ("smollm2",))[0]
  for row in compile_check.rows([case]):
    assert not row.failing, (
      row.implementation,
      row.variant,
      {c: row.cells[c] for c in row.failing},
    )
    kernel = registry.get(op).get(row.implementation).kind == "pallas"
    built = [c for c, cell in row.cells.items() if cell.status == compile_check.BUILT]
    if kernel:  # a kernel builds on at least one chip of its backend in each variant
      assert built, (row.implementation, row.variant, row.cells)
