"""The ops the model calls, each run by the implementation its table selects.

Every op has an implementation table in `pallas_kernels` (`pallas_kernels.registry`):
``reference`` (plain jnp), ``xla`` (fused jnp) and, where a kernel exists, one
Pallas implementation per backend (``mosaic_tpu``, ``triton``). `KernelConfig`
says which implementation each op should use; the op's table
(`pallas_kernels.op_api.Op.select`) makes the choice and raises when an explicit
choice cannot run. This module only routes calls: `linear` (float weights, or a
quantized weight that names its matmul op), `attention` and
`block_sparse_attention` and `quantized_kv_attention`.

Under a mesh (`jax.set_mesh`), `call` runs the selected implementation per shard in
`jax.shard_map`, split as the op's table declares (`pallas_kernels.op_api.Sharding`:
logical axis names of its arguments and output, mapped to mesh axes by
`sharding.logical_to_spec`); every implementation, Pallas or not, runs this way.
Without a mesh a call is exactly the implementation's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Protocol

import jax

from jaxllm.sharded_ops import active_mesh, sharded_call
from pallas_kernels import registry
from pallas_kernels.op_api import (
  MATMUL_IN,
  MATMUL_OUT,
  MATMUL_ROWS,
  PALLAS,
  OpError,
)

# Settings that apply to every op (each op has "reference" and "xla"; "pallas"
# applies where an op has a Pallas implementation).
MODEL_SETTINGS = ("pallas", "xla", "reference")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Which implementation each op runs.

  Attributes:
    implementation: for every op: None (the best on this backend: ``xla`` on
      CPU, the Pallas kernel on TPU/GPU where it supports the inputs),
      ``"pallas"`` (each op's Pallas implementation where it has one; on CPU
      this needs `interpret`), ``"xla"`` or ``"reference"``.
    interpret: run Pallas kernels in interpret mode (CPU).
    overrides: ``(op, implementation)`` pairs that replace `implementation` for
      one op, e.g. ``(("quantized_kv_attention", "triton"),)``.
  """

  implementation: str | None = None
  interpret: bool = False
  overrides: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    if self.implementation is not None and self.implementation not in MODEL_SETTINGS:
      raise OpError(
        f"kernel setting {self.implementation!r}; choose one of {MODEL_SETTINGS} or None "
        "(per-op implementations go in overrides)"
      )
    ops = [op for op, _ in self.overrides]
    if len(set(ops)) != len(ops):
      raise OpError(f"kernel overrides name an op twice: {ops}")
    for op, impl in self.overrides:
      registry.get(op).check_request(impl)

  @classmethod
  def parse(cls, text: str, interpret: bool = False) -> KernelConfig:
    """From a flag value: ``""`` (defaults), a setting (``pallas``), ``op=impl`` pairs,
    or both: ``pallas,attention=xla``."""
    implementation, overrides = None, []
    for item in filter(None, (part.strip() for part in text.split(","))):
      if "=" in item:
        op, impl = (s.strip() for s in item.split("=", 1))
        overrides.append((op, impl))
      elif implementation is None:
        implementation = item
      else:
        raise OpError(f"kernel setting {text!r} names two model-wide settings")
    return cls(implementation, interpret, tuple(overrides))

  def request(self, op: str) -> str | None:
    """What this config asks of `op`: an implementation name, "pallas", or None."""
    for name, impl in self.overrides:
      if name == op:
        return impl
    return registry.get(op).request_for(self.implementation)


def call(op: str, config: KernelConfig, *args, names: Mapping[str, str | None] = None, **kwargs):
  """Runs `op` with the implementation `config` requests (selected by the op's table).

  Under a mesh the call runs per shard (`sharded_call`); `names` binds the op's
  placeholder dimension names (the matmul ops' ``rows``/``in``/``out``) to logical names.
  """
  table = registry.get(op)
  run = functools.partial(table, implementation=config.request(op), interpret=config.interpret)
  mesh = active_mesh()
  if mesh is None or table.sharding is None:
    return run(*args, **kwargs)
  return sharded_call(op, table.sharding, mesh, run, args, kwargs, names or {})


class QuantizedWeight(Protocol):
  """What `linear` needs of a quantized weight (`jaxllm.quant.QTensor` is one).

  `matmul_op` names the op that multiplies by it; `matmul_operands(rows)` returns
  that op's positional arguments for float rows ``[M, K]`` (rows first).
  """

  shape: tuple[int, ...]
  contract_dims: int

  @property
  def matmul_op(self) -> str: ...

  def matmul_operands(self, rows: jax.Array) -> tuple: ...


