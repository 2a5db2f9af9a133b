"""Dispatch layer: each hot op has several implementations behind one call.

Implementations:
  * ``"xla"``: fused XLA; the default on CPU and the fallback everywhere.
  * ``"pallas"``: a Pallas kernel from `pallas_kernels`; the default on TPU/GPU
    once an op registers one. ``interpret=True`` runs it on CPU.
  * ``"reference"``: the plainest jnp formulation, kept for tests.

The model only calls `linear` and `attention` with a `KernelConfig`; adding a
kernel is a `register` call, not a model edit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "pallas", "reference")
_ACCELERATOR_BACKENDS = ("tpu", "gpu", "cuda", "rocm")

_REGISTRY: dict[str, dict[str, Callable]] = {}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """How ops are executed.

  Attributes:
    implementation: force one of IMPLEMENTATIONS, or None to pick per backend.
    interpret: run Pallas kernels in interpret mode (CPU testing).
  """

  implementation: str | None = None
  interpret: bool = False

  def __post_init__(self):
    if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"implementation={self.implementation!r}; choose one of {IMPLEMENTATIONS} or None"
      )


def register(op: str, implementation: str):
  """Decorator: registers `fn` as `implementation` of `op`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}")

  def wrap(fn):
    _REGISTRY.setdefault(op, {})[implementation] = fn
    return fn

  return wrap


def available(op: str) -> tuple[str, ...]:
  """Implementations registered for `op`."""
  return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, config: KernelConfig = KernelConfig()) -> Callable:
  """Returns the implementation of `op` that `config` selects on this backend."""
  impls = _REGISTRY.get(op)
  if not impls:
    raise ValueError(f"no op named {op!r}; registered: {sorted(_REGISTRY)}")
  name = config.implementation
  if name is None:
    on_accelerator = jax.default_backend() in _ACCELERATOR_BACKENDS
    name = "pallas" if on_accelerator and "pallas" in impls else "xla"
  if name not in impls:
    raise ValueError(f"op {op!r} has no {name!r} implementation yet; available: {sorted(impls)}")
  fn = impls[name]
  return functools.partial(fn, interpret=config.interpret) if name == "pallas" else fn


# ----------------------------------------------------------------------------- linear


def linear(
  x: jax.Array, w, config: KernelConfig = KernelConfig(), contract_dims: int = 1
) -> jax.Array:
  """Contracts the last `contract_dims` axes of x with the first of w, f32 accumulation.

  x[..., *K] @ w[*K, *out] -> [..., *out] in x's dtype. `w` is a float array or
  a `jaxllm.quant.QTensor`; a QTensor goes to the ``quantized_linear`` op, whose
  implementations live in `jaxllm.quant.linear`.
  """
  k_shape = x.shape[x.ndim - contract_dims :]
  if tuple(w.shape[:contract_dims]) != tuple(k_shape):
    raise ValueError(f"linear: x {tuple(x.shape)} does not contract with w {tuple(w.shape)}")
  rows = x.reshape(*x.shape[: x.ndim - contract_dims], math.prod(k_shape))
  if hasattr(w, "method") and hasattr(w, "values"):
    from jaxllm.quant import linear as _  # noqa: F401  registers the implementations

    if w.contract_dims != contract_dims:
      raise ValueError(
        f"QTensor contracts {w.contract_dims} dims, linear asked for {contract_dims}"
      )
    out = resolve("quantized_linear", config)(rows.reshape(-1, rows.shape[-1]), w)
  else:
    out = resolve("linear", config)(rows, w.reshape(rows.shape[-1], -1))
  return out.reshape(*x.shape[: x.ndim - contract_dims], *w.shape[contract_dims:])


