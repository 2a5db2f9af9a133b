"""The import graph of our packages, read statically: no loops, no upward imports.

Every ``import`` and ``from ... import`` counts, at module level or inside a function
(a lazy import runs later, but it still closes a loop), relative imports resolved.
Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first, so those count too,
except the importer's own enclosing packages (already running when it runs). A name
taken from a package that loads it lazily (PEP 562: a module-level ``_EXPORTS`` dict
of name -> module, as in ``jaxllm/__init__.py``) counts as an import of that module.

Layering: ``experiments`` -> ``jaxllm`` -> ``pallas_kernels``, ``sharding``;
``pallas_kernels`` imports only the standard library, jax and itself; ``sharding``
never imports ``jaxllm``; no package imports ``experiments``; a package of jaxllm
takes no private name (``_x``) from another; the caches sit below the model, and
the shared quantization numerics below both.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxllm", "pallas_kernels", "sharding", "experiments")


@dataclasses.dataclass
class Graph:
  """modules: name -> path; edges: importer -> {our modules it imports}; external:
  importer -> {top-level names of modules not ours}; names: importer -> [(module, name)]
  for every ``from module import name``."""

  modules: dict[str, Path]
  edges: dict[str, set[str]]
  external: dict[str, set[str]]
  names: dict[str, list[tuple[str, str]]]


def _module_name(root: Path, path: Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _prefixes(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
  """A package's module-level ``_EXPORTS = {"name": "module", ...}``, else {}."""
  for node in tree.body:
    if (
      isinstance(node, ast.Assign)
      and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
      and isinstance(node.value, ast.Dict)
    ):
      return {
        k.value: v.value
        for k, v in zip(node.value.keys, node.value.values)
        if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
      }
  return {}


def build_graph(root: Path, packages=PACKAGES) -> Graph:
  """The static import graph of every module under `root`/`packages`."""
  modules = {}
  for pkg in packages:
    for path in sorted((root / pkg).rglob("*.py")):
      modules[_module_name(root, path)] = path
  trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
  exports = {name: _lazy_exports(tree) for name, tree in trees.items()}
  edges, external, names = {}, {}, {}
  for name, tree in trees.items():
    is_pkg = modules[name].name == "__init__.py"
    own_packages = set(_prefixes(name)) | ({name} if is_pkg else set())
    explicit, implicit, ext, taken = set(), set(), set(), []

    def add(target: str, explicit=explicit, implicit=implicit) -> None:
      explicit.add(target)
      implicit.update(_prefixes(target))

    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          add(alias.name)
          taken.append((alias.name, ""))
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base_parts = name.split(".") if is_pkg else name.split(".")[:-1]
          base_parts = base_parts[: len(base_parts) - (node.level - 1)]
          base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
          base = node.module
        implicit.update(_prefixes(base))
        implicit.add(base)
        for alias in node.names:
          taken.append((base, alias.name))
          if f"{base}.{alias.name}" in modules:
            add(f"{base}.{alias.name}")
          elif alias.name in exports.get(base, {}):
            add(exports[base][alias.name])
            explicit.add(base)
          else:  # a name defined by `base` itself (or `*`)
            explicit.add(base)
    for target in explicit | implicit:
      if target.split(".")[0] not in packages:
        ext.add(target.split(".")[0])
    ours = {t for t in explicit if t in modules} | {
      t for t in implicit if t in modules and t not in own_packages
    }
    ours.discard(name)
    edges[name], external[name], names[name] = ours, ext, taken
  return Graph(modules, edges, external, names)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The loops (first module repeated at the end): in each strongly connected
  component of more than one module (Tarjan's algorithm), a shortest loop through
  each of its modules, each loop once."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
  try:
    for v in sorted(edges):
      if v not in index:
        visit(v)
  finally:
    sys.setrecursionlimit(limit)

  loops = {}
  for component in components:
    for start in sorted(component):
      loop = _shortest_loop(edges, component, start)
      i = loop.index(min(loop))  # one spelling per loop, from its first module
      loops.setdefault(tuple(loop[i:-1] + loop[: i + 1]), None)
  return [list(loop) for loop in loops]


def _shortest_loop(edges, component: set[str], start: str) -> list[str]:
  """A shortest path start -> ... -> start inside a strongly connected `component`."""
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(edges[v] & component):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return [*reversed(path), start]
        if w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"{start} is on no loop of {sorted(component)}")


def _format(cycles) -> str:
  return "; ".join(" -> ".join(c) for c in cycles)


@pytest.fixture(scope="module")
def graph() -> Graph:
  return build_graph(ROOT)


def test_no_import_cycles(graph):
  cycles = find_cycles(graph.edges)
  assert not cycles, f"import loops: {_format(cycles)}"


def test_pallas_kernels_import_only_stdlib_and_jax(graph):
  # triton: the compiler behind jax's Pallas GPU backend (compile_check's PTX step)
  allowed = set(sys.stdlib_module_names) | {"jax", "jaxlib", "triton", "pallas_kernels"}
  bad = {
    m: sorted(
      (graph.external[m] - allowed)
      | {t for t in graph.edges[m] if t.split(".")[0] != "pallas_kernels"}
    )
    for m in graph.modules
    if m.split(".")[0] == "pallas_kernels"
  }
  bad = {m: v for m, v in bad.items() if v}
  assert not bad, f"pallas_kernels imports beyond the stdlib, jax and itself: {bad}"


def test_sharding_does_not_import_jaxllm(graph):
  bad = {
    m: sorted(t for t in graph.edges[m] if t.split(".")[0] in ("jaxllm", "experiments"))
    for m in graph.modules
    if m.split(".")[0] == "sharding"
  }
  bad = {m: v for m, v in bad.items() if v}
  assert not bad, f"sharding imports jaxllm: {bad}"