def linear(
  x: jax.Array,
  w,
  config: KernelConfig = KernelConfig(),
  contract_dims: int = 1,
  axes: tuple[str | None, ...] | None = None,
) -> jax.Array:
  """Contracts the last `contract_dims` axes of x with the first of w, f32 accumulation.

  x[..., *K] @ w[*K, *out] -> [..., *out] in x's dtype. `w` is a float array (the
  ``linear`` op) or a `QuantizedWeight` (the op it names). `axes` are the float
  weight's logical names (one per dim of ``w.shape``); under a mesh they say how the
  matmul splits: the first named K dim gives K's name (a split K is row-parallel:
  partial sums), the first named output dim N's (column-parallel), as
  `jaxllm.quant.QTensor.logical_axes` names a quantized weight's parts. Rows are the
  batch's. Without `axes` only rows split (the weight is whole on every device).
  """
  k_shape = x.shape[x.ndim - contract_dims :]
  if tuple(w.shape[:contract_dims]) != tuple(k_shape):
    raise ValueError(f"linear: x {tuple(x.shape)} does not contract with w {tuple(w.shape)}")
  if axes is not None and len(axes) != len(w.shape):
    raise ValueError(f"linear: {len(axes)} logical names {tuple(axes)} for a weight {w.shape}")
  axes = (None,) * len(w.shape) if axes is None else tuple(axes)
  names = {
    MATMUL_ROWS: "batch",
    MATMUL_IN: next((a for a in axes[:contract_dims] if a is not None), None),
    MATMUL_OUT: next((a for a in axes[contract_dims:] if a is not None), None),
  }
  lead = x.shape[: x.ndim - contract_dims]
  rows = x.reshape(math.prod(lead), math.prod(k_shape))
  if callable(getattr(type(w), "matmul_operands", None)):  # a QuantizedWeight
    if w.contract_dims != contract_dims:
      raise ValueError(
        f"linear: the quantized weight contracts {w.contract_dims} dims, "
        f"linear asked for {contract_dims}"
      )
    out = call(w.matmul_op, config, *w.matmul_operands(rows), names=names)
  else:
    out = call("linear", config, rows, w.reshape(rows.shape[-1], -1), names=names)
  return out.reshape(*lead, *w.shape[contract_dims:])


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_slots: jax.Array,
  kv_start: jax.Array,
  config: KernelConfig = KernelConfig(),
) -> jax.Array:
  """Causal grouped-query attention over a slot-indexed key/value buffer.

  Args:
    q: [B, S, Hq, D] queries.
    k, v: [B, Hkv, T, D] keys/values in cache layout (T slots).
    q_slots: [B, S] int32 slot of each query; key slot t is visible to a query
      at slot s iff ``kv_start[b] <= t <= s``. Slots past the newest query are
      never visible, so stale cache entries beyond the length are ignored.
    kv_start: [B] int32 first valid slot of each row (left padding).
    config: implementation choice.

  Returns:
    [B, S, Hq, D] in q's dtype.
  """
  return call("attention", config, q, k, v, q_slots, kv_start)


def block_sparse_attention(
  q, k, v, q_slots, kv_start, block_indices, *, block_q: int, block_k: int, config
) -> jax.Array:
  """Attention over the key blocks `block_indices` [B, Hkv, tiles, top_k] selects for each
  tile of `block_q` queries (blocks of `block_k` slots; -1 = none); causal and left-padding
  visibility as `attention`. [B, S, Hq, D] in q's dtype (see the op's api.py)."""
  return call(
    "block_sparse_attention",
    config,
    q,
    k,
    v,
    q_slots,
    kv_start,
    block_indices,
    block_q=block_q,
    block_k=block_k,
  )


def quantized_kv_attention(
  q, kv, start, quantized_length, length, k_residual, v_residual, *, bits, group_size, config
):
  """One decode query per row over a KIVI-packed cache: [B, Hq, D] (see the op's api.py)."""
  return call(
    "quantized_kv_attention",
    config,
    q,
    kv,
    start,
    quantized_length,
    length,
    k_residual,
    v_residual,
    bits=bits,
    group_size=group_size,
  )


__all__ = [
  "PALLAS",
  "KernelConfig",
  "QuantizedWeight",
  "attention",
  "block_sparse_attention",
  "call",
  "linear",
  "quantized_kv_attention",
]
