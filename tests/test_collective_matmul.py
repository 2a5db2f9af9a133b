"""Collective matmul: the ppermute ring == the all-gather version == x @ w, on CPU devices;
the ring's compiled HLO has n-1 collective-permutes between ring neighbours, no all-gather."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sharding.collective_matmul import allgather_matmul, ring_matmul

T, K, N = 48, 32, 40


def _mesh(n: int, name: str = "tensor") -> Mesh:
  return Mesh(np.array(jax.devices()[:n]), (name,))


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((T, K)).astype(np.float32)
  w = rng.standard_normal((K, N)).astype(np.float32)
  return x, w, x.astype(np.float64) @ w.astype(np.float64)


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _permutes(hlo: str) -> list[set[tuple[int, int]]]:
  """Source->target pairs of each collective-permute in compiled HLO text."""
  out = []
  for pairs in re.findall(
    r"collective-permute(?:-start)?\(.*?source_target_pairs=\{(.*?)\}\}", hlo
  ):
    out.append({tuple(int(v) for v in p.strip("{}").split(",")) for p in pairs.split("},{")})
  return out


# (axis size, w layout, ring): every ring and layout, on 4 and 8 devices.
CASES = [
  (4, "columns", "unidirectional"),
  (4, "replicated", "bidirectional"),
  (8, "columns", "bidirectional"),
  (8, "replicated", "unidirectional"),
]


@pytest.mark.parametrize("n, layout, ring", CASES)
def test_ring_equals_allgather_and_reference(n, layout, ring):
  x, w, want = _inputs()
  mesh = _mesh(n)
  ring_c = jax.jit(lambda x, w: ring_matmul(x, w, mesh, w_layout=layout, ring=ring))
  ring_c = ring_c.lower(x, w).compile()
  plain_c = jax.jit(lambda x, w: allgather_matmul(x, w, mesh, w_layout=layout)).lower(x, w)
  plain_c = plain_c.compile()
  got, plain = np.asarray(ring_c(x, w)), np.asarray(plain_c(x, w))
  assert _rel(got, want) < 1e-5, _rel(got, want)
  assert _rel(plain, want) < 1e-5, _rel(plain, want)

  hlo = ring_c.as_text()
  assert not re.search(r"all-gather(-start)?\(", hlo), "ring program has an all-gather"
  assert not re.search(r"all-reduce(-start)?\(", hlo)
  perms = _permutes(hlo)
  assert len(perms) == n - 1, perms
  left = {(j, (j - 1) % n) for j in range(n)}  # each device receives from its right neighbour
  right = {(j, (j + 1) % n) for j in range(n)}
  if ring == "unidirectional":
    assert perms == [left] * (n - 1), perms
  else:  # n/2 hops one way, n/2 - 1 the other
    assert perms.count(left) == n // 2 and perms.count(right) == n // 2 - 1, perms
  assert re.search(r"all-gather(-start)?\(", plain_c.as_text()), "plain form lost its all-gather"


def test_ring_output_layout():
  x, w, want = _inputs()
  y = jax.jit(lambda x, w: ring_matmul(x, w, _mesh(4), w_layout="columns"))(x, w)
  assert y.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  assert _rel(y, want) < 1e-5


@pytest.mark.parametrize(
  "x_shape, w_shape, kw, match",
  [
    ((T, K), (K + 1, N), {}, "contraction mismatch"),
    ((T, K, 1), (K, N), {}, "must be 2-D"),
    ((T + 2, K), (K, N), {}, f"x rows T={T + 2} not divisible by mesh axis 'tensor' of size 4"),
    ((T, K), (K, N + 2), {}, f"w columns N={N + 2} not divisible"),
    ((T, K), (K, N), {"w_layout": "rows"}, "w_layout 'rows' is not one of"),
    ((T, K), (K, N), {"axis": "model"}, "mesh axis 'model' not in mesh axes"),
  ],
)
@pytest.mark.parametrize("fn", [ring_matmul, allgather_matmul], ids=["ring", "allgather"])
def test_bad_shapes_one_line(fn, x_shape, w_shape, kw, match):
  x, w = np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32)
  with pytest.raises(ValueError, match=match) as e:
    fn(x, w, _mesh(4), **kw)
  assert "\n" not in str(e.value)


def test_bad_ring_and_dtype():
  x, w = np.zeros((T, K), np.float32), np.zeros((K, N), np.float16)
  with pytest.raises(ValueError, match="ring 'spiral' is not one of"):
    ring_matmul(x, x.T, _mesh(4), ring="spiral")
  with pytest.raises(ValueError, match="x dtype float32 differs from w dtype float16"):
    ring_matmul(x, w, _mesh(4))
  # A replicated w need not split its columns.
  ones = np.ones((8, 4), np.float32), np.ones((4, 3), np.float32)
  y = jax.jit(lambda x, w: ring_matmul(x, w, _mesh(4), "tensor", "replicated"))(*ones)
  np.testing.assert_allclose(np.asarray(y), np.full((8, 3), 4.0))
