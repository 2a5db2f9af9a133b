"""Real compiles for real chips on a machine with none: the support matrix's cells.

Two compilers, both run here without an accelerator (`make test-chips` installs
them in a separate venv):
  * TPU: libtpu's compile-only topologies (``jax.experimental.topologies``): jit,
    lower and compile for TPU v4, v5e, v6e and 7x (Mosaic for Pallas kernels,
    XLA:TPU around them).
  * CUDA: the Triton IR that Pallas emits (captured at lowering) compiled to cubin
    by the upstream ``triton`` wheel for sm80, sm89 and sm90. XLA's own Triton fork
    differs a little, so this is a close proxy. XLA-only implementations are only
    exported for ``cuda`` (there is no XLA:GPU compiler without a GPU).

Each check gives a `Cell`: ``built``; ``refused`` (the implementation's
``supports()`` says no, by design, with its reason, and nothing is compiled);
``failing`` (the compiler rejected it: a bug, or a guard that must fail);
``lowered`` (exported for cuda, not compiled); ``n/a`` (the kernel is another
backend's). `op_cell` goes through the op's table exactly as a call on that chip
would, so the chip's variant choice and refusals are what is checked;
`compile_tpu` and `compile_triton` compile any function, which the guard tests use
to prove that a broken kernel is caught here and recorded as failing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
import time

import jax
from jax import export

from pallas_kernels import chips, registry
from pallas_kernels.compile_cases import Case
from pallas_kernels.op_api import UnsupportedError

BUILT, REFUSED, FAILING, LOWERED, NA = "built", "refused", "failing", "lowered", "n/a"
_TRITON_CALL = "__gpu$xla.gpu.triton"
_NUM_WARPS = 4  # what `quantized_matmul.common.triton_params` and the KV kernel use


@dataclasses.dataclass(frozen=True)
class Cell:
  """One op x implementation x variant x shape on one chip."""

  status: str
  detail: str = ""
  seconds: float = 0.0


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


@functools.cache
def tpu_device(chip_name: str):
  """A compile-only device of the chip's topology (needs the libtpu wheel)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only topologies touch no chip, so another process holding libtpu's
  # lockfile (a second check, a test) must not stop this one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_LOG_DIR", tempfile.mkdtemp(prefix="libtpu_logs_"))
  chip = chips.chip_named(chip_name)
  kw = {"chips_per_host_bounds": (1, 1, 1)}
  if chip_name == "tpu_v4":
    kw["chip_config_name"] = "megacore"
  topo = topologies.get_topology_desc(platform="tpu", topology_name=chip.topology, **kw)
  return topo.devices[0]


def compile_tpu(fn, case: Case, chip: chips.Chip) -> Cell:
  """jit, lower and compile ``fn(*case.args)`` for a compile-only device of `chip`."""
  t0 = time.perf_counter()
  try:
    placed = case.with_sharding(jax.sharding.SingleDeviceSharding(tpu_device(chip.name)))
    jax.jit(fn).trace(*placed.args).lower().compile()
  except Exception as e:  # pylint: disable=broad-except  # the compiler's verdict is the result
    return Cell(FAILING, _error(e), time.perf_counter() - t0)
  return Cell(BUILT, "", time.perf_counter() - t0)


def triton_modules(fn, args) -> list[str]:
  """The Triton IR of every Pallas kernel in ``fn(*args)`` exported for cuda."""
  from jax._src.pallas.triton import lowering  # pylint: disable=import-outside-toplevel

  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def hook(*a, **k):
    result = original(*a, **k)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = hook
  try:
    checks = [export.DisabledSafetyCheck.custom_call(_TRITON_CALL)]
    export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  return captured


