"""Abstract inputs for every op at the named model shapes: what the chip checks compile.

A `Case` is one op call with `jax.ShapeDtypeStruct` arguments (no data): the op's
name, a label (model, layer, rows), positional arguments and static keyword
arguments. `cases(op_name, models)` lists them for the models in
`pallas_kernels.shapes`:
  * quantized matmuls: every distinct linear of the model at M = 1 (decode; SmolLM2)
    and M = 128 (a prefill block), bf16 activations, each op's serving format (W4A16:
    groups of 128 over K padded to a multiple of 128, as recipe ``w4a16_g128``;
    FireQ: groups of 32 on SmolLM2, 128 on Llama-3-8B);
  * ``quantized_kv_attention``: one decode step for 2 rows over a 4096-token cache
    and a 128-token full-precision window, 2, 4 and 8 bits (key groups 128, 64, 32);
  * ``linear`` (XLA only): the model's projections; ``attention``: a 2048-token
    causal prefill, a 64-token chunk against a 1024-slot buffer, and a decode step
    of 8 rows against 4096 slots;
  * ``block_sparse_attention`` (MoBA): a 2048-token prefill and a decode step of 8 rows
    against 4096 slots, key blocks of 64 (query tiles of 64), top-8.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import shapes
from pallas_kernels.quantized_kv_attention.packing import QuantizedKV

MODELS = ("smollm2", "llama3_8b")
# Rows M per model: decode (1) and a prefill block (128) on SmolLM2, a prefill block on
# Llama-3-8B (its decode blocks are the same kernels with smaller tiles).
MATMUL_ROWS = {"smollm2": (1, 128), "llama3_8b": (128,)}
KV_BITS_GROUPS = ((2, 128), (4, 64), (8, 32))
KV_CONTEXT, KV_WINDOW, KV_BATCH = 4096, 128, 2
MOBA_BLOCK, MOBA_TOP_K = 64, 8


@dataclasses.dataclass(frozen=True)
class Case:
  """One op call on abstract inputs."""

  op: str
  label: str
  args: tuple
  kwargs: dict = dataclasses.field(default_factory=dict)

  def with_sharding(self, sharding) -> Case:
    """The same case with every array placed by `sharding` (a compile-only device)."""

    def place(a):
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    return dataclasses.replace(self, args=jax.tree.map(place, self.args))


def sds(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def kv_inputs(b, heads, t, r, bits, group_size, dtype=jnp.bfloat16):
  """``(q, kv, start, quantized_length, length, k_residual, v_residual)`` of a decode step.

  `heads` is ``(num_heads, num_kv_heads, head_dim)``; the cache holds `t` packed
  tokens and an `r`-token window (none when r == 0).
  """
  hq, hkv, d = heads
  pf = 8 // bits
  kv = QuantizedKV(
    sds((b, hkv, t // pf, d), jnp.uint8),
    sds((b, hkv, t // group_size, d), jnp.float32),
    sds((b, hkv, t // group_size, d), jnp.float32),
    sds((b, hkv, t, d // pf), jnp.uint8),
    sds((b, hkv, t), jnp.float32),
    sds((b, hkv, t), jnp.float32),
  )
  rows = sds((b,), jnp.int32)
  residual = (sds((b, hkv, r, d), dtype),) * 2 if r else (None, None)
  return (sds((b, hq, d), dtype), kv, rows, rows, rows, *residual)


def _padded(k: int, multiple: int) -> int:
  return -(-k // multiple) * multiple


def _matmul_args(op: str, model: str, m: int, k: int, n: int) -> tuple[str, tuple]:
  x = sds((m, k), jnp.bfloat16)
  if op == "w8a8_matmul":
    return f"K={k}", (x, sds((k, n), jnp.int8), sds((1, n), jnp.float32))
  if op == "w4a16_matmul":
    kp = _padded(k, 128)
    scales = sds((kp // 128, n), jnp.bfloat16)
    args = (sds((m, kp), jnp.bfloat16), sds((kp // 2, n), jnp.int8), scales, scales)
    return (f"K={kp} g128" if kp != k else f"K={k} g128"), args
  group = 32 if model == "smollm2" else 128
  args = (x, sds((k // 2, n), jnp.int8), sds((k // group, n), jnp.float32), sds((1, 1), "float32"))
  return f"K={k} g{group}", args


def cases(op: str, models=MODELS) -> list[Case]:
  """The compile cases of `op` (a registry name) at `models`' shapes."""
  out = []
  for model in models:
    shape = shapes.get(model)
    if op in ("w8a8_matmul", "w4a16_matmul", "w4a8_fireq_matmul", "linear"):
      for lin in shape.linears:
        for m in MATMUL_ROWS.get(model, (1, 128)):
          if op == "linear":
            detail = f"K={lin.k}"
            args = (sds((m, lin.k), jnp.bfloat16), sds((lin.k, lin.n), jnp.bfloat16))
          else:
            detail, args = _matmul_args(op, model, m, lin.k, lin.n)
          out.append(Case(op, f"{model} {lin.name} M={m} N={lin.n} {detail}", args))
    elif op == "quantized_kv_attention":
      for bits, group in KV_BITS_GROUPS:
        args = kv_inputs(KV_BATCH, shape.kv_heads, KV_CONTEXT, KV_WINDOW, bits, group)
        label = f"{model} B={KV_BATCH} T={KV_CONTEXT} R={KV_WINDOW} {bits}-bit g{group}"
        out.append(Case(op, label, args, {"bits": bits, "group_size": group}))
    elif op == "attention":
      hq, hkv, d = shape.kv_heads
      for kind, b, s, t in (
        ("prefill", 1, 2048, 2048),
        ("chunk", 1, 64, 1024),
        ("decode", 8, 1, 4096),
      ):
        q = sds((b, s, hq, d), jnp.bfloat16)
        kv = sds((b, hkv, t, d), jnp.bfloat16)
        args = (q, kv, kv, sds((b, s), jnp.int32), sds((b,), jnp.int32))
        out.append(Case(op, f"{model} {kind} B={b} S={s} T={t}", args))
    elif op == "block_sparse_attention":
      hq, hkv, d = shape.kv_heads
      for kind, b, s, t in (("prefill", 1, 2048, 2048), ("decode", 8, 1, 4096)):
        q = sds((b, s, hq, d), jnp.bfloat16)
        kv = sds((b, hkv, t, d), jnp.bfloat16)
        nq = -(-s // MOBA_BLOCK)
        idx = sds((b, hkv, nq, MOBA_TOP_K), jnp.int32)
        args = (q, kv, kv, sds((b, s), jnp.int32), sds((b,), jnp.int32), idx)
        label = f"{model} {kind} B={b} S={s} T={t} block {MOBA_BLOCK} top-{MOBA_TOP_K}"
        blocks = {"block_q": MOBA_BLOCK, "block_k": MOBA_BLOCK}
        out.append(Case(op, label, args, blocks))
    else:
      raise ValueError(f"no compile cases for op {op!r}")
  return out
