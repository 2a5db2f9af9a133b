"""A Llama-family decoder in Flax NNX.

Every parameter carries logical axis names (``out_sharding`` metadata, never
eagerly applied); key activations are constrained by name through `sharding`.
Matmuls and attention go through `jaxllm.ops`, so kernels plug in by config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.kv_cache.base import Cache
from jaxllm.kv_cache.dense import DenseKVCache
from jaxllm.rope import apply_rope, rope_tables


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, scale: float | None = None) -> nnx.Param:
  """A parameter named by logical `axes`: normal(0, scale), ones when scale is
  None, and zeros when `rngs` is None (placeholders to be overwritten)."""
  if rngs is None:
    value = jnp.zeros(shape, dtype)
  elif scale is None:
    value = jnp.ones(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _linear(x, param: nnx.Param, kernels: ops.KernelConfig, contract_dims: int = 1):
  """`ops.linear` by a weight parameter, with its logical axis names (so that under a
  mesh the matmul splits as the weight is sharded)."""
  return ops.linear(x, param.get_value(), kernels, contract_dims, axes=param.out_sharding)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
    self.scale = _param(rngs, (dim,), ("norm",), dtype)
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
    e, h, kvh, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), dtype, e**-0.5)
    self.k = _param(rngs, (e, kvh, d), ("embed", "kv_heads", "head_dim"), dtype, e**-0.5)
    self.v = _param(rngs, (e, kvh, d), ("embed", "kv_heads", "head_dim"), dtype, e**-0.5)
    self.o = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), dtype, (h * d) ** -0.5)

  def __call__(self, x, cos, sin, attend, kernels, tap):
    """`attend(q, k_pre_rope, k, v)` -> (out, layer cache state) is the cache's."""
    tap("attn_in", x)
    q = _linear(x, self.q, kernels)  # [B, S, H, D]
    k_pre = _linear(x, self.k, kernels)
    v = _linear(x, self.v, kernels)
    q = sharding.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
    k = apply_rope(k_pre, cos, sin)
    tap("k_pre_rope", k_pre)
    tap("k", k)
    tap("v", v)
    out, layer_state = attend(q, k_pre, k, v)
    tap("o_in", out)
    out = _linear(out, self.o, kernels, contract_dims=2)
    return out, layer_state


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
    e, f = cfg.embed_dim, cfg.mlp_dim
    self.gate = _param(rngs, (e, f), ("embed", "mlp"), dtype, e**-0.5)
    self.up = _param(rngs, (e, f), ("embed", "mlp"), dtype, e**-0.5)
    self.down = _param(rngs, (f, e), ("mlp", "embed"), dtype, f**-0.5)

  def __call__(self, x, kernels, tap):
    tap("mlp_in", x)
    h = jax.nn.silu(_linear(x, self.gate, kernels)) * _linear(x, self.up, kernels)
    h = sharding.constrain(h, ("batch", "length", "act_mlp"))
    tap("down_in", h)
    return _linear(h, self.down, kernels)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, rngs=rngs, dtype=dtype)
    self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, rngs=rngs, dtype=dtype)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x, cos, sin, attend, kernels, tap):
    h, layer_state = self.attn(self.attn_norm(x), cos, sin, attend, kernels, tap)
    x = sharding.constrain(x + h, ("batch", "length", "act_embed"))
    x = x + self.mlp(self.mlp_norm(x), kernels, tap)
    return sharding.constrain(x, ("batch", "length", "act_embed")), layer_state