def test_only_experiments_import_experiments(graph):
  bad = {
    m: sorted(t for t in graph.edges[m] if t.split(".")[0] == "experiments")
    for m in graph.modules
    if m.split(".")[0] != "experiments"
  }
  bad = {m: v for m, v in bad.items() if v}
  assert not bad, f"library modules import experiments: {bad}"


def _unit(graph: Graph, module: str) -> str | None:
  """The package of jaxllm a module belongs to: ``jaxllm.kv_cache`` for
  jaxllm.kv_cache.group_quantized, ``jaxllm`` for jaxllm.ops; None outside jaxllm."""
  parts = module.split(".")
  if parts[0] != "jaxllm":
    return None
  if len(parts) > 2 or (len(parts) == 2 and graph.modules[module].name == "__init__.py"):
    return ".".join(parts[:2])
  return "jaxllm"


def _private(module: str, name: str) -> bool:
  parts = [*module.split("."), *([name] if name else [])]
  return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts)


def private_imports(graph: Graph) -> list[str]:
  """Imports of a private name (a ``_x`` module or name) from another package of jaxllm."""
  bad = []
  for m in graph.modules:
    if _unit(graph, m) is None:
      continue
    for module, name in graph.names[m]:
      target = f"{module}.{name}" if f"{module}.{name}" in graph.modules else module
      if _unit(graph, target) not in (None, _unit(graph, m)) and _private(module, name):
        bad.append(f"{m}: from {module} import {name}" if name else f"{m}: import {module}")
  return bad


def test_no_private_names_across_jaxllm_packages(graph):
  bad = private_imports(graph)
  assert not bad, f"private names taken from another jaxllm package: {bad}"


def test_caches_sit_below_the_model_and_numerics_below_both(graph):
  """jaxllm.kv_cache never imports the model or quant (but its numerics), and
  jaxllm.quant.numerics imports nothing of jaxllm: the loop model -> kv_cache ->
  quant -> model cannot come back."""
  bad = []
  for m in graph.modules:
    if m.startswith("jaxllm.kv_cache"):
      bad += [
        f"{m} -> {t}"
        for t in graph.edges[m]
        if t == "jaxllm.model" or (t.startswith("jaxllm.quant.") and t != "jaxllm.quant.numerics")
      ]
  bad += [
    f"jaxllm.quant.numerics -> {t}"
    for t in graph.edges.get("jaxllm.quant.numerics", ())
    if t.split(".")[0] == "jaxllm" and t not in ("jaxllm", "jaxllm.quant")
  ]
  assert not bad, f"upward imports: {bad}"


# -- the walker itself, on small made-up packages --


def _write(root: Path, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_walker_sees_lazy_relative_and_package_imports(tmp_path):
  _write(
    tmp_path,
    {
      "pkg/__init__.py": "",
      "pkg/a.py": "from pkg.sub.b import f\n",
      "pkg/sub/__init__.py": "def g():\n  from .. import c\n",
      "pkg/sub/b.py": "import os\ndef f():\n  from ._d import h\n",
      "pkg/sub/_d.py": "import numpy\n",
      "pkg/c.py": "from . import a\n",
      "other/__init__.py": "_EXPORTS = {'f': 'pkg.sub.b'}\n",
      "other/e.py": "from other import f\n",
    },
  )
  g = build_graph(tmp_path, ("pkg", "other"))
  # pkg.a needs pkg.sub (run first) and pkg.sub.b; pkg.sub.b's own package is not an edge
  assert g.edges["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
  assert g.edges["pkg.sub.b"] == {"pkg.sub._d"}
  assert g.edges["pkg.sub"] == {"pkg.c"}
  assert g.external["pkg.sub._d"] == {"numpy"} and g.external["pkg.sub.b"] == {"os"}
  assert ("pkg.sub._d", "h") in g.names["pkg.sub.b"] and ("os", "") in g.names["pkg.sub.b"]
  assert g.edges["other.e"] == {"other", "pkg", "pkg.sub", "pkg.sub.b"}
  # the loop closes only through the lazy import inside pkg/sub/__init__.py's g()
  assert find_cycles(g.edges) == [["pkg.a", "pkg.sub", "pkg.c", "pkg.a"]]


def test_walker_finds_no_cycle_in_a_layered_tree(tmp_path):
  _write(
    tmp_path,
    {
      "pkg/__init__.py": "from pkg import a, b\n",
      "pkg/a.py": "from pkg import b\n",
      "pkg/b.py": "from pkg.low import x\n",
      "pkg/low.py": "x = 1\n",
    },
  )
  assert find_cycles(build_graph(tmp_path, ("pkg",)).edges) == []


def test_walker_flags_private_names_across_packages_only(tmp_path):
  _write(
    tmp_path,
    {
      "jaxllm/__init__.py": "",
      "jaxllm/ops.py": "def _helper(): pass\n",
      "jaxllm/model.py": "from jaxllm.ops import _helper\n",  # same package: allowed
      "jaxllm/quant/__init__.py": "",
      "jaxllm/quant/_low.py": "x = 1\n",
      "jaxllm/quant/a.py": "from jaxllm.quant._low import x\nfrom ._low import x\n",
      "jaxllm/kv_cache/__init__.py": "",
      "jaxllm/kv_cache/b.py": (
        "from jaxllm.quant._low import x\nimport jaxllm.quant._low\nfrom jaxllm.ops import _helper\n"
      ),
    },
  )
  assert private_imports(build_graph(tmp_path, ("jaxllm",))) == [
    "jaxllm.kv_cache.b: from jaxllm.quant._low import x",
    "jaxllm.kv_cache.b: import jaxllm.quant._low",
    "jaxllm.kv_cache.b: from jaxllm.ops import _helper",
  ]
