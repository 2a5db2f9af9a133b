"""The one table that maps logical axis names to mesh axes.

Model code names every parameter dimension and key activation dimension with a
logical name (``"embed"``, ``"heads"``, ...). Only this module knows how those
names land on a device mesh with axes ``data, fsdp, tensor, expert``; changing
the parallelism layout is an edit of `DEFAULT_RULES`, not of the model.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis (or tuple of mesh axes), None = replicated.
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
  # activations
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("cache_batch", ("data", "fsdp")),
  ("cache_kv_heads", "tensor"),
  ("cache_length", None),  # slots (and packed slots) of a cache
  ("cache_groups", None),  # groups of G tokens (per-channel key scales)
  ("cache_channel_groups", None),  # scales per channel slab of one token
  ("cache_window", None),  # exact residual window / ring slots
  ("cache_sinks", None),  # exact attention-sink slots
  ("cache_layers", None),  # per-layer calibration tables
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  # parameters
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("norm", None),
  ("expert", "expert"),
)


def logical_to_spec(
  names: Sequence[str | None],
  rules: LogicalRules = DEFAULT_RULES,
  mesh_axes: Sequence[str] | None = None,
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per spec (first logical dim wins), and mesh
  axes absent from `mesh_axes` (when given) are dropped, so the same rules work
  on a 1-axis test mesh and a full 4-axis mesh.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh_axes is None or a in mesh_axes))
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*out)


def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(
  x: jax.Array, names: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES
) -> jax.Array:
  """Sharding constraint by logical names; a no-op when no mesh is active."""
  mesh = _current_mesh()
  if mesh is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"{len(names)} logical names {tuple(names)} for an array of shape {x.shape}")
  spec = logical_to_spec(names, rules, mesh.axis_names)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


_LOG = logging.getLogger("sharding")
_CPU_HINT = "on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported"


def parse_mesh(text: str) -> dict[str, int]:
  """``"data:2,tensor:4"`` -> ``{"data": 2, "tensor": 4}`` (the ``--mesh`` flag's syntax).

  Raises ValueError (one line) for a malformed string, an axis not in `MESH_AXES`, an
  axis given twice, or a size that is not a positive integer.
  """
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"mesh {text!r} is empty: give axis:size pairs, e.g. 'data:2,tensor:4'")
  shape: dict[str, int] = {}
  for part in text.split(","):
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*:\s*([+-]?\d+)\s*", part)
    if match is None:
      raise ValueError(
        f"mesh {text!r}: malformed entry {part!r}; use axis:size pairs joined by commas, "
        "e.g. 'data:2,tensor:4'"
      )
    axis, size = match.group(1), int(match.group(2))
    if axis not in MESH_AXES:
      raise ValueError(f"mesh {text!r}: unknown mesh axis {axis!r}; the axes are {MESH_AXES}")
    if axis in shape:
      raise ValueError(f"mesh {text!r}: mesh axis {axis!r} is given twice")
    if size < 1:
      raise ValueError(f"mesh {text!r}: mesh axis {axis!r} has size {size}; sizes must be >= 1")
    shape[axis] = size
  return shape


def make_mesh(shape: dict[str, int] | str | None = None, devices=None) -> Mesh:
  """Builds a mesh over `devices` with axes MESH_AXES; unspecified axes get size 1.

  Args:
    shape: axis sizes as a dict or a ``--mesh`` string (`parse_mesh`); None puts every
      device on the ``data`` axis.
    devices: the devices (default: all of `jax.devices()`), or an int n: the first n.
      The mesh must use exactly these devices (e.g. ``tensor:3`` with ``devices=3``).

  Raises ValueError (one line) for an unknown axis, a size below 1, or a mesh whose
  size is not the number of devices (naming how many there are).
  """
  available = jax.devices()
  if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    if not 1 <= devices <= len(available):
      raise ValueError(
        f"cannot take the first {devices} devices: {len(available)} "
        f"{available[0].platform} device(s) exist ({_CPU_HINT})"
      )
    devices = available[:devices]
  devices = np.asarray(available if devices is None else devices)
  if isinstance(shape, str):
    shape = parse_mesh(shape)
  shape = dict(shape or {"data": devices.size})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  bad = {a: s for a, s in shape.items() if not isinstance(s, (int, np.integer)) or s < 1}
  if bad:
    raise ValueError(f"mesh axis sizes must be integers >= 1, got {bad}")
  sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
  need = int(np.prod(sizes))
  if need != devices.size:
    given = ",".join(f"{a}:{s}" for a, s in zip(MESH_AXES, sizes) if a in shape)
    raise ValueError(
      f"mesh {given} needs {need} devices, but {devices.size} are given "
      f"({len(available)} {available[0].platform} device(s) exist; {_CPU_HINT})"
    )
  return Mesh(devices.reshape(sizes), MESH_AXES)


def check_mesh_axes(mesh) -> None:
  """ValueError (one line) unless every axis of `mesh` is one of `MESH_AXES`: the rules
  map logical names to those axes only, so any other axis would silently hold nothing."""
  unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"mesh axes {list(unknown)} are not sharding axes; the axes are {MESH_AXES}")


# ------------------------------------------------------------ pad-or-replicate policy


@dataclasses.dataclass(frozen=True)
class Unsharded:
  """One kind of dimension that its mesh axes do not divide: the same logical name and
  size, left off the same mesh axes, on every array listed.

  Attributes:
    logical: the dimension's logical name (``"kv_heads"``).
    size: its size.
    wanted: the mesh axes (name, size) the rules give it.
    kept: the leading ones that divide it and still shard it (empty: replicated).
    arrays: the arrays, layer indices written ``*`` (``"layers.*.attn.k"``).

  Policy: the dimension keeps the longest leading run of its mesh axes whose product
  divides it and is replicated over the rest. Nothing is padded: padding a weight
  (e.g. the vocabulary) would change the shapes the model computes with.
  """

  logical: str
  size: int
  wanted: tuple[tuple[str, int], ...]
  kept: tuple[str, ...]
  arrays: tuple[str, ...]

  @property
  def action(self) -> str:
    if not self.kept:
      return "replicated"
    sizes = dict(self.wanted)
    kept = [f"{a}={sizes[a]}" for a in self.kept if sizes[a] > 1]
    return ("sharded on " + " x ".join(kept) + " only") if kept else "replicated"

  def line(self) -> str:
    axes = " x ".join(f"{a}={s}" for a, s in self.wanted if s > 1)
    return f"{self.logical}: {self.size} not divisible by {axes}, {self.action} on " + ", ".join(
      self.arrays
    )


@dataclasses.dataclass(frozen=True)
class ShardingReport:
  """What a placement could not shard as its rules say, once per kind (`Unsharded`)."""

  entries: tuple[Unsharded, ...] = ()

  def lines(self) -> list[str]:
    return [e.line() for e in self.entries]

  def __bool__(self) -> bool:
    return bool(self.entries)


def _axis_tuple(axes) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _path_name(path, wildcard: bool = True) -> str:
  """Dotted name of a pytree path; integer keys (layer indices) as ``*`` with `wildcard`."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        value = getattr(key, attr)
        index = isinstance(value, int) or str(value).isdigit()
        parts.append("*" if index and wildcard else str(value))
        break
    else:
      parts.append(str(key))
  return ".".join(parts) or "(array)"


def _is_names(n) -> bool:
  return isinstance(n, tuple) and all(isinstance(a, (str, type(None))) for a in n)


def plan_shardings(
  arrays,
  logical_axes,
  mesh,
  rules: LogicalRules = DEFAULT_RULES,
  strict: bool = False,
  what: str = "param",
):
  """The `NamedSharding` of every array of `arrays` (anything with ``.shape``: arrays,
  `jax.ShapeDtypeStruct`s) by a matching pytree of logical-name tuples.

  A dimension its mesh axes do not divide follows the `Unsharded` policy and is
  reported; with `strict` it is a ValueError (one line) naming the `what` (param,
  cache array), its dim, size and mesh axes. A names tuple shorter than the array
  names its leading dims (the rest are replicated).

  Returns:
    (tree of NamedSharding matching `arrays`, `ShardingReport`).
  """
  check_mesh_axes(mesh)
  mesh_shape = dict(mesh.shape)
  found: dict[tuple, list[str]] = {}
  order: list[tuple] = []

  def place(path, x, names):
    shape = tuple(x.shape)
    if len(names) > len(shape):
      raise ValueError(
        f"{what} {_path_name(path)}: {len(names)} logical names {names} for shape {shape}"
      )
    names = tuple(names) + (None,) * (len(shape) - len(names))
    spec = logical_to_spec(names, rules, mesh.axis_names)
    fixed = []
    for dim, (size, axes, name) in enumerate(zip(shape, spec, names)):
      axes = _axis_tuple(axes)
      kept: tuple[str, ...] = ()
      for i in range(len(axes), -1, -1):
        if size % int(np.prod([mesh_shape[a] for a in axes[:i]])) == 0:
          kept = axes[:i]
          break
      dropped = [a for a in axes[len(kept) :] if mesh_shape[a] > 1]
      if dropped:
        wanted = tuple((a, mesh_shape[a]) for a in axes)
        if strict:
          where = " x ".join(f"{a}={s}" for a, s in wanted if s > 1)
          raise ValueError(
            f"{what} {_path_name(path, wildcard=False)} dim {dim} ({name}) has size {size}, "
            f"not divisible by mesh axes {where} (strict sharding)"
          )
        key = (name, size, wanted, kept)
        if key not in found:
          found[key] = []
          order.append(key)
        label = _path_name(path)
        if label not in found[key]:
          found[key].append(label)
      fixed.append(kept[0] if len(kept) == 1 else (kept or None))
    return NamedSharding(mesh, PartitionSpec(*fixed))

  # One pass with paths (strict errors name the array), over `logical_axes`' leaves.
  flat_names, treedef = jax.tree_util.tree_flatten(logical_axes, is_leaf=_is_names)
  flat_arrays = treedef.flatten_up_to(arrays)
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_names)[0]]
  shardings = [
    None if x is None else place(p, x, n) for p, x, n in zip(paths, flat_arrays, flat_names)
  ]
  report = ShardingReport(tuple(Unsharded(k[0], k[1], k[2], k[3], tuple(found[k])) for k in order))
  return treedef.unflatten(shardings), report


