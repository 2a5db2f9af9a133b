"""Layer-parallel decoder layers (EasySpec drafting, issue 27).

A *group* of consecutive layers runs from one input: every layer of the group reads the
group's input x, and the group's output is x plus the sum of the layers' residual deltas,
``x + sum_j (layer_j(x) - x)``. Sequential execution is the special case of groups of one
layer. This approximates the layers in order (each later layer misses what the earlier
ones of its group add), so it is meant for drafts, whose proposals the target verifies.

Two forms of a group:
  * `parallel_group`: the `jaxllm.model.Block` modules themselves, each called on x;
  * `fused_group`: the group's weights joined ahead of time (`fuse_group`) so that a group
    is one matmul for q/k/v of every layer (the attention norm scales folded into the
    weights, since every layer normalizes the same x), one batched matmul per projection
    whose input differs per layer (output, gate/up), and one matmul for every layer's down
    projection together, which also sums their deltas.

`forward` runs a model's embeddings and layers through a cache (each layer writes its keys
and values through the cache's per-layer ``attend``, as `Llama.__call__` does) and returns
the last hidden states; `logits` applies the final norm and LM head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.model import Block, Llama
from jaxllm.rope import apply_rope, rope_tables

Groups = tuple[tuple[int, ...], ...]


def layer_groups(num_layers: int, group_size: int) -> Groups:
  """Consecutive groups of `group_size` layer indices; when `group_size` does not divide
  `num_layers`, the last group holds the remaining layers (fewer than `group_size`)."""
  for name, value in (("num_layers", num_layers), ("group_size", group_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"layer_groups: {name} must be an int >= 1, got {value!r}")
  return tuple(
    tuple(range(i, min(i + group_size, num_layers))) for i in range(0, num_layers, group_size)
  )


def slots_and_rope(cfg: ModelConfig, batch: int, size: int, start: jax.Array, base: jax.Array):
  """Query slots [B, S] (row b from slot base[b]) and their RoPE tables, as the model's."""
  base = jnp.reshape(jnp.asarray(base, jnp.int32), (-1, 1))
  q_slots = base + jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))
  positions = jnp.maximum(q_slots - start[:, None], 0)
  return (q_slots, *rope_tables(positions, cfg.head_dim, cfg.rope_theta))


def _no_tap(name, x):
  del name, x


def _float_weight(block_index: int, name: str, w) -> jax.Array:
  if not isinstance(w, jax.Array) or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(
      f"fuse_group: layer {block_index} weight {name} is {type(w).__name__}, not a float "
      "array; layer-parallel fusion needs float weights (use fuse=False for quantized layers)"
    )
  return w


def fuse_group(blocks: Sequence[Block], first_index: int = 0) -> dict[str, jax.Array]:
  """The weights of `blocks` (one group) joined for `fused_group` (new arrays):

  qkv [E, m * (H + 2 Hkv) * D]: per layer its q, k, v (in that order) times the layer's
  attention-norm scale; o [m, H, D, E]; gate_up [m, E, 2F]: gate and up times the MLP-norm
  scale; down [m * F, E]. `first_index` only names layers in errors."""
  qkv, o, gate_up, down = [], [], [], []
  for j, block in enumerate(blocks):
    i = first_index + j
    get = lambda name, w, i=i: _float_weight(i, name, w)  # noqa: E731
    s_attn = block.attn_norm.scale[...].astype(jnp.float32)[:, None]
    s_mlp = block.mlp_norm.scale[...].astype(jnp.float32)[:, None]
    for name in ("q", "k", "v"):
      w = get(name, getattr(block.attn, name).get_value())
      qkv.append((s_attn * w.reshape(w.shape[0], -1).astype(jnp.float32)).astype(w.dtype))
    o.append(get("o", block.attn.o.get_value()))
    g, u = get("gate", block.mlp.gate.get_value()), get("up", block.mlp.up.get_value())
    gu = jnp.concatenate([g, u], axis=1)
    gate_up.append((s_mlp * gu.astype(jnp.float32)).astype(gu.dtype))
    down.append(get("down", block.mlp.down.get_value()))
  return {
    "qkv": jnp.concatenate(qkv, axis=1),
    "o": jnp.stack(o),
    "gate_up": jnp.stack(gate_up),
    "down": jnp.concatenate(down, axis=0),
  }