@register("linear", "xla")
def _linear_xla(x, w):
  """x [..., K] @ w [K, N]."""
  w = w.astype(x.dtype) if w.dtype != x.dtype else w
  rows = math.prod(x.shape[:-1])
  if x.dtype == jnp.bfloat16 and rows == 1 and jax.default_backend() == "cpu":
    # XLA:CPU has no fast bf16 matrix-vector path (~1.5 GB/s), but its bf16
    # GEMM reads weights at full speed from 2 rows up: compute a 2-row product
    # and keep the first row.
    x2 = jnp.concatenate([x.reshape(1, -1)] * 2, axis=0)
    out = jnp.dot(x2, w, preferred_element_type=jnp.float32)[:1]
    return out.reshape(*x.shape[:-1], w.shape[1]).astype(x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@register("linear", "reference")
def _linear_reference(x, w):
  out = jnp.tensordot(
    x.astype(jnp.float32), w.astype(jnp.float32), axes=1, precision=jax.lax.Precision.HIGHEST
  )
  return out.astype(x.dtype)


# -------------------------------------------------------------------------- attention


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
  return resolve("attention", config)(q, k, v, q_slots, kv_start)


def visibility_mask(q_slots, kv_start, num_slots):
  """[B, S, T] bool: which key slots each query may attend to."""
  t = jnp.arange(num_slots, dtype=jnp.int32)
  return (t[None, None, :] <= q_slots[:, :, None]) & (t[None, None, :] >= kv_start[:, None, None])


_MASKED = -1e30
_PREFILL_BLOCK = 64


@register("attention", "xla")
def _attention_xla(q, k, v, q_slots, kv_start):
  s, t = q.shape[1], k.shape[2]
  if s == t and s > _PREFILL_BLOCK:
    # S == T only when the buffer holds exactly this chunk, so query slots are
    # 0..S-1 and a query block never sees keys past its own end: split the
    # queries into blocks that each read a key prefix. This skips the masked
    # upper triangle and keeps each block's scores cache-resident (~5x faster
    # than one [S, T] pass on CPU at S=512).
    outs = [
      _attention_dense(
        q[:, i : i + _PREFILL_BLOCK],
        k[:, :, : i + _PREFILL_BLOCK],
        v[:, :, : i + _PREFILL_BLOCK],
        q_slots[:, i : i + _PREFILL_BLOCK],
        kv_start,
      )
      for i in range(0, s, _PREFILL_BLOCK)
    ]
    return jnp.concatenate(outs, axis=1)
  return _attention_dense(q, k, v, q_slots, kv_start)


def _attention_dense(q, k, v, q_slots, kv_start):
  b, s, hq, d = q.shape
  hkv, t = k.shape[1], k.shape[2]
  g = hq // hkv
  # Queries [B, S, Hkv, G, D] -> [B*Hkv, S*G, D]: the query side is tiny, so
  # this is the only transpose; K and V are read in place as [B*Hkv, T, D]
  # (3-D, so XLA:CPU reads a donated cache without copying it), each KV head
  # shared by its G query heads.
  qg = q.reshape(b, s, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b * hkv, s * g, d)
  k = k.reshape(b * hkv, t, d).astype(q.dtype)
  v = v.reshape(b * hkv, t, d)
  scores = jnp.einsum("nqd,ntd->nqt", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
  mask = jnp.repeat(visibility_mask(q_slots, kv_start, t), g, axis=1)  # [B, S*G, T]
  mask = jnp.broadcast_to(mask[:, None], (b, hkv, s * g, t)).reshape(b * hkv, s * g, t)
  # A finite fill keeps fully masked rows (left-padding queries) finite, so no
  # NaN can reach a value slot that other rows multiply by zero.
  scores = jnp.where(mask, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("nqt,ntd->nqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out.reshape(b, hkv, s, g, d).transpose(0, 2, 1, 3, 4).reshape(b, s, hq, d)
  return out.astype(q.dtype)


@register("attention", "reference")
def _attention_reference(q, k, v, q_slots, kv_start):
  hq, hkv = q.shape[2], k.shape[1]
  k = jnp.repeat(k, hq // hkv, axis=1).astype(jnp.float32)  # [B, Hq, T, D]
  v = jnp.repeat(v, hq // hkv, axis=1).astype(jnp.float32)
  qf = q.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hq, S, D]
  scores = jnp.matmul(qf, k.transpose(0, 1, 3, 2), precision=jax.lax.Precision.HIGHEST)
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  mask = visibility_mask(q_slots, kv_start, k.shape[2])[:, None]
  scores = jnp.where(mask, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.matmul(probs, v, precision=jax.lax.Precision.HIGHEST)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)
