"""All-gather-then-matmul as a ring of partial matmuls (collective matmul) in `jax.shard_map`.

The layer: ``y = x @ w`` with ``x [T, K]`` sharded on its rows (tokens) over a mesh axis
of size n and ``w [K, N]`` either column-sharded over the same axis (a column-parallel
layer fed by a sequence-sharded activation) or replicated. The plain form all-gathers
``x`` and then multiplies; every device waits for the whole gather before its matmul.

The ring form never gathers. Device i starts with row chunk i and, at each step,
multiplies the chunk it holds into the matching rows of its output while the same
chunk travels one hop around the ring (`jax.lax.ppermute`). After n-1 hops every
device has multiplied every chunk. The hop of step s+1 does not depend on the matmul
of step s, so a backend with asynchronous collectives can run them concurrently; the
bytes moved are the same as the all-gather's.

The bidirectional ring sends the held chunk both ways: after step s a device holds
chunk i+s (from its right neighbour) and chunk i-s (from its left), so it finishes in
ceil((n-1)/2) rounds, each with two hops on different links.

Both rings are unrolled Python loops (n-1 collective-permutes in the program), which
suits the small axis sizes of tensor parallelism.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

W_LAYOUTS = ("columns", "replicated")
RINGS = ("unidirectional", "bidirectional")


def _check(x, w, mesh: Mesh, axis: str, w_layout: str) -> int:
  """Validates shapes, dtypes, the axis and the layout; returns the axis size."""
  if axis not in mesh.axis_names:
    raise ValueError(f"collective matmul: mesh axis {axis!r} not in mesh axes {mesh.axis_names}")
  if w_layout not in W_LAYOUTS:
    raise ValueError(f"collective matmul: w_layout {w_layout!r} is not one of {W_LAYOUTS}")
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(
      f"collective matmul: x and w must be 2-D ([T, K] and [K, N]), got x {tuple(x.shape)} "
      f"and w {tuple(w.shape)}"
    )
  if x.shape[1] != w.shape[0]:
    raise ValueError(
      f"collective matmul: contraction mismatch, x {tuple(x.shape)} has K={x.shape[1]} but w "
      f"{tuple(w.shape)} has K={w.shape[0]}"
    )
  if x.dtype != w.dtype:
    raise ValueError(f"collective matmul: x dtype {x.dtype} differs from w dtype {w.dtype}")
  n = mesh.shape[axis]
  if x.shape[0] % n:
    raise ValueError(
      f"collective matmul: x rows T={x.shape[0]} not divisible by mesh axis {axis!r} of size {n}"
    )
  if w_layout == "columns" and w.shape[1] % n:
    raise ValueError(
      f"collective matmul: w columns N={w.shape[1]} not divisible by mesh axis {axis!r} "
      f"of size {n} (w_layout='columns')"
    )
  return n


def _specs(axis: str, w_layout: str):
  w_spec = P(None, axis) if w_layout == "columns" else P(None, None)
  out_spec = P(None, axis) if w_layout == "columns" else P(None, None)
  return (P(axis, None), w_spec), out_spec


def allgather_matmul(x, w, mesh: Mesh, axis: str = "tensor", w_layout: str = "columns"):
  """The plain form: all-gather the row shards of ``x``, then one local matmul.

  Returns ``x @ w`` [T, N], column-sharded over `axis` (``w_layout='columns'``) or
  replicated (``'replicated'``).
  """
  _check(x, w, mesh, axis, w_layout)
  in_specs, out_spec = _specs(axis, w_layout)

  def body(x_blk, w_blk):
    return jax.lax.all_gather(x_blk, axis, tiled=True, to="invarying") @ w_blk

  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec)(x, w)


def _ring_body(x_blk, w_blk, *, axis: str, n: int, ring: str):
  """One device's part: the output rows of every chunk, filled as chunks pass by."""
  rows = x_blk.shape[0]
  me = jax.lax.axis_index(axis)
  out = jnp.zeros((rows * n, w_blk.shape[1]), jnp.result_type(x_blk, w_blk))

  def put(out, chunk, owner):
    start = (owner % n) * rows
    return jax.lax.dynamic_update_slice_in_dim(out, chunk @ w_blk, start, axis=0)

  # Receiving from the right neighbour (i+1) means sending to the left one (i-1).
  from_right = [(j, (j - 1) % n) for j in range(n)]
  from_left = [(j, (j + 1) % n) for j in range(n)]
  out = put(out, x_blk, me)
  if ring == "unidirectional":
    held = x_blk
    for step in range(1, n):
      held = jax.lax.ppermute(held, axis, from_right)
      out = put(out, held, me + step)
    return out
  right, left = x_blk, x_blk
  for step in range(1, n // 2 + 1):
    right = jax.lax.ppermute(right, axis, from_right)
    out = put(out, right, me + step)
    if step < n - step:  # chunk i+n/2 (n even) arrives once, from the right
      left = jax.lax.ppermute(left, axis, from_left)
      out = put(out, left, me - step)
  return out


def ring_matmul(
  x,
  w,
  mesh: Mesh,
  axis: str = "tensor",
  w_layout: str = "columns",
  ring: str = "unidirectional",
):
  """``x @ w`` as a `ppermute` ring of partial matmuls; same layouts as `allgather_matmul`."""
  if ring not in RINGS:
    raise ValueError(f"collective matmul: ring {ring!r} is not one of {RINGS}")
  n = _check(x, w, mesh, axis, w_layout)
  in_specs, out_spec = _specs(axis, w_layout)
  body = functools.partial(_ring_body, axis=axis, n=n, ring=ring)
  # With a replicated w every device ends with the same full product, which the varying
  # axis_index in the ring hides from shard_map's replication check.
  return jax.shard_map(
    body, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=w_layout == "columns"
  )(x, w)