@contextlib.contextmanager
def _captured_stderr():
  """The process's stderr (fd 2, where LLVM writes its errors and reproducers) into a
  temporary file for the duration; yields a function that reads it back."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield lambda: (tmp.seek(0), tmp.read().decode("utf-8", "replace"))[1]
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def _llvm_error(stderr: str) -> str:
  for line in stderr.splitlines():
    if "ERROR" in line or "error:" in line:
      return " ".join(line.split())[:200]
  return ""


def compile_triton(fn, case: Case, chip: chips.Chip) -> Cell:
  """Export ``fn(*case.args)`` for cuda and compile each Triton kernel in it for `chip`."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  try:
    modules = triton_modules(fn, case.args)
  except Exception as e:  # pylint: disable=broad-except
    return Cell(FAILING, "lowering: " + _error(e), time.perf_counter() - t0)
  if not modules:
    return Cell(LOWERED, "XLA only: exported for cuda", time.perf_counter() - t0)
  major, minor = chip.compute_capability
  smem = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, module in enumerate(modules):
      path = os.path.join(tmp, f"kernel{i}.ttir")
      with open(path, "w", encoding="utf-8") as fh:
        fh.write(module)
      with _captured_stderr() as stderr:
        try:
          target = GPUTarget("cuda", major * 10 + minor, 32)
          kernel = triton.compile(path, target=target, options={"num_warps": _NUM_WARPS})
        except Exception as e:  # pylint: disable=broad-except
          detail = "; ".join(filter(None, (_llvm_error(stderr()), _error(e))))
          return Cell(FAILING, detail, time.perf_counter() - t0)
      smem.append(kernel.metadata.shared)
  detail = f"smem {max(smem) // 1024} KiB"
  return Cell(BUILT, detail, time.perf_counter() - t0)


def op_cell(case: Case, implementation: str, variant: str | None, chip: chips.Chip) -> Cell:
  """The op called through its table on `chip`: refused by design, built, or failing."""
  op = registry.get(case.op)
  impl = op.get(implementation)
  if impl.kind == "pallas" and impl.backend != chip.backend:
    return Cell(NA)
  platform = chips.platform_of(chip)
  try:
    op.select(implementation, platform, *case.args, variant=variant, **case.kwargs)
  except UnsupportedError as e:
    reason = str(e).split(f"cannot run on {platform.chip}: ", 1)[-1]
    return Cell(REFUSED, " ".join(reason.split())[:300])

  def call(*args):
    return op(
      *args, implementation=implementation, platform=platform, variant=variant, **case.kwargs
    )

  return (compile_tpu if chip.backend == "tpu" else compile_triton)(call, case, chip)


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the matrix and its cells by chip name."""

  op: str
  implementation: str
  variant: str | None
  shape: str
  cells: dict

  @property
  def failing(self) -> list[str]:
    return [name for name, cell in self.cells.items() if cell.status == FAILING]


def _model(case: Case) -> str:
  return case.label.split(" ", 1)[0]


def rows(case_list, chip_list=chips.CHECKED, progress=None) -> list[Row]:
  """Every implementation x variant of each case's op, on every chip, except the
  ``reference`` implementations (the tests' jnp oracles, which nothing serves from).
  ``xla`` implementations, plain XLA that tiles itself, are compiled at each op's
  first case per model only; the kernels at every case."""
  out = []
  xla_done = set()
  for case in case_list:
    op = registry.get(case.op)
    for impl in op.implementations:
      if impl.kind == "reference":
        continue
      if impl.kind == "xla":
        if (case.op, _model(case)) in xla_done:
          continue
        xla_done.add((case.op, _model(case)))
      for variant in impl.variants or (None,):
        cells = {chip.name: op_cell(case, impl.name, variant, chip) for chip in chip_list}
        row = Row(case.op, impl.name, variant, case.label, cells)
        if progress:
          progress(row)
        out.append(row)
  return out


def guard_cells(guard, chip_list=chips.CHECKED) -> dict:
  """``{chip: (broken cell, fixed cell)}`` for the guard's chips among `chip_list`."""
  out = {}
  for chip in chip_list:
    if chip.name not in guard.chips:
      continue
    compile_fn = compile_tpu if chip.backend == "tpu" else compile_triton
    out[chip.name] = tuple(compile_fn(*form(chip), chip) for form in (guard.broken, guard.fixed))
  return out