def _rms(x: jax.Array, eps: float) -> jax.Array:
  """RMS-normalized x without a scale, in x's dtype (the scale is folded into weights)."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _bmm(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


Attend = Callable[..., tuple[jax.Array, object]]


def fused_group(
  weights: dict[str, jax.Array],
  x: jax.Array,
  cos: jax.Array,
  sin: jax.Array,
  attends: Sequence[Attend],
  cfg: ModelConfig,
  kernels: ops.KernelConfig = ops.KernelConfig(),
):
  """One group, fused (`fuse_group`'s weights): x [B, S, E] -> (x + sum of the group's
  residual deltas, the layers' cache states). ``attends[j](q, k_pre_rope, k, v)`` is layer
  j's attention through the cache, as `Block` takes it."""
  m = len(attends)
  b, s, e = x.shape
  h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  qkv = ops.linear(_rms(x, cfg.norm_eps), weights["qkv"], kernels)
  qkv = qkv.reshape(b, s, m * (h + 2 * kvh), d)
  states, outs = [], []
  for j, attend in enumerate(attends):
    base = j * (h + 2 * kvh)
    q = apply_rope(qkv[:, :, base : base + h], cos, sin)
    k_pre = qkv[:, :, base + h : base + h + kvh]
    v = qkv[:, :, base + h + kvh : base + h + 2 * kvh]
    out, state = attend(q, k_pre, apply_rope(k_pre, cos, sin), v)
    outs.append(out)
    states.append(state)
  attn = _bmm("mbshd,mhde->mbse", jnp.stack(outs), weights["o"])  # each layer's own delta
  mid = x[None] + attn  # each layer's MLP input
  gu = _bmm("mbse,mef->mbsf", _rms(mid, cfg.norm_eps), weights["gate_up"])
  f = cfg.mlp_dim
  act = jax.nn.silu(gu[..., :f]) * gu[..., f:]  # [m, B, S, F]
  act = act.transpose(1, 2, 0, 3).reshape(b, s, m * f)
  mlp = ops.linear(act, weights["down"], kernels)  # sum over the group's layers
  return x + jnp.sum(attn, axis=0) + mlp, states


def parallel_group(
  blocks: Sequence[Block],
  x: jax.Array,
  cos: jax.Array,
  sin: jax.Array,
  attends: Sequence[Attend],
  kernels: ops.KernelConfig = ops.KernelConfig(),
):
  """One group from the `Block` modules: x + sum_j (block_j(x) - x), and the states."""
  total, states = x, []
  for block, attend in zip(blocks, attends, strict=True):
    y, state = block(x, cos, sin, attend, kernels, _no_tap)
    total = total + (y - x)
    states.append(state)
  return total, states


def forward(
  model: Llama,
  tokens: jax.Array,
  cache,
  groups: Groups | None = None,
  fused: Sequence[dict[str, jax.Array]] | None = None,
):
  """Runs `tokens` [B, S] through `model`'s layers with `cache` (row b written from slot
  ``cache.length[b]``). Returns (last hidden states [B, S, E] before the final norm, the
  cache `S` tokens longer).

  groups: None runs the layers in order, exactly as `Llama.__call__`; else layer-parallel
  groups (`layer_groups`) covering every layer in order. fused: with `groups`, one
  `fuse_group` result per group (run by `fused_group`); None runs `parallel_group`.
  """
  cfg, kernels = model.config, model.kernels
  depth = len(model.layers)
  if groups is None:
    groups = tuple((i,) for i in range(depth))
    fused = None
  elif tuple(i for g in groups for i in g) != tuple(range(depth)):
    raise ValueError(f"forward: groups {groups} do not cover the model's {depth} layers in order")
  if fused is not None and len(fused) != len(groups):
    raise ValueError(f"forward: {len(fused)} fused groups for {len(groups)} groups")
  b, s = tokens.shape
  q_slots, cos, sin = slots_and_rope(cfg, b, s, cache.start, cache.length)
  x = model.embed_tokens(tokens)
  states = []
  for g, group in enumerate(groups):
    attends = [
      lambda q, k_pre, k, v, i=i: cache.attend(i, q, k_pre, k, v, q_slots, kernels) for i in group
    ]
    if fused is not None:
      x, group_states = fused_group(fused[g], x, cos, sin, attends, cfg, kernels)
    elif len(group) == 1:
      x, state = model.layers[group[0]](x, cos, sin, attends[0], kernels, _no_tap)
      group_states = [state]
    else:
      blocks = [model.layers[i] for i in group]
      x, group_states = parallel_group(blocks, x, cos, sin, attends, kernels)
    states += group_states
  return x, cache.advance(states, s)


def logits(model: Llama, hidden: jax.Array) -> jax.Array:
  """float32 logits of hidden states [B, S, E]: the final norm and the LM head."""
  x = model.final_norm(hidden)
  head = model.embed if model.config.tie_embeddings else model.lm_head
  axes = head.out_sharding
  return ops.linear(x, head.get_value(), model.kernels, axes=axes).astype(jnp.float32)
