"""Dispatch layer: selection rules and XLA-vs-reference agreement of every op."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm import ops
from jaxllm.rope import apply_rope, rope_tables


def test_default_on_cpu_is_xla():
  assert ops.resolve("linear") is ops._REGISTRY["linear"]["xla"]
  assert (
    ops.resolve("attention", ops.KernelConfig("reference"))
    is (ops._REGISTRY["attention"]["reference"])
  )


def test_missing_implementation_is_a_clear_error():
  with pytest.raises(ValueError, match="has no 'pallas' implementation"):
    ops.resolve("attention", ops.KernelConfig("pallas"))
  with pytest.raises(ValueError, match="no op named"):
    ops.resolve("conv")
  with pytest.raises(ValueError, match="implementation="):
    ops.KernelConfig("triton")


def _attention_inputs(rng, b, s, t, hkv, g, d, offset):
  q = rng.standard_normal((b, s, hkv * g, d)).astype(np.float32)
  k = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
  v = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
  q_slots = np.broadcast_to(offset + np.arange(s, dtype=np.int32), (b, s))
  start = rng.integers(0, offset + 1, size=(b,)).astype(np.int32)
  return q, k, v, q_slots, start


def _numpy_attention(q, k, v, q_slots, start):
  """Loop-per-query softmax attention in float64: independent of both jnp paths."""
  b, s, hq, d = q.shape
  g = hq // k.shape[1]
  out = np.zeros(q.shape)
  for bi in range(b):
    for si in range(s):
      keys = np.arange(start[bi], q_slots[bi, si] + 1)
      for h in range(hq):
        if not len(keys):
          continue
        sc = k[bi, h // g, keys].astype(np.float64) @ q[bi, si, h] / np.sqrt(d)
        p = np.exp(sc - sc.max())
        out[bi, si, h] = (p / p.sum()) @ v[bi, h // g, keys]
  return out


@settings(max_examples=12, deadline=None)  # every example compiles new shapes
@given(
  b=st.integers(1, 3),
  s=st.integers(1, 9),
  extra=st.integers(0, 20),
  hkv=st.sampled_from([1, 3]),
  g=st.sampled_from([1, 3]),
  d=st.sampled_from([8, 64]),
  seed=st.integers(0, 2**16),
)
def test_attention_matches_numpy(b, s, extra, hkv, g, d, seed):
  rng = np.random.default_rng(seed)
  t = s + extra
  q, k, v, q_slots, start = _attention_inputs(rng, b, s, t, hkv, g, d, offset=extra)
  want = _numpy_attention(q, k, v, q_slots, start)
  for impl in ("xla", "reference"):
    got = ops.attention(q, k, v, q_slots, start, ops.KernelConfig(impl))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4, err_msg=impl)


@pytest.mark.parametrize(
  "s,t,starts,slots",
  [
    (600, 600, [0, 37], "run"),  # a prefill chunk: S == T, two query blocks, left padding
    (300, 400, [0, 50], "random"),  # slots that are not one run take the general path
  ],
)
def test_blocked_attention_matches_reference(s, t, starts, slots):
  """S > the sub-block takes the looped, blocked causal path; it must equal the
  reference, left padding (`kv_start`) and grouped query heads (9 / 3) included."""
  rng = np.random.default_rng(s + t)
  q, k, v, q_slots, start = _attention_inputs(rng, 2, s, t, 3, 3, 64, offset=t - s)
  start[:] = starts
  if slots == "random":
    q_slots = rng.integers(0, t, size=q_slots.shape).astype(np.int32)
  got, want = (
    np.asarray(jax.jit(ops.attention, static_argnums=5)(q, k, v, q_slots, start, config))
    for config in (ops.KernelConfig("xla"), ops.KernelConfig("reference"))
  )
  assert np.isfinite(got).all()  # padding queries see no key, yet stay finite
  valid = q_slots >= start[:, None]
  np.testing.assert_allclose(got[valid], want[valid], atol=2e-5, rtol=1e-4)
  if slots == "run":  # spot-check against the float64 loop too
    np.testing.assert_allclose(
      got[1, -3:], _numpy_attention(q, k, v, q_slots, start)[1, -3:], atol=2e-5
    )


def _count_ops(s: int, op: str) -> int:
  rng = np.random.default_rng(0)
  args = _attention_inputs(rng, 1, s, s, 3, 3, 64, offset=0)
  return jax.jit(ops.attention).lower(*args).as_text().count(op)


def test_blocked_attention_program_does_not_grow_with_the_prompt():
  """Prefill compile time must not grow with S: the blocked path is a loop, so
  the lowered program has the same operations at 512 and 4096 tokens."""
  dots = [_count_ops(s, "dot_general") for s in (512, 4096)]
  assert 0 < dots[0] == dots[1], dots


def test_blocked_attention_gradient():
  """Block reconstruction (jaxllm.quant.reconstruct) differentiates through the
  xla attention; through the blocked path (two query blocks of a chunk written
  at slot 100 of a longer cache, left padding) the gradient must match the
  reference's."""
  rng = np.random.default_rng(3)
  q, k, v, q_slots, start = _attention_inputs(rng, 2, 600, 700, 3, 3, 16, offset=100)
  start[:] = [0, 290]
  w = np.where(q_slots >= start[:, None], 1.0, 0.0)[..., None, None] * rng.standard_normal(q.shape)

  def grads(config):
    def loss(q, k, v):
      return jnp.sum(ops.attention(q, k, v, q_slots, start, config) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for got, want in zip(grads(ops.KernelConfig("xla")), grads(ops.KernelConfig("reference"))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


def test_fully_masked_rows_stay_finite():
  rng = np.random.default_rng(1)
  q, k, v, q_slots, start = _attention_inputs(rng, 1, 4, 4, 1, 2, 8, offset=0)
  start[:] = 2  # queries at slots 0, 1 see nothing (left padding)
  assert np.isfinite(np.asarray(ops.attention(q, k, v, q_slots, start))).all()


@pytest.mark.parametrize("shape", [(1, 576, 576), (16, 576, 1536), (3, 1536, 576)])
def test_linear_xla_matches_reference(shape):
  m, k, n = shape
  rng = np.random.default_rng(m)
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  want = x.astype(np.float64) @ w
  for impl in ("xla", "reference"):
    got = np.asarray(ops.linear(jnp.asarray(x), jnp.asarray(w), ops.KernelConfig(impl)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3, err_msg=impl)


def test_rope_matches_complex_rotation():
  """Half-split RoPE equals multiplying (x_i + i x_{i+D/2}) by exp(i pos theta^(-2i/D))."""
  rng = np.random.default_rng(2)
  b, s, h, d, theta = 2, 5, 3, 64, 1e5
  x = rng.standard_normal((b, s, h, d)).astype(np.float32)
  pos = rng.integers(0, 5000, size=(b, s))
  cos, sin = rope_tables(jnp.asarray(pos), d, theta)
  got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
  freqs = theta ** (-np.arange(0, d, 2) / d)
  z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * np.exp(1j * pos[..., None, None] * freqs)
  # float32 angles pos * freq carry ~pos * 6e-8 rad of rounding (3e-4 at 5000),
  # as in HF's Llama; a wrong pairing or frequency would be off by O(1).
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-3)
  jax.clear_caches()