class Llama(nnx.Module):
  """Decoder-only transformer: embed -> N x (attn + SwiGLU) -> norm -> LM head."""

  def __init__(
    self,
    cfg: ModelConfig,
    *,
    rngs: nnx.Rngs | None,
    dtype=jnp.float32,
    kernels: ops.KernelConfig = ops.KernelConfig(),
  ):
    self.config = cfg
    self.kernels = kernels
    # Stored [embed, vocab]: the tied LM head is then a plain x @ W, which XLA:CPU
    # runs at full memory bandwidth (x @ W.T is much slower at batch 1; figure in
    # docs/results.md); the lookup gathers columns instead of rows, which is as cheap.
    self.embed = _param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), dtype, 1.0)
    self.layers = nnx.List([Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, rngs=rngs, dtype=dtype)
    if not cfg.tie_embeddings:
      self.lm_head = _param(
        rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), dtype, cfg.embed_dim**-0.5
      )

  @property
  def dtype(self):
    return self.embed.get_value().dtype

  def __call__(
    self,
    tokens: jax.Array,
    cache: Cache | None = None,
    start: jax.Array | None = None,
    logits_at: str = "all",
    taps: dict[str, jax.Array] | None = None,
  ):
    """Runs `tokens` [B, S] and returns (logits, cache).

    Args:
      tokens: int32 [B, S].
      cache: with a cache, row b's tokens are written from slot ``cache.length[b]``
        (each row has its own length) and attend to everything cached in that row; without one, they attend causally among
        themselves and the returned cache is a `DenseKVCache` of exactly their S slots.
      start: [B] first valid slot per row when `cache` is None (left padding).
      logits_at: "all" for [B, S, V] logits, "last" for [B, 1, V].
      taps: if given, filled with named activations ("{layer}.attn_in", ".k_pre_rope",
        ".k", ".v", ".o_in", ".mlp_in", ".down_in"): the inputs of every linear layer
        and the keys before/after RoPE, for calibration.

    The cache may be anything that follows `jaxllm.kv_cache.base.Cache` (every
    `jaxllm.kv_cache` implementation does): each layer hands it queries (after RoPE),
    keys before and after RoPE and values, and it returns the attention output and
    its new per-layer state.
    """
    cfg = self.config
    b, s = tokens.shape
    if cache is None:
      start = jnp.zeros((b,), jnp.int32) if start is None else start.astype(jnp.int32)
      base = jnp.zeros((), jnp.int32)
    else:
      start, base = cache.start, cache.length
    q_slots, cos, sin = _slots_and_rope(cfg, b, s, start, base)
    x = self.embed_tokens(tokens)
    layer_states = []
    for i, layer in enumerate(self.layers):
      if cache is None:
        attend = lambda q, k_pre, k, v: _attend_chunk(q, k, v, q_slots, start, self.kernels)
      else:
        attend = lambda q, k_pre, k, v, i=i: cache.attend(i, q, k_pre, k, v, q_slots, self.kernels)
      tap = _no_tap if taps is None else lambda name, x, i=i: taps.__setitem__(f"{i}.{name}", x)
      x, layer_state = layer(x, cos, sin, attend, self.kernels, tap)
      layer_states.append(layer_state)

    if logits_at == "last":
      x = x[:, -1:]
    elif logits_at != "all":
      raise ValueError(f"logits_at must be 'all' or 'last', got {logits_at!r}")
    x = self.final_norm(x)
    head = self.embed if cfg.tie_embeddings else self.lm_head
    logits = _linear(x, head, self.kernels).astype(jnp.float32)
    logits = sharding.constrain(logits, ("batch", "length", "act_vocab"))

    if cache is None:
      cache = DenseKVCache.from_views(
        [k for k, _ in layer_states], [v for _, v in layer_states], start
      )
    else:
      cache = cache.advance(layer_states, s)
    return logits, cache

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The first layer's input [B, S, E] for `tokens` [B, S]."""
    x = jnp.take(self.embed[...], tokens, axis=1).transpose(1, 2, 0).astype(self.dtype)
    return sharding.constrain(x, ("batch", "length", "act_embed"))


def _slots_and_rope(cfg: ModelConfig, b: int, s: int, start, base):
  """Query slots [B, S] (row b from slot base[b]; `base` a scalar or [B]) and their RoPE tables."""
  base = jnp.reshape(jnp.asarray(base, jnp.int32), (-1, 1))
  q_slots = base + jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  positions = jnp.maximum(q_slots - start[:, None], 0)
  return (q_slots, *rope_tables(positions, cfg.head_dim, cfg.rope_theta))


def run_block(block: Block, x: jax.Array, cfg: ModelConfig, kernels: ops.KernelConfig, tap=None):
  """One decoder layer over a cacheless chunk x [B, S, E] starting at position 0, as
  `Llama.__call__` runs it; `tap(name, x)` sees its named activations. Lets calibration
  run the layers one at a time."""
  b, s = x.shape[:2]
  start = jnp.zeros((b,), jnp.int32)
  q_slots, cos, sin = _slots_and_rope(cfg, b, s, start, jnp.zeros((), jnp.int32))
  attend = lambda q, k_pre, k, v: _attend_chunk(q, k, v, q_slots, start, kernels)  # noqa: E731
  return block(x, cos, sin, attend, kernels, tap or _no_tap)[0]


def _no_tap(name, x):
  del name, x


def _attend_chunk(q, k, v, q_slots, start, kernels):
  """Causal attention within one chunk (no cache); the state is its [B, Hkv, S, D] K/V."""
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return ops.attention(q, k, v, q_slots, start, kernels), (k, v)
