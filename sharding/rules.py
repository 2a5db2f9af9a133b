"""The one table that maps logical axis names to mesh axes.

Model code names every parameter dimension and key activation dimension with a
logical name (``"embed"``, ``"heads"``, ...). Only this module knows how those
names land on a device mesh with axes ``data, fsdp, tensor, expert``; changing
the parallelism layout is an edit of `DEFAULT_RULES`, not of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

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
  ("cache_rows", ("data", "fsdp")),  # DenseKVCache stores [batch * kv_heads, length, head_dim]
  ("cache_length", None),
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


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
  """Builds a mesh over `devices` with axes MESH_AXES; unspecified axes get size 1.

  With no `shape`, every device goes on the ``data`` axis.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  shape = dict(shape or {"data": devices.size})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {devices.size}"
    )
  return Mesh(devices.reshape(sizes), MESH_AXES)


def shard_params(params, logical_axes, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
  """Places a params pytree on `mesh` using a matching pytree of logical names.

  A dimension whose size does not divide its mesh axes is replicated instead,
  so small models (e.g. 3 KV heads) still load on an 8-way tensor axis.
  """

  def place(x, names):
    spec = logical_to_spec(names, rules, mesh.axis_names)
    fixed = []
    for dim, axes in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
      size = int(
        np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else (axes or ()))])
      )
      fixed.append(axes if dim % size == 0 else None)
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*fixed)))

  return jax.tree.map(
    place,
    params,
    logical_axes,
    is_leaf=lambda n: isinstance(n, tuple) and all(isinstance(a, (str, type(None))) for a in n),
  )
