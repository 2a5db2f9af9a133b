"""Logical-axis sharding: names on arrays, one rules table mapping them to mesh axes."""

from sharding.rules import (
  DEFAULT_RULES,
  MESH_AXES,
  LogicalRules,
  constrain,
  logical_to_spec,
  make_mesh,
  shard_params,
)

__all__ = [
  "DEFAULT_RULES",
  "MESH_AXES",
  "LogicalRules",
  "constrain",
  "logical_to_spec",
  "make_mesh",
  "shard_params",
]
