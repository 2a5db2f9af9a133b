"""Running an op per shard: the one `jax.shard_map` wrapper of every op call.

Under a mesh (`jax.set_mesh`), `jaxllm.ops.call` hands the selected implementation to
`sharded_call`, which splits its arrays as the op's table declares
(`pallas_kernels.op_api.Sharding`: logical axis names of its arguments and output, mapped
to mesh axes by `sharding.logical_to_spec`), runs it per shard and adds partial sums.
Every implementation, Pallas or not, runs this way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import sharding
from pallas_kernels.op_api import Halves, Sharding, is_names


def active_mesh():
  """The active mesh when it has axes not already manual (inside a shard_map), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  manual = jax.sharding.AxisType.Manual
  if all(t == manual for t in mesh.axis_types):
    return None
  return mesh


def _entry(axes: tuple[str, ...]):
  """Mesh axes as a PartitionSpec entry."""
  return axes[0] if len(axes) == 1 else (axes or None)


def _axes_of(entry) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axes."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


@dataclasses.dataclass(frozen=True)
class _Dim:
  """One dimension of one array of a call: its logical name, whether it is a `Halves`
  dimension, its size (None for the output, whose sizes follow the arguments') and the
  mesh axes its array's names give it."""

  name: str | None
  halves: bool
  size: int | None
  axes: tuple[str, ...]

  @property
  def split_size(self) -> int | None:
    """The size the mesh axes must divide (n/2 for halves); None: it cannot split."""
    if not self.halves:
      return self.size
    return self.size // 2 if self.size % 2 == 0 else None


def _dims(what: str, shape, names, mesh_axes, bind) -> list[_Dim]:
  """The `_Dim`s of an array of `shape` (None: unknown sizes) named `names`."""
  if shape is not None and len(names) != len(shape):
    raise ValueError(
      f"{what}: shape {tuple(shape)} has {len(shape)} dims; its sharding names {names} do not"
    )
  plain = [n.name if isinstance(n, Halves) else n for n in names]
  logical = [None if n is None else bind.get(n, n) for n in plain]
  spec = sharding.logical_to_spec(logical, mesh_axes=mesh_axes)
  spec = tuple(spec) + (None,) * (len(names) - len(spec))
  sizes = (None,) * len(names) if shape is None else shape
  return [
    _Dim(name, isinstance(n, Halves), None if size is None else int(size), _axes_of(entry))
    for n, name, size, entry in zip(names, logical, sizes, spec)
  ]


def _resolve(dim_lists: list[list[_Dim]], tied, mesh_shape) -> dict[str, tuple[str, ...]]:
  """Mesh axes of each logical name for one call, the same in every array.

  A name keeps the mesh axes that every array naming it gives it (a mesh axis another
  dimension of one array already takes is dropped everywhere), tied names keep the
  axes common to them all, then the longest prefix of those axes whose size divides
  every dimension so named. A dimension of size 1 is a broadcast and never splits. So
  a dimension the mesh does not divide (3 KV heads on tensor 2) is replicated for this
  call: the shards compute what the unsplit call does, never an uneven cut.
  """
  group_of = {name: tuple(group) for group in tied for name in group}
  occurrences: dict[tuple[str, ...], list[_Dim]] = {}
  for dims in dim_lists:
    for d in dims:
      if d.name is not None and d.size != 1:
        occurrences.setdefault(group_of.get(d.name, (d.name,)), []).append(d)
  axes_of: dict[str, tuple[str, ...]] = {}
  for group, dims in occurrences.items():
    common = dims[0].axes
    for d in dims[1:]:
      common = tuple(a for a in common if a in d.axes)
    sized = [d for d in dims if d.size is not None]  # the output's follow the arguments'
    keep, size = (), 1
    for a in common if sized else ():
      size *= mesh_shape[a]
      if any(d.split_size is None or d.split_size % size for d in sized):
        break
      keep += (a,)
    for name in group:
      axes_of[name] = keep
  return axes_of


def _spec(dims: list[_Dim], axes_of) -> tuple[PartitionSpec, tuple[bool, ...] | None]:
  """An array's PartitionSpec (a split `Halves` dimension as two: None, then its axes)
  and which dimensions its halves view splits in two (None when none does)."""
  entries, split = [], []
  for d in dims:
    axes = () if d.name is None or d.size == 1 else axes_of.get(d.name, ())
    split.append(d.halves and bool(axes))
    entries += [None, _entry(axes)] if split[-1] else [_entry(axes)]
  return PartitionSpec(*entries), (tuple(split) if any(split) else None)


