"""Logical-axis sharding: names on arrays, one rules table mapping them to mesh axes."""

from sharding import collective_matmul, distributed, tokenweave
from sharding.rules import (
  DEFAULT_RULES,
  MESH_AXES,
  LogicalRules,
  ShardingReport,
  Unsharded,
  check_mesh_axes,
  constrain,
  log_report,
  logical_to_spec,
  make_mesh,
  parse_mesh,
  plan_shardings,
  shard_params,
  shard_params_with_report,
)

__all__ = [
  "collective_matmul",
  "distributed",
  "tokenweave",
  "DEFAULT_RULES",
  "MESH_AXES",
  "LogicalRules",
  "ShardingReport",
  "Unsharded",
  "check_mesh_axes",
  "constrain",
  "log_report",
  "logical_to_spec",
  "make_mesh",
  "parse_mesh",
  "plan_shardings",
  "shard_params",
  "shard_params_with_report",
]
