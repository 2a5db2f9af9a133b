"""A tensor-parallel transformer block in `jax.shard_map`, plain and TokenWeave-style.

The block is a pre-norm Llama block over one sequence of T tokens, ``x [T, E]``::

    h   = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1)))   n1 = rmsnorm(x) * attn_norm
    out = h + down(silu(gate(n2)) * up(n2))                    n2 = rmsnorm(h) * mlp_norm

with causal grouped-query attention over the T tokens and rotary embeddings at
positions 0..T-1 (rotate-half convention; ``BlockConfig.rope_theta=None`` omits RoPE).
It is written in plain jnp over explicit weight arrays (`BlockWeights`), Megatron
layout on the mesh axis ``axis`` (default ``"tensor"``): q/k/v sharded by heads and
gate/up by MLP columns (column-parallel), o and down sharded on their input rows
(row-parallel), so each device's o and down produce a partial sum over its shard.

`baseline_block`: x replicated; each partial sum is all-reduced (`psum`), then the
residual add and the next RMSNorm run replicated on every device.

`tokenweave_block`:
  (a) The T tokens are two halves, A (positions 0..T/2-1) and B (T/2..T-1), each with
      its own chain of ops. Attention of B needs A's keys and values: B's chain reads
      the K/V that A's chain projected (after A's first all-gather, before its first
      reduction), so the only edge between the chains is A's K/V. A's reduce-scatter after o can run
      while B computes attention; B's reductions can run while A computes its MLP.
  (b) The all-reduce after o and after down becomes a reduce-scatter over tokens
      (`psum_scatter`), then the residual add and the RMSNorm on this device's token
      shard, then an `all_gather` of the normed activations only. The residual stream
      stays token-sharded: the block takes and returns it sharded, and starts with
      RMSNorm on the shard plus all-gather, which is the tail of the previous block's
      down-projection reduction. A stack of blocks therefore runs reduce-scatter ->
      add -> norm -> all-gather at every reduction.

Token layout of `tokenweave_block`: each half is sharded over the axis, so device i
holds rows ``[A_i; B_i]`` where ``A_i``/``B_i`` are the i-th of n contiguous chunks of
each half. `weave_tokens` / `unweave_tokens` convert a sequence-ordered ``[T, E]``
array to and from that order (a permutation of rows, done once before the first block
and after the last in a stack).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_eps: float = 1e-5
  rope_theta: float | None = 10000.0  # None: no rotary embedding


class BlockWeights(NamedTuple):
  """One block's weights; E embed, H/Hkv heads, D head_dim, F mlp width."""

  attn_norm: jax.Array  # [E]
  wq: jax.Array  # [E, H, D]
  wk: jax.Array  # [E, Hkv, D]
  wv: jax.Array  # [E, Hkv, D]
  wo: jax.Array  # [H, D, E]
  mlp_norm: jax.Array  # [E]
  w_gate: jax.Array  # [E, F]
  w_up: jax.Array  # [E, F]
  w_down: jax.Array  # [F, E]


def init_block_weights(
  seed: int, cfg: BlockConfig, embed: int, mlp: int, dtype=jnp.float32
) -> BlockWeights:
  """Random weights from ``numpy.random.default_rng(seed)``, scaled so activations stay
  O(1) (host-side: cheaper than compiling nine random draws for a test)."""
  rng = np.random.default_rng(seed)
  h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def normal(shape, fan_in):
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), dtype)

  def scale():
    return jnp.asarray(1.0 + 0.1 * rng.standard_normal(embed), dtype)

  return BlockWeights(
    attn_norm=scale(),
    wq=normal((embed, h, d), embed),
    wk=normal((embed, hkv, d), embed),
    wv=normal((embed, hkv, d), embed),
    wo=normal((h, d, embed), h * d),
    mlp_norm=scale(),
    w_gate=normal((embed, mlp), embed),
    w_up=normal((embed, mlp), embed),
    w_down=normal((mlp, embed), mlp),
  )


