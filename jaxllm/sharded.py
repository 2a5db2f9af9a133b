"""A model and its KV caches on a device mesh, by logical axis names.

`sharding` holds the rules (logical name -> mesh axes) and the placement policy; it
cannot import jaxllm. This module knows jaxllm's objects: a model's params get their
names from `jaxllm.params.logical_axes`, a cache's arrays from its class's
``ARRAY_AXES`` (field name -> logical names of the array's leading dims; heads map to
``tensor``, batch to ``data``/``fsdp``, slots, groups, windows and sinks replicated).

* `shard_model`: places a model's params on a mesh (in place), returns the
  `sharding.ShardingReport` of what its axes could not divide (logged once per kind).
* `shard_cache` / `cache_shardings`: the same for a cache (every array, scales, zero
  points, windows, sinks, lengths and flags included).
* `constrain_cache`: inside jit, under ``jax.set_mesh``, pins every cache array to its
  sharding, so a cache stays sharded across decode steps.
* `mesh_of`: the mesh a params tree is already placed on.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import sharding
from jaxllm.model import Llama
from jaxllm.params import logical_axes

Rules = sharding.LogicalRules


def shard_model(
  model: Llama,
  mesh: Mesh,
  rules: Rules = sharding.DEFAULT_RULES,
  strict: bool = False,
  log: Callable[[str], None] | None = None,
) -> sharding.ShardingReport:
  """Places `model`'s params (QTensor parts included) on `mesh`, in place.

  A dimension its mesh axes do not divide is replicated over them (reported once per
  kind through `log`, default the ``sharding`` logger); with `strict` it is a
  ValueError naming the parameter, its dim, size and mesh axes, raised before any
  array moves. Returns the `sharding.ShardingReport`.
  """
  state = nnx.state(model)
  placed, report = sharding.shard_params_with_report(
    state.to_pure_dict(), logical_axes(model), mesh, rules, strict, log
  )
  state.replace_by_pure_dict(placed)
  nnx.update(model, state)
  return report


def mesh_of(tree) -> Mesh | None:
  """The mesh of the first array of `tree` placed by a `NamedSharding` over more than
  one device; None when every array sits on one device."""
  for leaf in jax.tree.leaves(tree):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) and s.mesh.devices.size > 1:
      return s.mesh
  return None


def _field_name(path) -> str | None:
  """The last attribute or dict key on a pytree path (the array's field name)."""
  for key in reversed(path):
    if isinstance(key, jax.tree_util.GetAttrKey):
      return key.name
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
  return None


def cache_logical_axes(cache):
  """A pytree like `cache` whose leaves are the logical-name tuples of its arrays (from
  ``cache.array_axes()`` where the class defines it, else ``type(cache).ARRAY_AXES``,
  truncated to each array's rank).

  Raises ValueError (one line) for a cache class without ``ARRAY_AXES`` or an array
  field it does not name.
  """
  kind = type(cache).__name__
  table = getattr(type(cache), "ARRAY_AXES", None)
  if hasattr(cache, "array_axes"):
    table = cache.array_axes()
  if not isinstance(table, dict):
    raise ValueError(f"cache type {kind} has no ARRAY_AXES: its arrays have no logical axes")

  def names(path, x):
    field = _field_name(path)
    if field not in table:
      raise ValueError(
        f"{kind}: array {jax.tree_util.keystr(path)} (field {field!r}) has no logical axes "
        f"in {kind}.ARRAY_AXES"
      )
    return tuple(table[field])[: len(x.shape)]

  return jax.tree_util.tree_map_with_path(names, cache)


def cache_shardings(
  cache, mesh, rules: Rules = sharding.DEFAULT_RULES, strict: bool = False
) -> tuple:
  """(pytree of `NamedSharding` like `cache`, `sharding.ShardingReport`): where each of
  the cache's arrays goes on `mesh` (a `Mesh`, or an abstract mesh inside jit). Works on
  concrete caches and on `jax.eval_shape` ones."""
  return sharding.plan_shardings(
    cache, cache_logical_axes(cache), mesh, rules, strict, what=f"{type(cache).__name__} array"
  )


def shard_cache(
  cache,
  mesh: Mesh,
  rules: Rules = sharding.DEFAULT_RULES,
  strict: bool = False,
  log: Callable[[str], None] | None = None,
):
  """`cache` with every array placed on `mesh` by its logical names (see
  `cache_shardings`); what the mesh cannot divide is logged once per kind, or with
  `strict` a ValueError."""
  shardings, report = cache_shardings(cache, mesh, rules, strict)
  sharding.log_report(report, log)
  return jax.tree.map(jax.device_put, cache, shardings)


def constrain_cache(cache, rules: Rules = sharding.DEFAULT_RULES):
  """Inside jit: `cache` with every array constrained to its sharding on the current
  mesh (``jax.set_mesh``), the same placement as `shard_cache`; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return cache
  shardings, _ = cache_shardings(cache, mesh, rules)
  return jax.tree.map(jax.lax.with_sharding_constraint, cache, shardings)