def _halves_view(x, split: tuple[bool, ...]):
  """x with each split dimension n viewed as (2, n/2)."""
  shape = []
  for size, halves in zip(x.shape, split):
    shape += [2, size // 2] if halves else [size]
  return x.reshape(shape)


def _is_array(a) -> bool:
  return hasattr(a, "shape") and hasattr(a, "dtype")


def _leaves_with_names(op: str, spec: Sharding, args) -> tuple[list, list]:
  """Every argument's leaves, each with its names (all None: never split), and the
  arguments' tree structures."""
  flat, treedefs = [], []
  for i, arg in enumerate(args):
    names = spec.args[i] if i < len(spec.args) else None
    leaves, treedef = jax.tree.flatten(arg)
    treedefs.append(treedef)
    name_leaves = [None] * len(leaves)
    if names is not None and leaves:
      name_leaves = jax.tree.leaves(names, is_leaf=is_names)
      if len(name_leaves) != len(leaves):
        raise ValueError(
          f"op {op!r}: argument {i} has {len(leaves)} arrays; its sharding names {names} "
          f"name {len(name_leaves)}"
        )
    for leaf, leaf_names in zip(leaves, name_leaves):
      ndim = leaf.ndim if _is_array(leaf) else 0
      if leaf_names is None or ndim == 0:  # 0-d: one value for every shard
        leaf_names = (None,) * ndim
      flat.append((leaf, leaf_names))
  return flat, treedefs


def sharded_call(
  op: str, spec: Sharding, mesh, run, args: tuple, kwargs: dict, bind: Mapping[str, str | None]
):
  """``run(*args, **kwargs)`` per shard inside `jax.shard_map` on `mesh`, split as `spec` says.

  The one wrapper of every op. Each array dimension `spec` names is split over the mesh
  axes of its logical name (`sharding.logical_to_spec`; placeholders bound by `bind`;
  one assignment per call, see `_resolve`), a `Halves` dimension through its
  ``[2, n/2]`` view; the rest is replicated. Split `spec.summed` dimensions give partial
  sums, added with `psum`; with `spec.row_absmax` the implementation gets the whole
  rows' ``x_absmax``. Non-array arguments and keyword arguments are static. The
  implementation is selected per shard, on the shapes it runs.
  """
  manual = jax.sharding.AxisType.Manual
  mesh_axes = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != manual)
  for key, value in kwargs.items():
    if _is_array(value):
      raise ValueError(f"op {op!r}: keyword argument {key!r} is an array; pass it positionally")
  flat, treedefs = _leaves_with_names(op, spec, args)
  dims = [
    _dims(f"op {op!r} argument array {j}", leaf.shape, names, mesh_axes, bind)
    for j, (leaf, names) in enumerate(flat)
    if _is_array(leaf)
  ]
  out_dims = _dims(f"op {op!r} output", None, spec.out, mesh_axes, bind)
  tied = [[bind.get(n, n) for n in group] for group in spec.tied]
  axes_of = _resolve(dims + [out_dims], tied, dict(mesh.shape))

  in_specs, views, operands = [], [], []
  for leaf_dims, leaf in zip(dims, (leaf for leaf, _ in flat if _is_array(leaf))):
    part, view = _spec(leaf_dims, axes_of)
    in_specs.append(part)
    views.append(view)
    operands.append(_halves_view(leaf, view) if view else leaf)
  out_spec = PartitionSpec(*(_entry(axes_of.get(d.name, ())) if d.name else None for d in out_dims))
  summed = [bind.get(n, n) for n in spec.summed]
  summed_axes = tuple(a for n in summed for a in axes_of.get(n, ()))
  row_axes = None
  if spec.row_absmax and summed_axes:
    row_axes = tuple(i for i, d in enumerate(dims[0]) if d.name in summed)

  def body(*local):
    local = iter(local)
    leaves, view_of = [], iter(views)
    for leaf, _ in flat:
      if not _is_array(leaf):
        leaves.append(leaf)
        continue
      x, view = next(local), next(view_of)
      if view is not None:  # [.., 2, n/2/s, ..] -> [.., n/s, ..]
        x = x.reshape(_unview(x.shape, view))
      leaves.append(x)
    local_args, at = [], 0
    for treedef in treedefs:
      local_args.append(jax.tree.unflatten(treedef, leaves[at : at + treedef.num_leaves]))
      at += treedef.num_leaves
    kw = dict(kwargs)
    if row_axes is not None:
      row_max = jnp.max(jnp.abs(local_args[0].astype(jnp.float32)), axis=row_axes, keepdims=True)
      kw["x_absmax"] = jax.lax.pmax(row_max, summed_axes)
    out = run(*local_args, **kw)
    return jax.lax.psum(out, summed_axes) if summed_axes else out

  # check_vma=False: a pallas_call's output carries no varying-axes type. The specs are
  # built above so that every output shard is what its inputs determine (summed dims psummed).
  mapped = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=tuple(in_specs),
    out_specs=out_spec,
    axis_names=frozenset(mesh_axes),
    check_vma=False,
  )
  return mapped(*operands)


def _unview(local_shape, split: tuple[bool, ...]) -> tuple[int, ...]:
  """A local halves-view shape with each split dimension's (2, m) merged back into 2m."""
  out, j = [], 0
  for halves in split:
    out.append(2 * local_shape[j + 1] if halves else local_shape[j])
    j += 2 if halves else 1
  return tuple(out)