def _weight_specs(axis: str) -> BlockWeights:
  return BlockWeights(
    attn_norm=P(None),
    wq=P(None, axis, None),
    wk=P(None, axis, None),
    wv=P(None, axis, None),
    wo=P(axis, None, None),
    mlp_norm=P(None),
    w_gate=P(None, axis),
    w_up=P(None, axis),
    w_down=P(axis, None),
  )


def _check(x, w: BlockWeights, cfg: BlockConfig, mesh: Mesh, axis: str, halves: int) -> int:
  """One-line errors for every shape the block cannot run; returns the axis size."""
  if axis not in mesh.axis_names:
    raise ValueError(f"tokenweave: mesh axis {axis!r} not in mesh axes {mesh.axis_names}")
  n = mesh.shape[axis]
  if x.ndim != 2:
    raise ValueError(f"tokenweave: x must be [T, E] (one sequence), got shape {tuple(x.shape)}")
  t, e = x.shape
  h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if h % hkv:
    raise ValueError(f"tokenweave: num_heads {h} not divisible by num_kv_heads {hkv}")
  if hkv % n:
    raise ValueError(
      f"tokenweave: num_kv_heads {hkv} (num_heads {h}) not divisible by mesh axis {axis!r} "
      f"of size {n}"
    )
  mlp = w.w_gate.shape[-1]
  want = BlockWeights(
    (e,), (e, h, d), (e, hkv, d), (e, hkv, d), (h, d, e), (e,), (e, mlp), (e, mlp), (mlp, e)
  )
  for name, arr, shape in zip(BlockWeights._fields, w, want):
    if tuple(arr.shape) != shape:
      raise ValueError(f"tokenweave: weight {name} has shape {tuple(arr.shape)}, want {shape}")
    if arr.dtype != x.dtype:
      raise ValueError(f"tokenweave: weight {name} dtype {arr.dtype} differs from x {x.dtype}")
  if mlp % n:
    raise ValueError(f"tokenweave: mlp width {mlp} not divisible by mesh axis {axis!r} of size {n}")
  if halves > 1 and t % (halves * n):
    raise ValueError(
      f"tokenweave: token count {t} not divisible by 2 x mesh axis {axis!r} size = {halves * n}"
    )
  return n


def _rms_norm(x, scale, eps):
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _rope(x, positions, theta):
  """x [T, heads, D], rotate-half convention."""
  if theta is None:
    return x
  half = x.shape[-1] // 2
  inv = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  ang = positions.astype(jnp.float32)[:, None] * inv[None, :]
  cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _qkv(n1, w: BlockWeights, cfg: BlockConfig, positions):
  """This device's heads: q [T, Hl, D], k/v [T, Hkvl, D]."""
  q = jnp.einsum("te,ehd->thd", n1, w.wq)
  k = jnp.einsum("te,ehd->thd", n1, w.wk)
  v = jnp.einsum("te,ehd->thd", n1, w.wv)
  return _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta), v