def log_report(report: ShardingReport, log: Callable[[str], None] | None = None) -> None:
  """One line per kind of `report`, to `log` (default: the ``sharding`` logger, WARNING)."""
  for line in report.lines():
    (log or _LOG.warning)(line)


def shard_params(
  params,
  logical_axes,
  mesh: Mesh,
  rules: LogicalRules = DEFAULT_RULES,
  strict: bool = False,
  log: Callable[[str], None] | None = None,
):
  """Places a params pytree on `mesh` using a matching pytree of logical names.

  A dimension its mesh axes do not divide is replicated over the axes that do not
  (see `Unsharded`), so small models (e.g. 2 KV heads) still load on a 4-way tensor
  axis; each such kind of dimension is logged once (`log_report`). With `strict` it is a
  ValueError naming the parameter instead. `shard_params_with_report` also returns the
  report.
  """
  return shard_params_with_report(params, logical_axes, mesh, rules, strict, log)[0]


def shard_params_with_report(
  params,
  logical_axes,
  mesh: Mesh,
  rules: LogicalRules = DEFAULT_RULES,
  strict: bool = False,
  log: Callable[[str], None] | None = None,
):
  """`shard_params`, returning (placed params, `ShardingReport`)."""
  shardings, report = plan_shardings(params, logical_axes, mesh, rules, strict)
  log_report(report, log)
  return jax.tree.map(jax.device_put, params, shardings), report
