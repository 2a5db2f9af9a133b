"""Which op builds on which chip: real compiles for TPU and CUDA, no accelerator needed.

  python -m experiments.support_matrix --out_md=docs/support_matrix.md   # `make test-chips`

Needs the wheels `make test-chips` installs in `.venv-chips` (libtpu for TPU
compile-only topologies, triton for cubin). For every op in the registry, every
implementation and variant, at the named shapes (`pallas_kernels.compile_cases`),
and every checked chip (`pallas_kernels.chips.CHECKED`: TPU v4, v5e, v6e, 7x;
sm80, sm89, sm90) it records a cell: built, refused by design (the
implementation's `supports()` reason), failing, lowered (XLA only, exported for
cuda), or n/a (another backend's kernel). Then it compiles each guard
(`pallas_kernels.compile_guards`): a broken kernel that must fail and its fixed
twin that must build.

Writes the matrix as Markdown (--out_md) and every cell with its compile time as
JSON in --out_dir. Exit code 1 if any op cell is failing, or a guard's broken form
builds or its fixed form fails. The compiles run in two processes (TPU chips and
sm80; sm89 and sm90).
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import multiprocessing
import re
import time

from absl import app, flags

from experiments import common

NAME = "support_matrix"
common.define_common_flags(NAME, ("out_dir",))
_OUT_MD = flags.DEFINE_string("out_md", None, "Write the matrix as Markdown here.")
_OPS = flags.DEFINE_list("ops", None, "Ops (registry names); default: all.")
_CHIPS = flags.DEFINE_list("chips", None, "Chips (tpu_v4, ..., sm90); default: all checked.")
_MODELS = flags.DEFINE_list("models", ["smollm2", "llama3_8b"], "Named shapes.")
_GUARDS = flags.DEFINE_bool("guards", True, "Compile the guard kernels too.")
FLAGS = flags.FLAGS


def _group(chip_names, ops, models, guards) -> tuple[list, dict, float]:
  """Compiles the cells of `chip_names` (one backend; run in a worker process)."""
  from pallas_kernels import (  # pylint: disable=import-outside-toplevel
    chips,
    compile_cases,
    compile_check,
    compile_guards,
  )

  t0 = time.perf_counter()
  chip_list = [chips.chip_named(n) for n in chip_names]
  case_list = [case for op in ops for case in compile_cases.cases(op, models)]
  rows = compile_check.rows(case_list, chip_list, progress=_print_row)
  guard_cells = {}
  if guards:
    for guard in compile_guards.GUARDS:
      guard_cells[guard.name] = compile_check.guard_cells(guard, chip_list)
  return rows, guard_cells, time.perf_counter() - t0


def _print_row(row) -> None:
  cells = " ".join(f"{chip}={cell.status}" for chip, cell in row.cells.items())
  print(f"{row.op} {row.implementation} {row.variant or '-'} [{row.shape}] {cells}", flush=True)


def _merge(results) -> tuple[list, dict]:
  """Rows from the per-backend workers joined into one row per op x impl x variant x shape."""
  merged: dict = {}
  guards: dict = collections.defaultdict(dict)
  for rows, guard_cells, _ in results:
    for row in rows:
      key = (row.op, row.implementation, row.variant, row.shape)
      if key in merged:
        merged[key].cells.update(row.cells)
      else:
        merged[key] = row
    for name, cells in guard_cells.items():
      guards[name].update(cells)
  return list(merged.values()), dict(guards)


def _versions() -> dict:
  return {p: common.package_version(p) for p in ("jax", "jaxlib", "libtpu", "triton")}


def _cell_text(cell, notes: dict) -> str:
  if cell is None:
    return ""
  if cell.status in ("refused", "failing"):
    note = notes.setdefault(cell.detail, len(notes) + 1)
    word = "refused" if cell.status == "refused" else "**FAILING**"
    return f"{word} [{note}]"
  if cell.status == "built" and cell.detail:
    return f"built ({cell.detail})"
  return {"lowered": "lowered", "n/a": "–"}.get(cell.status, cell.status)


def markdown(rows, guards, guard_defs, chip_names, header: dict) -> str:
  """The support matrix as Markdown: one table per op, then the guards."""
  lines = [
    "# Support matrix: which op builds on which chip",
    "",
    f"Written by `make test-chips` (`{header['command']}`) on {header['date']}, in "
    f"{header['seconds']:.0f} s of compiling. Wheels: "
    + ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    + ".",
    "",
    "No accelerator was used: TPU cells are full compiles through libtpu's compile-only "
    "topologies (Mosaic for kernels, XLA:TPU around them); CUDA cells compile the Triton IR "
    "that Pallas emits to cubin with the `triton` wheel (XLA's own Triton fork may differ "
    "slightly). `xla` implementations (plain XLA, which tiles itself) are compiled for TPU "
    "and exported for cuda (`lowered`: there is no XLA:GPU compiler without a GPU) at each "
    "op's first shape per model; the kernels at every shape.",
    "",
    "Cells: `built` (compiled; for Triton with its shared memory), `refused [n]` (the "
    "implementation's `supports()` refuses it by design; reason n below), `**FAILING** [n]` "
    "(the compiler rejected it: a bug), `lowered`. Variants are chosen per chip at trace "
    "time (`pallas_kernels/chips.py`): `(default)` marks the variant a call that names none "
    "gets on that chip. Shapes: `pallas_kernels/compile_cases.py`.",
    "",
  ]
  notes: dict = {}
  by_op = collections.defaultdict(list)
  for row in rows:
    by_op[row.op].append(row)
  from pallas_kernels import chips, registry  # pylint: disable=import-outside-toplevel

  backends = (
    ("TPU", "tpu", [c for c in chip_names if chips.chip_named(c).backend == "tpu"]),
    ("CUDA", "gpu", [c for c in chip_names if chips.chip_named(c).backend == "gpu"]),
  )
  for op, op_rows in by_op.items():
    table = registry.get(op)
    names = [
      f"{impl.name} ({impl.kind}"
      + (f", variants {', '.join(impl.variants)})" if impl.variants else ")")
      for impl in table.implementations
    ]
    lines += [
      f"## `{op}`",
      "",
      f"Implementations: {'; '.join(names)}. The `reference` one (the tests' jnp oracle) is "
      "not compile-checked.",
      "",
    ]
    for title, backend, columns in backends:
      mine = [
        r
        for r in op_rows
        if table.get(r.implementation).backend in (None, backend)
        and any(c in r.cells for c in columns)
      ]
      if not columns or not mine:
        continue
      lines += [
        f"{title}:",
        "",
        "| implementation | variant | shape | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
      ]
      order = {name: i for i, name in enumerate(table.names)}
      mine.sort(key=lambda r: order[r.implementation])  # stable: variants, shapes keep order
      for row in mine:
        impl = table.get(row.implementation)
        texts = []
        for c in columns:
          text = _cell_text(row.cells.get(c), notes)
          platform = chips.platform_of(chips.chip_named(c))
          if row.variant and impl.variant_for(platform, None) == row.variant:
            text += " (default)"
          texts.append(text)
        variant = row.variant or ""
        lines.append(f"| {row.implementation} | {variant} | {row.shape} | {' | '.join(texts)} |")
      lines.append("")
  lines += ["## Reasons", ""]
  lines += [f"{n}. {text}" for text, n in notes.items()]
  lines += [
    "",
    "## Guards: broken kernels that must fail",
    "",
    "Each trap passes interpret mode and export lowering; the chip compiler must reject the "
    "broken form (`pallas_kernels/compile_guards.py`) while its fixed twin builds.",
    "",
    "| guard | trap | chip | broken form | fixed form |",
    "|---|---|---|---|---|",
  ]
  for guard in guard_defs:
    for chip, (broken, fixed) in guards.get(guard.name, {}).items():
      caught = broken.status == "failing" and re.search(guard.expect, broken.detail)
      verdict = (
        "failing, as expected" if caught else f"**{broken.status.upper()}** (expected failing)"
      )
      lines.append(f"| {guard.name} | {guard.trap} | {chip} | {verdict} | {fixed.status} |")
  return "\n".join(lines) + "\n"


def guard_problems(guards, guard_defs) -> list[str]:
  problems = []
  for guard in guard_defs:
    for chip, (broken, fixed) in guards.get(guard.name, {}).items():
      if broken.status != "failing" or not re.search(guard.expect, broken.detail):
        problems.append(f"guard {guard.name} on {chip}: broken form {broken.status}")
      if fixed.status != "built":
        problems.append(f"guard {guard.name} on {chip}: fixed form {fixed.status}")
  return problems


def main(argv):
  del argv
  from pallas_kernels import chips, compile_guards, registry  # pylint: disable=C0415

  ops = _OPS.value or [name for name in registry.OPS]
  for op in ops:
    if op not in registry.OPS:
      common.fail(f"--ops: unknown op {op!r}; ops: {sorted(registry.OPS)}")
  try:
    chip_list = [chips.chip_named(n) for n in (_CHIPS.value or [c.name for c in chips.CHECKED])]
  except ValueError as e:
    common.fail(f"--chips: {e}")
  # Two workers of about equal compile time (TPU compiles are quicker than Triton's).
  tpus = [c.name for c in chip_list if c.backend == "tpu"]
  gpus = [c.name for c in chip_list if c.backend == "gpu"]
  groups = [g for g in (tpus + gpus[:1], gpus[1:]) if g]
  t0 = time.perf_counter()
  spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds jax
  with concurrent.futures.ProcessPoolExecutor(len(groups), mp_context=spawn) as pool:
    futures = [pool.submit(_group, g, ops, tuple(_MODELS.value), _GUARDS.value) for g in groups]
    results = [f.result() for f in futures]
  seconds = time.perf_counter() - t0
  rows, guards = _merge(results)
  chip_names = [c.name for c in chip_list]
  header = {
    "date": datetime.date.today().isoformat(),
    "versions": _versions(),
    "seconds": seconds,
    "command": "python -m experiments.support_matrix --out_md=docs/support_matrix.md",
  }
  guard_defs = compile_guards.GUARDS if _GUARDS.value else ()
  if _OUT_MD.value:
    with open(_OUT_MD.value, "w", encoding="utf-8") as fh:
      fh.write(markdown(rows, guards, guard_defs, chip_names, header))
  counts = collections.Counter(cell.status for row in rows for cell in row.cells.values())
  failing = [
    f"{r.op}/{r.implementation}/{r.variant} [{r.shape}] on {c}" for r in rows for c in r.failing
  ]
  problems = failing + guard_problems(guards, guard_defs)
  record = dict(
    header,
    run=common.run_info(),
    rows=[
      {
        "op": r.op,
        "implementation": r.implementation,
        "variant": r.variant,
        "shape": r.shape,
        "cells": {c: vars(cell) for c, cell in r.cells.items()},
      }
      for r in rows
    ],
    guards={
      g: {c: [vars(b), vars(f)] for c, (b, f) in cells.items()} for g, cells in guards.items()
    },
    problems=problems,
  )
  summary = {
    "rows": len(rows),
    **{status.replace("/", ""): n for status, n in sorted(counts.items())},
    "guards": sum(len(c) for c in guards.values()),
    "problems": len(problems),
    "seconds": round(seconds, 1),
  }
  for problem in problems:
    print(f"problem: {problem}", flush=True)
  common.finish(FLAGS.out_dir, NAME, record, summary)
  if problems:
    common.fail(f"{len(problems)} problem(s), first: {problems[0]}")


if __name__ == "__main__":
  app.run(main)