def _attention(q, k, v, q_positions, k_positions):
  """Causal GQA over local heads; q [Tq, Hl, D], k/v [Tk, Hkvl, D] -> [Tq, Hl, D]."""
  tq, hl, d = q.shape
  hkvl = k.shape[1]
  qg = q.reshape(tq, hkvl, hl // hkvl, d)
  s = jnp.einsum("qkgd,skd->kgqs", qg, k).astype(jnp.float32) / np.sqrt(d)
  mask = q_positions[:, None] >= k_positions[None, :]
  s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("kgqs,skd->qkgd", p, v)
  return o.reshape(tq, hl, d)


def _mlp_partial(n2, w: BlockWeights):
  return (jax.nn.silu(n2 @ w.w_gate) * (n2 @ w.w_up)) @ w.w_down


def _baseline_body(x, w: BlockWeights, *, cfg: BlockConfig, axis: str):
  pos = jnp.arange(x.shape[0])
  n1 = _rms_norm(x, w.attn_norm, cfg.rms_eps)
  q, k, v = _qkv(n1, w, cfg, pos)
  attn = jnp.einsum("thd,hde->te", _attention(q, k, v, pos, pos), w.wo)
  h = x + jax.lax.psum(attn, axis)
  n2 = _rms_norm(h, w.mlp_norm, cfg.rms_eps)
  return h + jax.lax.psum(_mlp_partial(n2, w), axis)


def _norm_gather(x_shard, scale, cfg: BlockConfig, axis: str):
  """RMSNorm on this device's token shard, then all-gather over tokens."""
  return jax.lax.all_gather(_rms_norm(x_shard, scale, cfg.rms_eps), axis, tiled=True)


def _reduce_scatter(partial, axis: str):
  return jax.lax.psum_scatter(partial, axis, scatter_dimension=0, tiled=True)


def _tokenweave_body(x, w: BlockWeights, *, cfg: BlockConfig, axis: str, half_len: int):
  rows = x.shape[0] // 2
  xa, xb = x[:rows], x[rows:]  # this device's shard of half A and of half B
  pos_a = jnp.arange(half_len)
  pos_b = half_len + pos_a
  # Both halves: norm on the shard, gather the normed tokens, project q/k/v.
  qa, ka, va = _qkv(_norm_gather(xa, w.attn_norm, cfg, axis), w, cfg, pos_a)
  qb, kb, vb = _qkv(_norm_gather(xb, w.attn_norm, cfg, axis), w, cfg, pos_b)
  # Half A attends to itself; half B to A's and its own keys (the one cross-chain edge).
  attn_a = jnp.einsum("thd,hde->te", _attention(qa, ka, va, pos_a, pos_a), w.wo)
  kab, vab = jnp.concatenate([ka, kb]), jnp.concatenate([va, vb])
  attn_b = jnp.einsum(
    "thd,hde->te", _attention(qb, kab, vab, pos_b, jnp.arange(2 * half_len)), w.wo
  )
  # Reduce-scatter -> residual add -> RMSNorm on the shard -> all-gather, per half.
  ha = xa + _reduce_scatter(attn_a, axis)
  hb = xb + _reduce_scatter(attn_b, axis)
  out_a = ha + _reduce_scatter(_mlp_partial(_norm_gather(ha, w.mlp_norm, cfg, axis), w), axis)
  out_b = hb + _reduce_scatter(_mlp_partial(_norm_gather(hb, w.mlp_norm, cfg, axis), w), axis)
  return jnp.concatenate([out_a, out_b])


def baseline_block(
  x: jax.Array, weights: BlockWeights, cfg: BlockConfig, mesh: Mesh, axis: str = "tensor"
) -> jax.Array:
  """The unsplit block: x [T, E] replicated in and out, `psum` after o and after down."""
  _check(x, weights, cfg, mesh, axis, halves=1)
  body = functools.partial(_baseline_body, cfg=cfg, axis=axis)
  return jax.shard_map(body, mesh=mesh, in_specs=(P(), _weight_specs(axis)), out_specs=P())(
    x, weights
  )


def tokenweave_block(
  x: jax.Array, weights: BlockWeights, cfg: BlockConfig, mesh: Mesh, axis: str = "tensor"
) -> jax.Array:
  """The TokenWeave block: x [T, E] in the woven token order (`weave_tokens`), sharded
  over `axis` on tokens, in and out; two token halves, reduce-scatter/all-gather."""
  _check(x, weights, cfg, mesh, axis, halves=2)
  body = functools.partial(_tokenweave_body, cfg=cfg, axis=axis, half_len=x.shape[0] // 2)
  return jax.shard_map(
    body, mesh=mesh, in_specs=(P(axis, None), _weight_specs(axis)), out_specs=P(axis, None)
  )(x, weights)


def _woven_order(t: int, n: int) -> np.ndarray:
  """Row r of the woven array is token _woven_order(t, n)[r]."""
  if t % (2 * n):
    raise ValueError(f"tokenweave: token count {t} not divisible by 2 x axis size = {2 * n}")
  c = t // (2 * n)
  # [half, device, row] in sequence order -> [device, half, row] in woven order
  return np.arange(t).reshape(2, n, c).transpose(1, 0, 2).reshape(t)


def weave_tokens(x, n: int):
  """Sequence order -> the woven order `tokenweave_block` expects, for axis size n."""
  return x[_woven_order(x.shape[0], n)]


def unweave_tokens(x, n: int):
  """The woven order -> sequence order."""
  return x[np.argsort(_woven_order(x.shape[0], n))]
